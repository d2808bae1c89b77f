"""The dataset registry: where each dataset's files come from and how to read them.

One dataset is one file in ``bench_suite/data/sets/`` that calls ``register(DatasetSpec(...))``; the
registry finds them (``bench_suite.plugins``, entry-point group ``bench_suite.datasets``). Offline datasets
(cpu profile) install from package registries; the paper's datasets convert from a local path the user
gives (``--source``). Every dataset yields uint8 images with integer labels per split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench_suite.errors import MissingDataError, unknown
from bench_suite.plugins import Registry


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
    label: str = ""  # display name in reports (default: the name)
    # the official size of each split: the plan's budgets (run.py --dry-run --json) before any shard exists
    split_sizes: dict = field(default_factory=dict)

    def load(self, split: str, source: str | os.PathLike | None = None) -> RawSplit:
        if split not in self.splits:
            raise unknown(f"split of {self.name}", split, self.splits)
        if self.needs_source and source is None:
            raise MissingDataError(f"dataset {self.name} converts from a local copy: pass --source PATH ({self.install_hint})")
        return self.loader(split, Path(source) if source is not None else None)


REGISTRY: Registry[DatasetSpec] = Registry("dataset", "bench_suite.datasets")


def register(spec: DatasetSpec) -> DatasetSpec:
    return REGISTRY.register(spec)


def dataset_names() -> list[str]:
    return sorted(REGISTRY.names())


def get_dataset(name: str) -> DatasetSpec:
    return REGISTRY.get(name)
