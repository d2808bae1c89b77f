"""``cifar100``: CIFAR-100 (fine labels) from a local copy of the python-version tarball or its folder."""

from __future__ import annotations

from bench_suite.data import sources
from bench_suite.data.registry import DatasetSpec, RawSplit, register


def _load(split, source):
    images, labels, classes = sources.read_cifar(source, split, True)
    return RawSplit(images, labels, classes)


register(DatasetSpec("cifar100", "CIFAR-100 (fine labels) from the python-version tarball or folder", ("train", "test"),
                     _load, needs_source=True,
                     install_hint="cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html",
                     label="CIFAR100", split_sizes={"train": 50_000, "test": 10_000}))
