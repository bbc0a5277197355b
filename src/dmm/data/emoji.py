"""emoji-mm: an offline image + text benchmark built from Debian's emoji font and Unicode data.

Image = the emoji rendered by Noto Color Emoji (Debian `fonts-noto-color-emoji`) with random
scale, shift, rotation and background; text = its CLDR name from `emoji-test.txt` (Debian
`unicode-data`); label = its group (default; the `Component` group is left out, leaving 9) or
its subgroup. Skin-tone variants are dropped (they share a name stem and an image up to colour).

The split is **by emoji**: a share of each class's emoji (default 20%) is held out for the test
set, so neither the picture nor the name of a test emoji was seen in training; the text branch
has to generalize through the encoder's semantics, the image branch through the pictures.
Each emoji appears `train_views` times in training and `test_views` times in the test set, each
view a different random rendering.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from dmm.data.npz import channel_stats
from dmm.data.pairs import PairDataset, PairSplit
from dmm.errors import DMMError
from dmm.io import save_with

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
FONT_SIZE = 109  # the only size of the colour bitmap strike


def parse_emoji_test(path: str | Path = EMOJI_TEST) -> list[dict]:
    """Fully-qualified emoji without skin tones: {chars, name, group, subgroup}."""
    path = Path(path)
    if not path.is_file():
        raise DMMError(f"{path} not found: install the Debian package unicode-data "
                       "(`make setup` does) or give the path of emoji-test.txt")
    out, group, subgroup = [], None, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            codes = [int(c, 16) for c in line.split(";")[0].split()]
            if SKIN_TONES & set(codes) or group == "Component":
                continue
            name = line.split("#", 1)[1].strip().split(" ", 2)[2]  # "😀 E1.0 grinning face"
            out.append({"chars": "".join(map(chr, codes)), "name": name, "group": group,
                        "subgroup": subgroup})
    if not out:
        raise DMMError(f"{path}: no fully-qualified emoji found")
    return out


class Renderer:
    def __init__(self, font: str | Path = FONT) -> None:
        from PIL import ImageFont
        font = Path(font)
        if not font.is_file():
            raise DMMError(f"{font} not found: install the Debian package "
                           "fonts-noto-color-emoji (`make setup` does)")
        self.font = ImageFont.truetype(str(font), FONT_SIZE)

    def glyph(self, chars: str):
        """The emoji as a tight RGBA crop (None if the font draws nothing)."""
        from PIL import Image, ImageDraw
        canvas = Image.new("RGBA", (FONT_SIZE * 3, FONT_SIZE + 40), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((8, 8), chars, font=self.font, embedded_color=True)
        box = canvas.getbbox()
        return canvas.crop(box) if box else None

    def view(self, glyph, size: int, rng: np.random.Generator) -> np.ndarray:
        """One random rendering: scale, shift, rotation, background grey level."""
        from PIL import Image
        w, h = glyph.size
        side = max(w, h)
        scale = rng.uniform(0.65, 0.95) * size / side
        g = glyph.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
        g = g.rotate(float(rng.uniform(-15, 15)), resample=Image.BICUBIC, expand=True)
        if max(g.size) > size:  # the rotation grew it past the canvas: shrink to fit
            g.thumbnail((size, size), Image.LANCZOS)
        bg = int(rng.integers(200, 256))
        canvas = Image.new("RGBA", (size, size), (bg, bg, bg, 255))
        gx = int(rng.integers(0, size - g.size[0] + 1))
        gy = int(rng.integers(0, size - g.size[1] + 1))
        canvas.alpha_composite(g, (gx, gy))
        return np.asarray(canvas.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()


def load_emoji_mm(*, label: str = "group", image_size: int = 32, train_views: int = 8,
                  test_views: int = 2, test_share: float = 0.2, seed: int = 0,
                  cache_dir: str | Path | None = None, emoji_test: str | Path = EMOJI_TEST,
                  font: str | Path = FONT, limit: int | None = None) -> PairDataset:
    """Render the data set (or read it from `cache_dir`). `limit` keeps the first N emoji."""
    if label not in ("group", "subgroup"):
        raise DMMError(f"emoji-mm label must be group or subgroup, got {label!r}")
    if not 0 < test_share < 1:
        raise DMMError(f"test_share must be in (0, 1), got {test_share}")
    if train_views < 1 or test_views < 1 or image_size < 8:
        raise DMMError("train_views and test_views must be >= 1 and image_size >= 8")
    items = parse_emoji_test(emoji_test)[:limit]
    settings = {"label": label, "size": image_size, "train_views": train_views,
                "test_views": test_views, "test_share": test_share, "seed": seed,
                "n": len(items), "font": Path(font).stat().st_size if Path(font).is_file()
                else None, "names": hashlib.sha256("\n".join(
                    i["name"] for i in items).encode()).hexdigest()[:16]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"emoji-mm_{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        return _from_npz(np.load(cache, allow_pickle=False), settings)

    classes = sorted({i[label] for i in items})
    index = {c: k for k, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for n, it in enumerate(items):
        by_class.setdefault(index[it[label]], []).append(n)
    test_ids: set[int] = set()
    for members in by_class.values():  # >= 1 held out per class with >= 2 emoji
        k = int(round(test_share * len(members)))
        if len(members) >= 2:
            test_ids.update(rng.choice(members, size=max(1, k), replace=False).tolist())
    renderer = Renderer(font)
    parts: dict[str, dict[str, list]] = {s: {"x": [], "t": [], "y": [], "id": []}
                                         for s in ("train", "test")}
    dropped = 0
    for n, it in enumerate(items):
        glyph = renderer.glyph(it["chars"])
        if glyph is None:
            dropped += 1
            continue
        split = "test" if n in test_ids else "train"
        for v in range(test_views if split == "test" else train_views):
            p = parts[split]
            p["x"].append(renderer.view(glyph, image_size, rng))
            p["t"].append(it["name"])
            p["y"].append(index[it[label]])
            p["id"].append(f"{n}:{v}")
    arrays = {"classes": np.array(classes), "dropped": np.array(dropped)}
    for s, p in parts.items():
        arrays[f"x_{s}"] = np.stack(p["x"])
        arrays[f"t_{s}"] = np.array(p["t"])
        arrays[f"y_{s}"] = np.array(p["y"], dtype=np.int64)
        arrays[f"id_{s}"] = np.array(p["id"])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        save_with(cache, write)
    return _from_npz(arrays, settings)


def _from_npz(a, settings: dict) -> PairDataset:
    splits = {s: PairSplit(torch.from_numpy(np.asarray(a[f"x_{s}"])),
                           [str(t) for t in a[f"t_{s}"]],
                           torch.from_numpy(np.asarray(a[f"y_{s}"], dtype=np.int64)),
                           [str(i) for i in a[f"id_{s}"]]) for s in ("train", "test")}
    mean, std = channel_stats(splits["train"].images.numpy())
    return PairDataset("emoji-mm", splits, [str(c) for c in a["classes"]], mean, std,
                       info={"settings": settings, "dropped_unrenderable": int(a["dropped"])})
