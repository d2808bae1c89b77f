"""The one base class of every selection method: typed options, and the shared work done once.

A method subclasses ``Selector``, declares its options as a dataclass ``Options`` (``bench_suite.options``),
and implements only ``choose(pool) -> (rows, info)``: the rows of the pool it picks, and method-specific
numbers for the record. The base does the rest, the same way for every method:

- the options: coerced and checked at construction (``Selector(**options)``), an unknown key is an error;
- the pool: a FeatureStore (or an N x d array), its shape, and ``1 <= budget <= N``;
- the device: the option ``device`` (if the method has one) through the project's one rule
  (``runtime.resolve_device``: ``auto`` = the rank's local GPU, else the CPU);
- distribution: a method that needs the whole pool in one process runs on rank 0 and every rank receives
  the same answer (``Runtime.on_main``); a method that is distributed itself (ActiveFT) sets
  ``distributed = True`` and every rank runs ``choose`` on its own shard;
- timing, the id lookup and building the ``Selection`` (exactly ``budget`` unique ids).

Active-learning methods (``label_free = False``) receive ``pool.oracle``; label-free ones never do.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from bench_suite import runtime
from bench_suite.errors import BadInputError
from bench_suite.methods.selection import Selection, check_budget
from bench_suite.options import as_dict, coerce
from bench_suite.store import FeatureStore


@dataclass
class NoOptions:
    """A method without options."""


@dataclass
class Pool:
    """What ``choose`` gets: the store, the budget, the seed, the device, the runtime, the oracle (AL only)."""

    store: FeatureStore
    budget: int
    seed: int
    device: torch.device
    dist: runtime.Runtime
    oracle: object | None = None

    @property
    def n(self) -> int:
        return len(self.store)


def as_store(data) -> FeatureStore:
    """A FeatureStore as given, or an N x d array / tensor wrapped as one (rows normalised with a warning)."""
    if isinstance(data, FeatureStore):
        return data
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        if data.ndim != 2:
            raise BadInputError(f"features must be a 2-D array (N x d), got shape {data.shape}")
        if data.shape[0] == 0:
            raise BadInputError("feature store is empty (N = 0)")
        return FeatureStore.from_array(data, normalize=True)
    raise BadInputError(f"a selector needs a FeatureStore or an N x d array, got {type(data).__name__}")


def check_seed(seed, where: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BadInputError(f"{where}: seed must be a non-negative integer, got {seed!r}")
    return int(seed)


class Selector:
    """Base class of every registered selection method (see the module docstring)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # the paper's row name, used by the reports
    description: ClassVar[str] = ""
    label_free: ClassVar[bool] = True
    distributed: ClassVar[bool] = False  # True: every rank runs choose() on its shard (and collects itself)
    # True: a process selecting for several budgets of one pool and seed reuses work between them (BiLAF's
    # cores; the active-learning protocol's rounds), so a grid keeps those cells on one rank (tables.cells)
    shares_work_across_budgets: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions
    aliases: ClassVar[dict] = {}  # old option name -> new
    # small settings for the registry's contract tests (tests/test_registries.py), e.g. a few VAE epochs
    quick_options: ClassVar[dict] = {}
    # bumped whenever a change to the method can change what it selects: part of every cached table cell's
    # key, so such a change recomputes the cells (tests/test_code_versions.py holds it to its source)
    version: ClassVar[int] = 1

    def __init__(self, **options):
        self.options = coerce(self.Options, options, where=self.name, aliases=self.aliases)

    # ---------------------------------------------------------------- what subclasses implement
    def choose(self, pool: Pool) -> tuple[np.ndarray, dict]:
        """The chosen rows of ``pool.store`` (exactly ``pool.budget``, unique) and info for the record."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared
    def config(self) -> dict:
        """The fully resolved options (defaults included), as recorded in the Selection."""
        return as_dict(self.options)

    def initial_set(self, n: int) -> int:
        """How many random labels the method buys before it selects anything (active learning), for a pool of n."""
        return 0

    def device(self) -> torch.device:
        return runtime.resolve_device(getattr(self.options, "device", "auto"), what=f"{self.name}: option device")

    def check_pool(self, store: FeatureStore, budget) -> int:
        """Shape checks and the budget in [1, N]; methods that are not distributed need the whole pool."""
        feats = store.features
        if getattr(feats, "ndim", 0) != 2:
            raise BadInputError(f"{self.name}: features must be a 2-D array (N x d), got shape "
                                f"{getattr(feats, 'shape', None)}")
        n = int(feats.shape[0])
        if n == 0:
            raise BadInputError(f"{self.name}: feature store is empty (N = 0)")
        if np.shape(store.ids) != (n,):
            raise BadInputError(f"{self.name}: store ids have shape {np.shape(store.ids)} but features have {n} rows")
        if not self.distributed and store.total_rows is not None and store.total_rows != n:
            raise BadInputError(f"{self.name}: got a slice of {n} of {store.total_rows} rows; this method needs the "
                                "whole pool (open the store without rows=)")
        return check_budget(budget, n)

    def select(self, store, budget, *, seed: int = 0, oracle=None, dist=None) -> Selection:
        t0 = time.perf_counter()
        d = dist if dist is not None else runtime.current()
        store = as_store(store)
        seed = check_seed(seed, self.name)
        budget = self.check_pool(store, budget)
        if not self.label_free and oracle is None:
            raise BadInputError(f"{self.name} is an active-learning method and needs an oracle for the labels of its "
                                "picks (on the CLI: --labels FILE.npy or --labels store)")
        pool = Pool(store, budget, seed, self.device(), d, oracle if not self.label_free else None)
        if self.distributed:
            rows, info = self.choose(pool)
        else:
            rows, info = d.on_main(lambda: self.choose(pool))
        rows = np.asarray(rows, dtype=np.int64)
        ids = np.asarray(store.ids, dtype=np.int64)[rows]
        return Selection(ids, self.name, budget, seed, time.perf_counter() - t0, self.config(), dict(info))


def options_of(cls) -> list[dataclasses.Field]:
    """The option fields of a method class (for ``--list`` and the docs)."""
    return list(dataclasses.fields(cls.Options))
