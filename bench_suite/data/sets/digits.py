"""``digits``: scikit-learn's 1,797 8x8 digits (0..16 -> 0..255), a fixed 1,297 / 500 train/test split (tests)."""

from __future__ import annotations

import numpy as np

from bench_suite.data.registry import DatasetSpec, RawSplit, register


def _load(split, source):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    sl = slice(0, 1297) if split == "train" else slice(1297, None)
    return RawSplit(images[sl], labels[sl], [str(i) for i in range(10)])


register(DatasetSpec("digits", "scikit-learn digits, 1,797 8x8 grey, 10 classes (tests)", ("train", "test"), _load,
                     label="Digits"))
