"""``cifar10``: CIFAR-10 from a local copy of the python-version tarball or its folder (``--source``)."""

from __future__ import annotations

from bench_suite.data import sources
from bench_suite.data.registry import DatasetSpec, RawSplit, register


def _load(split, source):
    images, labels, classes = sources.read_cifar(source, split, False)
    return RawSplit(images, labels, classes)


register(DatasetSpec("cifar10", "CIFAR-10 from the python-version tarball or folder", ("train", "test"), _load,
                     needs_source=True, install_hint="cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html",
                     label="CIFAR10", split_sizes={"train": 50_000, "test": 10_000}))
