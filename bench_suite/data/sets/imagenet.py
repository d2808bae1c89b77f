"""``imagenet``: ImageNet-1k as an ImageFolder copy (``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG``)."""

from __future__ import annotations

from bench_suite.data import sources
from bench_suite.data.registry import DatasetSpec, RawSplit, register


def _load(split, source):
    paths, labels, classes = sources.read_image_folder(source / ("train" if split == "train" else "val"))
    return RawSplit(paths, labels, classes)


register(DatasetSpec("imagenet", "ImageNet-1k ImageFolder (root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG)",
                     ("train", "test"), _load, needs_source=True,
                     install_hint="an ImageFolder copy of ILSVRC2012 with train/ and val/", label="ImageNet",
                     split_sizes={"train": 1_281_167, "test": 50_000}))
