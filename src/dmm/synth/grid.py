"""A PNG grid of pseudo-images, one row per class, titled by target label."""

from __future__ import annotations

from pathlib import Path

import torch

from dmm.io import save_with


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: str | Path, *,
              mean: tuple[float, ...], std: tuple[float, ...], per_class: int = 8,
              class_names: list[str] | None = None) -> Path:
    """Denormalize and write up to `per_class` images for every class as a PNG grid.

    `images` may be a tuple (images, side inputs...) of pseudo-pairs; the images are drawn."""
    if isinstance(images, tuple):
        images = images[0]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(set(labels.tolist()))
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    pix = (images.float() * s + m).clamp(0, 1)
    fig, axes = plt.subplots(len(classes), per_class, squeeze=False,
                             figsize=(per_class * 0.9, len(classes) * 0.95))
    for r, c in enumerate(classes):
        idx = (labels == c).nonzero().flatten()[:per_class]
        for j in range(per_class):
            ax = axes[r][j]
            ax.axis("off")
            if j < len(idx):
                img = pix[idx[j]].permute(1, 2, 0).numpy()
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img,
                          cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        axes[r][0].set_title(name, fontsize=7, loc="left")
    fig.tight_layout(pad=0.2)
    path = Path(path)
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path
