"""CrisisMMD v2.0 (Alam et al., ICWSM 2018): tweets with images, agreed-label task splits.

Layout read (as distributed; docs/research/crisismmd-format.md): under `root`,

    CrisisMMD_v2.0/data_image/<event>/<D_M_YYYY>/<tweet_id>_<n>.jpg
    crisismmd_datasplit_agreed_label/task_<task>_text_img_agreed_lab_{train,dev,test}.tsv

(the split folder may also sit inside `CrisisMMD_v2.0/`, and `root` may be `CrisisMMD_v2.0`
itself). The TSVs are tab-separated with no quoting (tweets may start with a literal `"`), with
the header `event_name tweet_id image_id tweet_text image label label_text label_image
label_text_image`; `image` is relative to `CrisisMMD_v2.0/`. One row per image: a tweet with
three images gives three rows.

Labels: `labels="coarse"` (default) reads `label_text`, which in the agreed split holds the
5-class humanitarian merge the multimodal papers use; `labels="fine"` reads `label` (8 classes).

Bad rows, decided here and tested:
- a missing or unreadable image, or an empty tweet text: skipped and counted in `info["skipped"]`
  by reason (`on_bad="skip"`, the default: the public archive has such rows), or a one-line
  DMMError naming the file, line and path (`on_bad="fail"`);
- a label outside the task's classes, a wrong header or a row without 9 fields: always a
  DMMError naming the file and line (it means a different file or a damaged one, not a bad row).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dmm.data.npz import channel_stats
from dmm.data.pairs import PairDataset, PairSplit
from dmm.errors import DMMError

HEADER = ["event_name", "tweet_id", "image_id", "tweet_text", "image", "label", "label_text",
          "label_image", "label_text_image"]
CLASSES = {
    ("humanitarian", "coarse"): [
        "affected_individuals", "infrastructure_and_utility_damage", "not_humanitarian",
        "other_relevant_information", "rescue_volunteering_or_donation_effort"],
    ("humanitarian", "fine"): [
        "affected_individuals", "infrastructure_and_utility_damage", "injured_or_dead_people",
        "missing_or_found_people", "not_humanitarian", "other_relevant_information",
        "rescue_volunteering_or_donation_effort", "vehicle_damage"],
    ("informative", "coarse"): ["informative", "not_informative"],
    ("informative", "fine"): ["informative", "not_informative"],
}
SPLITS = ("train", "dev", "test")
SPLIT_DIR = "crisismmd_datasplit_agreed_label"


def _locate(root: Path, task: str) -> tuple[Path, Path]:
    """(folder of the split TSVs, folder that `image` paths are relative to)."""
    if not root.exists():
        raise DMMError(f"data root '{root}' does not exist")
    image_roots = [root / "CrisisMMD_v2.0", root]
    image_root = next((p for p in image_roots if (p / "data_image").is_dir()), None)
    name = f"task_{task}_text_img_agreed_lab_train.tsv"
    split_dirs = [root / SPLIT_DIR, root / "CrisisMMD_v2.0" / SPLIT_DIR, root.parent / SPLIT_DIR,
                  root]
    split_dir = next((p for p in split_dirs if (p / name).is_file()), None)
    if split_dir is None:
        raise DMMError(f"CrisisMMD: no {name} under '{root}' (looked in {SPLIT_DIR}/, "
                       f"CrisisMMD_v2.0/{SPLIT_DIR}/ and the root)")
    if image_root is None:
        raise DMMError(f"CrisisMMD: no data_image/ folder under '{root}' or "
                       f"'{root / 'CrisisMMD_v2.0'}'")
    return split_dir, image_root


def _read_image(path: Path, size: int) -> np.ndarray:
    """RGB, shorter side resized to `size`, centre crop: (3, size, size) uint8."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                       Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def read_split(tsv: Path, image_root: Path, classes: list[str], column: str, *, size: int,
               on_bad: str, skipped: Counter) -> PairSplit:
    try:
        lines = tsv.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DMMError(f"{tsv}: cannot read ({e})") from e
    header = lines[0].rstrip("\r").split("\t")
    if header != HEADER:
        raise DMMError(f"{tsv}:1: header {header} is not CrisisMMD's {HEADER}")
    col = HEADER.index(column)
    index = {c: i for i, c in enumerate(classes)}
    images, texts, labels, ids = [], [], [], []
    for n, line in enumerate(lines[1:], 2):
        line = line.rstrip("\r")
        if not line:
            continue
        f = line.split("\t")
        if len(f) != len(HEADER):
            raise DMMError(f"{tsv}:{n}: {len(f)} tab-separated fields, expected {len(HEADER)}")
        label = f[col].strip()
        if label not in index:
            raise DMMError(f"{tsv}:{n}: unknown label {label!r} in column {column}; expected "
                           f"one of {', '.join(classes)}")
        text = f[3].strip()
        reason = None
        if not text:
            reason = "empty_text"
        else:
            path = image_root / f[4].strip()
            if not path.is_file():
                reason = "missing_image"
            else:
                try:
                    img = _read_image(path, size)
                except Exception:  # noqa: BLE001 - PIL raises many types on damaged files
                    reason = "unreadable_image"
        if reason is not None:
            if on_bad == "fail":
                raise DMMError(f"{tsv}:{n}: {reason.replace('_', ' ')} "
                               f"({f[4].strip() or 'no path'})")
            skipped[reason] += 1
            continue
        images.append(img)
        texts.append(text)
        labels.append(index[label])
        ids.append(f[2].strip())
    x = (torch.from_numpy(np.stack(images)) if images
         else torch.zeros((0, 3, size, size), dtype=torch.uint8))
    return PairSplit(x, texts, torch.tensor(labels, dtype=torch.long), ids)


def load_crisismmd(root: str | Path, *, task: str = "humanitarian", labels: str = "coarse",
                   image_size: int = 32, on_bad: str = "skip") -> PairDataset:
    """CrisisMMD v2.0 agreed-label splits of `task` (humanitarian | informative)."""
    if (task, labels) not in CLASSES:
        raise DMMError(f"CrisisMMD task must be humanitarian or informative and labels coarse "
                       f"or fine, got {task!r}, {labels!r}")
    if on_bad not in ("skip", "fail"):
        raise DMMError(f"on_bad must be skip or fail, got {on_bad!r}")
    if image_size < 8:
        raise DMMError(f"image_size must be >= 8, got {image_size}")
    split_dir, image_root = _locate(Path(root), task)
    classes = CLASSES[(task, labels)]
    column = "label_text" if labels == "coarse" else "label"
    skipped: Counter = Counter()
    splits = {}
    for split in SPLITS:
        tsv = split_dir / f"task_{task}_text_img_agreed_lab_{split}.tsv"
        if tsv.is_file():
            splits[split] = read_split(tsv, image_root, classes, column, size=image_size,
                                       on_bad=on_bad, skipped=skipped)
    for need in ("train", "test"):
        if need not in splits or not len(splits[need]):
            raise DMMError(f"CrisisMMD: the {need} split under '{split_dir}' has no usable rows")
    mean, std = channel_stats(splits["train"].images.numpy())
    return PairDataset(f"crisismmd-{task}", splits, classes, mean, std,
                       info={"skipped": dict(skipped), "split_dir": str(split_dir),
                             "image_root": str(image_root), "label_column": column})
