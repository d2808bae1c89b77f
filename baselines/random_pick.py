"""Random: B samples drawn uniformly at random without replacement (the ActiveFT paper's "Random" baseline,
Xie et al., CVPR 2023, Sec. 4.1 item 1).

Hyper-parameters: none. The draw is ``numpy.random.default_rng(seed).choice(N, B, replace=False)`` over the
rows of the pool, so a seed gives the same ids on every machine (numpy's PCG64 stream is stable), and two
seeds give different sets. No features are read, only ids; labels are never read.
Departures from the paper: none.
"""

from __future__ import annotations

import numpy as np

from bench_suite.methods import Pool, Selector, register


@register
class RandomSelector(Selector):
    name = "random"
    label = "Random"
    description = "Random (ActiveFT paper baseline): B samples uniformly at random without replacement, seeded"
    label_free = True

    def choose(self, pool: Pool):
        return np.random.default_rng(pool.seed).choice(pool.n, pool.budget, replace=False), {}
