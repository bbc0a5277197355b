"""dmm: data-free merging of divergent models (Liu et al., "Domain-Adaptive Model Merging across
Disconnected Modes", ICASSP 2026)."""

__version__ = "0.1.0"
