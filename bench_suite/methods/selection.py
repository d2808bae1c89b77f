"""Selection: the ids a selector picked, with its wall time and metadata; the Oracle of the AL methods;
budget checks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench_suite import atomic
from bench_suite.errors import BadInputError, MissingDataError


@dataclass
class Selection:
    ids: np.ndarray  # exactly `budget` unique global ids
    method: str
    budget: int
    seed: int
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # method-specific numbers (loss curve, queries, ...)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if len(self.ids) != self.budget:
            raise AssertionError(f"{self.method}: selected {len(self.ids)} ids for budget {self.budget}")
        if len(np.unique(self.ids)) != len(self.ids):
            raise AssertionError(f"{self.method}: selection contains duplicate ids")

    def to_json(self) -> dict:
        return {"method": self.method, "budget": self.budget, "seed": self.seed, "seconds": self.seconds,
                "ids": self.ids.tolist(), "config": self.config, "info": self.info}

    def save(self, path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def load(cls, path) -> "Selection":
        path = Path(path)
        if not path.exists():
            raise MissingDataError(f"selection file not found: {path}")
        try:
            d = json.loads(path.read_text())
            return cls(np.asarray(d["ids"]), d["method"], int(d["budget"]), int(d["seed"]),
                       float(d.get("seconds", 0.0)), d.get("config", {}), d.get("info", {}))
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            raise BadInputError(f"{path} is not a selection file: {exc}") from exc


class Oracle:
    """Reveals labels of the ids asked for, and counts what was asked (AL methods only)."""

    def __init__(self, labels_by_id: Callable[[np.ndarray], np.ndarray] | dict | np.ndarray, ids=None):
        if isinstance(labels_by_id, np.ndarray):
            table = dict(zip(np.asarray(ids).tolist(), labels_by_id.tolist()))
            self._lookup = lambda q: np.array([table[i] for i in q.tolist()], dtype=np.int64)
        elif isinstance(labels_by_id, dict):
            self._lookup = lambda q: np.array([labels_by_id[i] for i in q.tolist()], dtype=np.int64)
        else:
            self._lookup = labels_by_id
        self.queried: list[int] = []

    def __call__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        self.queried.extend(ids.tolist())
        return self._lookup(ids)

    @property
    def n_queries(self) -> int:
        return len(self.queried)


def check_budget(budget, n: int) -> int:
    """Budget must be an integer in [1, N]."""
    if isinstance(budget, bool) or int(budget) != budget:
        raise BadInputError(f"budget must be an integer, got {budget!r}")
    budget = int(budget)
    if budget <= 0:
        raise BadInputError(f"budget must be positive, got {budget}")
    if budget > n:
        raise BadInputError(f"budget {budget} is larger than the pool ({n} samples)")
    return budget


def budget_from_ratio(ratio: float, n: int) -> int:
    """``floor(ratio * n)``, at least 1: the authors' released selection scripts' rule (``int(total_num *
    percent * 0.01)``; ImageNet 1% = 12,811); the paper states none. The 1e-9 keeps a product that floating
    point puts just under an integer (0.29 * 100 = 28.999...) on that integer."""
    if not 0 < ratio <= 1:
        raise BadInputError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, math.floor(ratio * n + 1e-9))

