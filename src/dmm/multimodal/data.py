"""Image + text data sets as training inputs: (images, cached text features) per split.

`FeaturePairDataset` is an `ImageDataset` whose `x_train` / `x_test` are tuples (uint8 images,
float text features): every trainer, evaluator and the bench take it as they take images
(`dmm.inputs`). Text features come from the frozen text encoder, computed once per distinct text
and cached on disk (`DMM_CACHE_DIR`, default `~/.cache/dmm`).

Registered data sets: `emoji-mm` (rendered offline; `--data-root` is ignored) and `crisismmd`
(`--data-root` = the folder holding `CrisisMMD_v2.0/` and the agreed-label split folder).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dmm.data.base import ImageDataset, register_dataset
from dmm.data.pairs import PairDataset
from dmm.errors import DMMError

log = logging.getLogger(__name__)


@dataclass
class FeaturePairDataset(ImageDataset):
    texts_train: list[str] = field(default_factory=list)
    texts_test: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.x_train[0].shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train[0].shape[1:])

    @property
    def text_dim(self) -> int:
        return int(self.x_train[1].shape[1])

    def subset(self, n_train: int | None = None, n_test: int | None = None
               ) -> FeaturePairDataset:
        return FeaturePairDataset(
            self.name, tuple(t[:n_train] for t in self.x_train), self.y_train[:n_train],
            tuple(t[:n_test] for t in self.x_test), self.y_test[:n_test], self.classes,
            self.mean, self.std, self.texts_train[:n_train], self.texts_test[:n_test],
            dict(self.info))


def cache_dir() -> Path:
    return Path(os.environ.get("DMM_CACHE_DIR", Path.home() / ".cache" / "dmm"))


def with_text_features(pairs: PairDataset, *, encoder=None, cache: Path | None = None
                       ) -> FeaturePairDataset:
    """Encode every distinct text once (frozen encoder, cached) and pair features with images."""
    from dmm.text import TextEncoder, cached_features

    encoder = encoder or TextEncoder()
    tr, te = pairs.splits["train"], pairs.splits["test"]
    distinct = sorted(set(tr.texts) | set(te.texts))
    t0 = time.perf_counter()
    feats = cached_features(encoder, distinct, cache if cache is not None else cache_dir())
    seconds = time.perf_counter() - t0
    row = {t: i for i, t in enumerate(distinct)}
    ftr = feats[torch.tensor([row[t] for t in tr.texts], dtype=torch.long)]
    fte = feats[torch.tensor([row[t] for t in te.texts], dtype=torch.long)]
    info = {**pairs.info, "distinct_texts": len(distinct), "text_features_s": seconds,
            "text_encoder": str(encoder.path)}
    log.info("text features for %d distinct texts in %.1f s", len(distinct), seconds)
    return FeaturePairDataset(pairs.name, (tr.images, ftr), tr.labels, (te.images, fte),
                              te.labels, pairs.classes, pairs.mean, pairs.std, list(tr.texts),
                              list(te.texts), info)


@register_dataset("emoji-mm")
def load_emoji_mm_features(root: Path | None) -> FeaturePairDataset:
    from dmm.data.emoji import load_emoji_mm
    label = os.environ.get("DMM_EMOJI_LABEL", "group")
    return with_text_features(load_emoji_mm(label=label, cache_dir=cache_dir()))


@register_dataset("crisismmd")
def load_crisismmd_features(root: Path | None) -> FeaturePairDataset:
    from dmm.data.crisismmd import load_crisismmd
    if root is None:
        raise DMMError("crisismmd needs --data-root: the folder holding CrisisMMD_v2.0/ and "
                       "crisismmd_datasplit_agreed_label/")
    return with_text_features(load_crisismmd(root))
