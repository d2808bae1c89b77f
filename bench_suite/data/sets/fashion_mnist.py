"""``fashion_mnist``: Fashion-MNIST 70k 28x28 grey, 10 classes, from Debian's ``dataset-fashion-mnist`` (offline)."""

from __future__ import annotations

import os
from pathlib import Path

from bench_suite.data import sources
from bench_suite.data.registry import DatasetSpec, RawSplit, register
from bench_suite.errors import MissingDataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _load(split, source):
    root = source or Path(os.environ.get("BENCH_SUITE_FASHION_MNIST", FASHION_MNIST_DIR))
    if not (root / "train-images-idx3-ubyte.gz").exists() and not (root / "train-images-idx3-ubyte").exists():
        raise MissingDataError(f"Fashion-MNIST not found in {root}; install it with "
                               "`sudo apt-get install dataset-fashion-mnist` (or set BENCH_SUITE_FASHION_MNIST)")
    images, labels = sources.read_idx_split(root, split)
    return RawSplit(images, labels, CLASSES)


register(DatasetSpec("fashion_mnist", "Fashion-MNIST 70k 28x28 grey, 10 classes (Debian dataset-fashion-mnist)",
                     ("train", "test"), _load, install_hint="sudo apt-get install dataset-fashion-mnist",
                     label="Fashion-MNIST"))
