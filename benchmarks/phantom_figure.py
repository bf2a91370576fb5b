"""Mid-slice figure of three phantoms with labels, plus phantom generation speed.

Usage: python benchmarks/phantom_figure.py [--out docs/figures/phantoms.png]
Prints one JSON line (seconds per phantom) and writes the figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from voco_core.data.phantoms import LABEL_NAMES, make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/phantoms.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    phantoms = [make_phantom(args.seed, index) for index in range(3)]
    seconds = (time.perf_counter() - start) / len(phantoms)

    cmap = plt.get_cmap("tab20", len(LABEL_NAMES))
    fig, axes = plt.subplots(3, 3, figsize=(11, 10), constrained_layout=True)
    for row, phantom in zip(axes, phantoms, strict=True):
        x, y, z = (s // 2 for s in phantom.image.shape)
        sx, sy, sz = phantom.spacing
        windowed = np.clip((phantom.image.astype(np.float32) + 175) / 425, 0, 1)
        views = [  # (image slice, label slice, aspect, title) shown with anterior/superior up
            (windowed[:, :, z].T, phantom.label[:, :, z].T, sy / sx, "axial (k = mid)"),
            (windowed[:, y + 10, :].T, phantom.label[:, y + 10, :].T, sz / sx, "coronal"),
            (windowed[x + 20, :, :].T, phantom.label[x + 20, :, :].T, sz / sy, "sagittal (right)"),
        ]
        for ax, (img, lab, aspect, title) in zip(row, views, strict=True):
            ax.imshow(img, cmap="gray", origin="lower", aspect=aspect)
            overlay = np.ma.masked_where(lab <= 1, lab)
            ax.imshow(overlay, cmap=cmap, vmin=0, vmax=len(LABEL_NAMES) - 1, alpha=0.35,
                      origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(v)) for v in LABEL_NAMES if v > 1]
    fig.legend(handles, [n for v, n in LABEL_NAMES.items() if v > 1], loc="lower center",
               ncol=9, fontsize=8, bbox_to_anchor=(0.5, -0.03))
    fig.suptitle(f"Synthetic CT phantoms, seed {args.seed}, subjects 0-2 (window -175..250 HU)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80, bbox_inches="tight")
    print(json.dumps({"seconds_per_phantom": round(seconds, 3), "figure": str(args.out)}))


if __name__ == "__main__":
    main()
