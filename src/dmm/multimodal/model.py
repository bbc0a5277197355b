"""Image + text classifier: ResNet image encoder, BERT-architecture text features, fusion.

    image -> ResNet (classifier removed) -> f_img (d)   \\
                                                          concat -> BatchNorm1d -> Linear -> logits
    text  -> [frozen BERT, cached] features t (384)     /

The text encoder is frozen by default: the model then takes the cached sentence features as its
second input and holds no BERT weights (merging and DMM see only the image encoder and the
fusion). With `finetune_layers = n > 0` the model owns a BERT encoder whose top n transformer
layers train (the rest frozen) and takes token ids as its second input, packed as one LongTensor
(N, 2, L) = (input_ids, attention_mask) by `pack_tokens`. In both modes a float second input is
taken as sentence features directly, which is how DMM's pseudo-pairs enter (docs/multimodal.md).
"""

from __future__ import annotations

import torch
from torch import nn

from dmm.errors import DMMError
from dmm.models import create
from dmm.models.registry import register_architecture


class ImageTextNet(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int = 3, width: float = 0.25,
                 image_arch: str = "resnet18", text_dim: int = 384,
                 text_encoder: str | None = None, finetune_layers: int = 0) -> None:
        super().__init__()
        if image_arch not in ("resnet18", "resnet8"):
            raise DMMError(f"image_arch must be resnet18 or resnet8, got {image_arch!r}")
        if finetune_layers < 0:
            raise DMMError(f"finetune_layers must be >= 0, got {finetune_layers}")
        self.image = create(image_arch, width=width, num_classes=num_classes,
                            in_channels=in_channels)
        d = self.image.fc.in_features
        self.image.fc = nn.Identity()
        self.text_encoder = None
        if finetune_layers:
            from dmm.text import TextEncoder
            enc = TextEncoder(text_encoder)
            layers = enc.bert.encoder.layer
            if finetune_layers > len(layers):
                raise DMMError(f"finetune_layers={finetune_layers}, the encoder has "
                               f"{len(layers)} layers")
            for p in enc.bert.parameters():
                p.requires_grad_(False)
            for layer in layers[len(layers) - finetune_layers:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
            self.text_encoder = enc
            text_dim = enc.dim
        self.text_dim = text_dim
        self.image_dim = d
        self.fusion_bn = nn.BatchNorm1d(d + text_dim)
        self.fc = nn.Linear(d + text_dim, num_classes)

    def text_features(self, text: torch.Tensor) -> torch.Tensor:
        if text.is_floating_point():
            return text
        if self.text_encoder is None:
            raise DMMError("this model takes text features (float); it has no text encoder "
                           "for token ids (finetune_layers=0)")
        return self.text_encoder(text[:, 0], text[:, 1]).float()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        f = torch.cat([self.image.features(image).float(), self.text_features(text).float()], 1)
        return self.fc(self.fusion_bn(f))


def pack_tokens(encoder, texts: list[str]) -> torch.Tensor:
    """(N, 2, L) LongTensor of input ids and attention mask, for `finetune_layers > 0`."""
    b = encoder.tokenize(texts)
    return torch.stack([b["input_ids"], b["attention_mask"]], 1)


@register_architecture("image_text")
def image_text(**kwargs) -> ImageTextNet:
    return ImageTextNet(**kwargs)
