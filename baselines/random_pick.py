"""Random: B samples drawn uniformly at random without replacement (the ActiveFT paper's "Random" baseline,
Xie et al., CVPR 2023, Sec. 4.1 item 1).

Hyper-parameters: none. The draw is ``numpy.random.default_rng(seed).choice(N, B, replace=False)`` over the
rows of the pool, so a seed gives the same ids on every machine (numpy's PCG64 stream is stable), and two
seeds give different sets. No features are read, only ids; labels are never read.
Departures from the paper: none.
"""

from __future__ import annotations

import time

import numpy as np

from baselines._knn import finish, on_main, parse_options, pool_budget
from baselines.registry import register


@register
class RandomSelector:
    name = "random"
    description = "Random (ActiveFT paper baseline): B samples uniformly at random without replacement, seeded"
    label_free = True

    def __init__(self, **config):
        self.config = parse_options(self.name, config, {})

    def select(self, store, budget, *, seed, oracle=None, dist=None):
        t0 = time.perf_counter()
        budget = pool_budget(self.name, store, budget)
        n = len(store.ids)
        rows = on_main(dist, lambda: np.random.default_rng(int(seed)).choice(n, budget, replace=False))
        return finish(self.name, store, rows, budget, seed, t0, self.config, {}, dist)
