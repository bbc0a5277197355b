"""Image classifiers saved by `transformers` (`save_pretrained` folders), as a dmm architecture.

`create("transformers", config={...})` builds the model that a folder's `config.json` describes
(`AutoModelForImageClassification.from_config`: a built-in transformers class, never remote
code) inside a wrapper whose forward returns the classifier's `.logits`. The wrapper's state
dict is the transformers model's under the prefix `hf.`; `dmm.sources` reads and writes the
folders. transformers is imported only when such a model is built.
"""

from __future__ import annotations

import torch
from torch import nn

from dmm.errors import DMMError
from dmm.models.registry import register_architecture

HF_ARCH = "transformers"
CONFIG, WEIGHTS, PREFIX = "config.json", "model.safetensors", "hf."


class HFImageClassifier(nn.Module):
    """A transformers image classifier whose forward takes pixel values and returns logits."""

    def __init__(self, config: dict):
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModelForImageClassification
        except ImportError as e:
            raise DMMError("transformers folders need the transformers package "
                           "(pip install 'dmm[mm]')") from e
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            raise DMMError("a transformers config needs a model_type")
        kwargs = {k: v for k, v in config.items()
                  if k not in ("model_type", "architectures", "transformers_version")}
        try:
            cfg = AutoConfig.for_model(config["model_type"], **kwargs)
            cfg.architectures = config.get("architectures")
            self.hf = AutoModelForImageClassification.from_config(cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise DMMError(f"transformers cannot build an image classifier from this config: "
                           f"{e}") from e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


@register_architecture(HF_ARCH)
def transformers_classifier(config: dict) -> nn.Module:
    return HFImageClassifier(config)
