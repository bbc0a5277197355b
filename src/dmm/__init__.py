"""dmm: data-free merging of divergent models (Liu et al., "Domain-Adaptive Model Merging across
Disconnected Modes", ICASSP 2026).

    import dmm
    merged, report = dmm.merge(models, method="average", config=dmm.preset("default"))
    refined, report = dmm.refine(student, teachers, dmm.preset("default"), n_samples=sizes,
                                 label_counts=histograms)
"""

__version__ = "0.1.0"

from dmm.pipeline import DMMConfig, merge_and_refine, preset, refine  # noqa: E402

# importing registers the image + text architecture and data sets
from dmm import multimodal  # noqa: E402, F401  isort: skip

merge = merge_and_refine

__all__ = ["DMMConfig", "__version__", "merge", "preset", "refine"]
