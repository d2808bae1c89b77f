"""One selection as the CLIs and the tables run it: the method from the registry, an oracle over the
labels for the active-learning methods, and the number of labels they bought."""

from __future__ import annotations

import numpy as np

from bench_suite.errors import BadInputError
from bench_suite.methods import registry
from bench_suite.methods.selection import Oracle, Selection


def run_selection(store, method: str, budget: int, seed: int, config: dict | None = None, labels=None,
                  dist=None) -> Selection:
    """Instantiate ``method`` with ``config`` and select ``budget`` samples of ``store``."""
    selector = registry.get(method, **(config or {}))
    oracle = None
    if not selector.label_free:
        if labels is None:
            raise BadInputError(f"method {method!r} is an active-learning method and needs labels for its oracle "
                                "(--labels)")
        oracle = Oracle(np.asarray(labels), store.ids)
    sel = selector.select(store, budget, seed=seed, oracle=oracle, dist=dist)
    if oracle is not None:
        sel.info.setdefault("oracle_queries", oracle.n_queries)
    return sel
