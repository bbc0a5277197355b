"""Time to encode the texts of emoji-mm with the frozen text encoder (all-MiniLM-L6-v2).

Encodes every distinct text of the data set once into an empty feature cache (cold: the
encoder's forward passes on the CPU, batch of the encoder's default size), then again from the
cache (warm: what every later run pays), and the model load itself.

    python benchmarks/bench_text_encode.py

Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from dmm.data.emoji import load_emoji_mm
from dmm.io import provenance, write_json
from dmm.multimodal.data import cache_dir, with_text_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="group")
    ap.add_argument("--out", default="benchmarks/results/text_encode.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pairs = load_emoji_mm(label=args.label, cache_dir=cache_dir())
    from dmm.text import TextEncoder

    t0 = time.perf_counter()
    enc = TextEncoder()
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cold = with_text_features(pairs, encoder=enc, cache=Path(tmp))
        warm = with_text_features(pairs, encoder=enc, cache=Path(tmp))
    n = cold.info["distinct_texts"]
    res = {"distinct_texts": n, "pairs": len(pairs.splits["train"].labels)
           + len(pairs.splits["test"].labels), "model_load_s": round(load_s, 2),
           "cold_s": round(cold.info["text_features_s"], 2),
           "warm_s": round(warm.info["text_features_s"], 3),
           "texts_per_s": round(n / cold.info["text_features_s"], 1),
           "threads": torch.get_num_threads(), "encoder": cold.info["text_encoder"],
           "provenance": provenance()}
    print(f"{n} distinct texts ({res['pairs']} pairs): encoder load {load_s:.1f} s, "
          f"encode {res['cold_s']} s cold ({res['texts_per_s']} texts/s on "
          f"{res['threads']} threads), {res['warm_s']} s from the cache")
    write_json(args.out, res)


if __name__ == "__main__":
    main()
