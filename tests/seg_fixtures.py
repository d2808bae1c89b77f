"""An ADEChallengeData2016 tree whose images look like scenes: several classes per image in blocks, unlabelled
(0) pixels, smooth colours with noise, and images of different sizes and aspect ratios - so random crops,
cat_max_ratio and the photometric distortion all have something to act on. Real JPEG / PNG files in the
official layout (images/{training,validation}/*.jpg, annotations/.../*.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRAIN_SIZES = [(60, 80), (120, 90), (200, 300), (64, 256)]
VAL_SIZES = [(48, 64), (90, 120)]


def scene(rng: np.random.Generator, h: int, w: int, classes: int = 150) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([np.sin(xx / (5.0 + c) + c) * 80 + np.cos(yy / 9.0) * 30 + 120 for c in range(3)], -1)
    img = (img + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    bw, bh = max(1, w // int(rng.integers(2, 5))), max(1, h // int(rng.integers(2, 4)))
    ann = (1 + (xx // bw + 7 * (yy // bh) + int(rng.integers(0, classes))) % classes).astype(np.uint8)
    ann[rng.random((h, w)) < 0.03] = 0  # unlabelled
    return img, ann


def write_ade20k_scenes(root: Path, train_sizes=TRAIN_SIZES, val_sizes=VAL_SIZES, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, sizes in (("training", train_sizes), ("validation", val_sizes)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes, 1):
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
            img, ann = scene(rng, h, w)
            Image.fromarray(img).save(root / "images" / split / f"{stem}.jpg", quality=92)
            Image.fromarray(ann).save(root / "annotations" / split / f"{stem}.png")
    return root
