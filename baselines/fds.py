"""FDS (farthest/furthest distance sampling, a.k.a. K-Center-Greedy): the ActiveFT paper's baseline
(Xie et al., CVPR 2023, Sec. 4.1 item 2), the greedy k-center algorithm of Sener & Savarese (ICLR 2018,
Algorithm 1) run once, label-free, on the pretrained features.

Algorithm: the first centre is a row drawn uniformly at random with the seed
(``numpy.random.default_rng(seed).integers(N)``); then B - 1 times, the sample whose cosine distance
``1 - <f_i, f_c>`` to its nearest chosen centre is largest becomes a centre (first row on exact ties).
The N-vector of distances to the nearest centre is updated with one N x d mat-vec per pick, so memory is
O(N) besides the features, and time O(B N d) (torch; runs on a GPU with ``device=cuda`` or ``auto``, which
is the rank's local GPU when torch sees one; under a distributed launch rank 0 selects and every rank gets
its answer).

Hyper-parameters: cosine distance, as the ActiveFT paper says ("in accordance with the pretraining
process [DINO], we apply cosine distance"); ``device`` (auto | cpu | cuda, default auto).

``info``: ``start_id`` (the seeded first centre), ``covering_radius`` (max over the pool of the cosine
distance to the nearest selected sample, after the B picks) and ``radius_first`` (the same before the second
pick). Departures from the paper: none known. Sener & Savarese start from a labelled set; with no labels in
active finetuning the paper's FDS needs a start point, which we draw at random with the seed (so seeds give
different selections).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baselines._labelfree import as_tensor, pool_array
from bench_suite.methods import Pool, Selector, register
from bench_suite.options import opt


@torch.no_grad()
def kcenter_greedy_cosine(x: torch.Tensor, budget: int, start: int):
    """Greedy k-center with cosine distance from row ``start`` -> (rows, radius before each pick, final radius).

    ``radii[t]`` is the covering radius of the first t + 1 picks (t >= 0); it never increases.
    """
    n = x.shape[0]
    mind = (1.0 - x @ x[start]).clamp_min_(0.0)
    mind[start] = float("-inf")
    rows = [int(start)]
    radii = []
    for _ in range(budget - 1):
        i = int(torch.argmax(mind))
        radii.append(float(mind[i]))
        rows.append(i)
        mind = torch.minimum(mind, (1.0 - x @ x[i]).clamp_min_(0.0))
        mind[i] = float("-inf")
    free = mind[torch.isfinite(mind)]
    final = float(free.max()) if free.numel() else 0.0
    assert len(set(rows)) == len(rows) <= n
    return np.asarray(rows, dtype=np.int64), radii, final


@register
class FDS(Selector):
    name = "fds"
    label = "FDS"
    description = "FDS / K-Center-Greedy (ActiveFT paper baseline): farthest-point picks, cosine distance, seeded start"
    label_free = True

    @dataclass
    class Options:
        device: str = opt("auto", role="runtime", doc="auto (the rank's local GPU, else cpu) | cpu | cuda | cuda:N")

    def choose(self, pool: Pool):
        store, device = pool.store, pool.device
        x = as_tensor(pool_array(store), device)
        start = int(np.random.default_rng(pool.seed).integers(x.shape[0]))
        rows, radii, final = kcenter_greedy_cosine(x, pool.budget, start)
        self.radii_ = np.asarray(radii)
        info = {"start_id": int(store.ids[start]), "covering_radius": final,
                "radius_first": radii[0] if radii else final, "device": str(device)}
        return rows, info
