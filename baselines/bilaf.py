"""BiLAF (Lu, Xie, Yang & Yan, "Boundary Matters: A Bi-Level Active Finetuning Method", NeurIPS 2024).

Not in the ActiveFT paper: its successor from the same group, and the strongest one-shot active-finetuning
method we know of. Two stages, label-free, one shot:

1. Core samples (from ActiveFT, Xie et al. CVPR 2023, this repository's ``activeft`` method, reached through
   the method registry with the ``temperature``, ``iters``, ``lr`` and ``objective`` options): K pseudo-class
   centres.
   K is the ``cores`` option, else ``core_pool_ratio`` x N (the released subsets use 0.1% of N for CIFAR-10,
   0.5% for CIFAR-100 and ImageNet), capped at ``max_core_fraction`` x B (their smallest setting has B = 2K).
2. Boundary samples (from BiLAF), following the authors' released code (github.com/Thinklab-SJTU/BiLAF,
   data_selection/Boundary_Selection/density_cluster.py) step by step:
   - every pool sample joins the pseudo-class of its nearest core (Euclidean);
   - denoising, per pseudo-class of n >= ``min_denoise`` (10) members: grow a set outward from the core in
     levels of ``growth`` x n (10%) members, each level adding the candidates with the smallest mean distance
     to their ``knn`` (10) nearest members of the set; members never added (n mod level size) and the last
     ``remove`` (10%) to join are dropped;
   - boundary score BS(x) = (delta^m * b(x) - a(x)) / max(a(x), b(x)), with a(x) the mean distance to the
     denoised pseudo-class (self included), b(x) the distance to the nearest other core, m the number of
     earlier picks of this pseudo-class facing the same opponent class ("opponent penalty", delta =
     ``penalty`` = 1.1); the smallest score is picked;
   - budget: per pseudo-class proportional to its denoised size, the remainder one unit at a time to the
     smallest allocation; the core counts towards it. Within a class, starting from the core, each pick
     removes itself and its floor(|C| / b) - 1 nearest candidates, then the lowest-score candidate is picked
     (ties: the candidate nearest the previous pick).

Departures from the released code, and why:
- Distances are Euclidean on the L2-normalised features of the FeatureStore (the code uses the raw DINO CLS
  features for stage 2; stores here hold normalised features only). On the unit sphere this ranks as cosine.
- The density of the denoising is the intended one (mean distance to the k nearest members of the growing
  set); the released code indexes the distance row by positions in that set (``D[x][nn]`` instead of
  ``D[x][G[nn]]``), which averages distances to unrelated members.
- Edge cases the code cannot handle: every pseudo-class gets at least one unit (its core; the code asserts all
  cores are selected, and would crash with a zero allocation), allocations are capped at the class's denoised
  size with the excess passed on (the code could pick duplicates), and if the denoised pool is smaller than
  the budget the rest is filled with denoised-out samples nearest their core (``info["filled"]``).
- K <= B / 2 by default (``max_core_fraction``); with B = 1 the selection is ActiveFT's single core.

Speed: stage 1 depends on K (not on the budget), the seed and ActiveFT's options; its cores are kept for the
next selection on the same pool (features and ids by content) in this process, so a table's cells at budgets
with the same K run ActiveFT once (``info["cores_reused"]``; ``activeft_seconds`` is the run that made them).

Under a distributed launch both stages run on rank 0 (ActiveFT in that one process) and every rank gets the
selection.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from baselines._labelfree import ProcessMemo, as_tensor, content_key, fraction, pool_array
from bench_suite.methods import Pool, Selector, register, registry
from bench_suite.options import opt
from bench_suite.runtime import Runtime

TILE = 8192
# stage 1's ActiveFT cores of a pool (per K, seed and options), for the next selection on it in this process
_CORES = ProcessMemo(16 << 20)


def _dist(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between unit vectors, from their dot products (exact up to rounding)."""
    return (2.0 - 2.0 * (q @ x.T)).clamp_min(0.0).sqrt()


def nearest_two_cores(x: torch.Tensor, cores: torch.Tensor):
    """Per sample: its pseudo-class (nearest core, lowest index on ties), the nearest OTHER core and its distance."""
    n, k = len(x), len(cores)
    own = torch.empty(n, dtype=torch.long, device=x.device)
    opp = torch.zeros(n, dtype=torch.long, device=x.device)
    b = torch.full((n,), float("inf"), device=x.device)
    for s in range(0, n, TILE):
        sim = x[s:s + TILE] @ cores.T
        own[s:s + TILE] = sim.argmax(1)
        if k > 1:
            sim.scatter_(1, own[s:s + TILE, None], float("-inf"))
            second = sim.argmax(1)
            opp[s:s + TILE] = second
            b[s:s + TILE] = (2.0 - 2.0 * sim.gather(1, second[:, None]).squeeze(1)).clamp_min(0.0).sqrt()
    return own, opp, b


def denoise(xc: torch.Tensor, core: int, *, knn: int, growth: float, remove: float, min_size: int) -> np.ndarray:
    """Iterative density-based denoising of one pseudo-class: local indices kept, in the order they joined."""
    n = len(xc)
    d_core = _dist(xc[core:core + 1], xc).squeeze(0)
    d_core[core] = -1.0  # the core is first even if another member coincides with it
    if n < min_size:
        return torch.argsort(d_core, stable=True).cpu().numpy()
    step = max(1, int(growth * n))
    grown = torch.argsort(d_core, stable=True)[:step]
    in_set = torch.zeros(n, dtype=torch.bool, device=xc.device)
    in_set[grown] = True
    order = [grown]
    # the knn smallest distances from every member to the growing set, kept sorted (inf = not yet)
    near = torch.full((n, knn), float("inf"), device=xc.device)
    near = torch.cat([near, _dist(xc, xc[grown])], 1).topk(knn, dim=1, largest=False).values
    for _ in range(2, n // step + 1):
        cand = torch.nonzero(~in_set).squeeze(1)
        if cand.numel() == 0:
            break
        finite = torch.isfinite(near[cand])
        dens = torch.where(finite, near[cand], torch.zeros_like(near[cand])).sum(1) / finite.sum(1)
        new = cand[torch.argsort(dens, stable=True)[:step]]
        in_set[new] = True
        order.append(new)
        rest = torch.nonzero(~in_set).squeeze(1)
        if rest.numel():
            near[rest] = torch.cat([near[rest], _dist(xc[rest], xc[new])], 1).topk(knn, dim=1, largest=False).values
    joined = torch.cat(order).cpu().numpy()
    return joined[: max(1, int(len(joined) * (1.0 - remove)))]


def allocate(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Budget per pseudo-class: proportional to size, remainder to the smallest allocation (ties: larger
    share, then lower index); at least 1 (the core) and at most the class size, excess passed on."""
    sizes = np.asarray(sizes, dtype=np.int64)
    share = sizes / sizes.sum()
    alloc = np.floor(share * budget).astype(np.int64)
    alloc = np.maximum(alloc, 1)
    alloc = np.minimum(alloc, sizes)
    while alloc.sum() > budget:  # only from the at-least-one rule: take from the largest allocations
        alloc[int(np.lexsort((np.arange(len(alloc)), -alloc))[0])] -= 1
    while alloc.sum() < budget:
        room = alloc < sizes
        if not room.any():
            break
        keys = np.lexsort((np.arange(len(alloc)), -share, np.where(room, alloc, np.iinfo(np.int64).max)))
        alloc[int(keys[0])] += 1
    return alloc


def boundary_picks(xc: torch.Tensor, core: int, b_dist: torch.Tensor, opp: torch.Tensor, n_classes: int,
                   quota: int, penalty: float) -> list[int]:
    """BiLAF's iterative selection and removal inside one denoised pseudo-class (local indices, core first)."""
    m = len(xc)
    a = torch.zeros(m, device=xc.device)
    for s in range(0, m, TILE):
        a[s:s + TILE] = _dist(xc[s:s + TILE], xc).sum(1) / m
    denom = torch.maximum(a, b_dist).clamp_min(1e-12)
    radius = max(1, m // quota)
    pen = torch.ones(n_classes, dtype=a.dtype, device=a.device)  # delta^m per opponent class
    picks = [core]
    cand = torch.arange(m, device=xc.device)
    while len(picks) < quota:
        node = picks[-1]
        cand = cand[cand != node]
        d = _dist(xc[node:node + 1], xc[cand]).squeeze(0)
        cand = cand[torch.argsort(d, stable=True)][radius - 1:]
        if node != core:
            pen[opp[node]] *= penalty
        score = (pen[opp[cand]] * b_dist[cand] - a[cand]) / denom[cand]
        picks.append(int(cand[int(torch.argmin(score))]))
    return picks


def _below_one(value) -> str | None:
    return None if 0 <= value < 1 else "in [0, 1)"


@register
class BiLAF(Selector):
    name = "bilaf"
    label = "BiLAF"
    description = "BiLAF (Lu et al., NeurIPS 2024): ActiveFT core samples + denoised boundary samples per pseudo-class"
    label_free = True
    shares_work_across_budgets = True  # stage 1's ActiveFT cores depend on K, not on the budget
    quick_options = {"iters": 60}  # the registry's contract tests: a shorter ActiveFT stage

    @dataclass
    class Options:
        cores: int | None = opt(None, minimum=1, doc="K core samples (None: core_pool_ratio x N)")
        core_pool_ratio: float = opt(0.001, check=fraction, doc="K = this x N when cores is None")
        max_core_fraction: float = opt(0.5, check=fraction, doc="K is capped at this x B")
        knn: int = opt(10, minimum=1, doc="denoising: neighbours of the density")
        growth: float = opt(0.1, check=fraction, doc="denoising: level size, a fraction of the pseudo-class")
        remove: float = opt(0.1, check=_below_one, doc="denoising: fraction of the last members to join dropped")
        penalty: float = opt(1.1, minimum=1, doc="opponent penalty delta of the boundary score")
        min_denoise: int = opt(10, minimum=1, doc="pseudo-classes smaller than this are not denoised")
        # stage 1's ActiveFT options; ActiveFT checks them (when BiLAF is built)
        temperature: float = opt(0.07, doc="ActiveFT (core samples): temperature")
        iters: int = opt(300, doc="ActiveFT (core samples): iterations")
        lr: float = opt(1e-3, doc="ActiveFT (core samples): learning rate")
        objective: str = opt("official", doc="ActiveFT (core samples): objective (official | paper)")
        device: str = opt("auto", role="runtime", doc="auto (the rank's local GPU, else cpu) | cpu | cuda | cuda:N")

    def __init__(self, **options):
        super().__init__(**options)
        self.core_selector(self.options.device)  # ActiveFT checks its options now rather than at select time

    def core_selector(self, device: str):
        """The ActiveFT selector of stage 1, from the registry."""
        o = self.options
        return registry.get("activeft", temperature=o.temperature, iters=o.iters, lr=o.lr, objective=o.objective,
                            device=device, progress=False)

    def n_cores(self, n: int, budget: int) -> int:
        o = self.options
        k = o.cores if o.cores is not None else max(1, round(o.core_pool_ratio * n))
        return max(1, min(k, int(o.max_core_fraction * budget), budget))

    def choose(self, pool: Pool):
        o, store, device, budget = self.options, pool.store, pool.device, pool.budget
        n = pool.n
        k = self.n_cores(n, budget)
        t0 = time.perf_counter()
        x_np = pool_array(store)
        # stage 1 runs here, in this one process (rank 0 under a distributed launch), hence a one-process
        # Runtime; its cores depend on K, not on the budget: kept for this process's next selection
        selector = self.core_selector(str(device))
        key = (content_key(x_np, store.ids), k, pool.seed, json.dumps(selector.config(), sort_keys=True, default=str),
               selector.version, str(device))
        kept = _CORES.get(key)
        if kept is None:
            core_sel = selector.select(store, k, seed=pool.seed, dist=Runtime())
            kept = (np.array(core_sel.ids, copy=True), core_sel.info.get("final_loss"), core_sel.seconds)
            _CORES.put(key, kept, kept[0].nbytes)
            reused = False
        else:
            reused = True
        core_ids, final_loss, core_seconds = kept
        core_rows = np.asarray(store.rows_of_ids(core_ids), dtype=np.int64)
        t_core = time.perf_counter() - t0
        x = as_tensor(x_np, device)
        own, opp, b_all = nearest_two_cores(x, x[torch.as_tensor(core_rows, device=device)])
        own[torch.as_tensor(core_rows, device=device)] = torch.arange(k, device=device)  # duplicates
        own_np = own.cpu().numpy()
        members, kept = [], []
        for j, core_row in enumerate(core_rows):
            rows = np.flatnonzero(own_np == j)
            members.append(rows)
            local_core = int(np.searchsorted(rows, core_row))
            keep = denoise(x[torch.as_tensor(rows, device=device)], local_core, knn=o.knn, growth=o.growth,
                           remove=o.remove, min_size=o.min_denoise)
            kept.append(rows[keep])  # kept[j][0] is the core
        alloc = allocate(np.array([len(r) for r in kept]), budget)
        picked = []
        for j, rows in enumerate(kept):
            xc = x[torch.as_tensor(rows, device=device)]
            rows_t = torch.as_tensor(rows, device=device)
            local = boundary_picks(xc, 0, b_all[rows_t], opp[rows_t], k, int(alloc[j]), o.penalty)
            picked.extend(rows[local].tolist())
        filled = 0
        if len(picked) < budget:  # the denoised pool is smaller than the budget: nearest-to-core removed ones
            taken = set(picked)
            rest = np.array([r for r in range(n) if r not in taken], dtype=np.int64)
            core_of = torch.as_tensor(core_rows[own_np[rest]], device=device)
            d = (x[torch.as_tensor(rest, device=device)] * x[core_of]).sum(1)
            extra = rest[torch.argsort(-d, stable=True).cpu().numpy()[: budget - len(picked)]]
            picked.extend(extra.tolist())
            filled = len(extra)
        info = {"cores": k, "core_ids": core_ids.tolist(), "core_seconds": round(t_core, 4),
                "cores_reused": reused, "activeft_seconds": round(float(core_seconds), 4),
                "denoised_out": int(sum(len(m) - len(kk) for m, kk in zip(members, kept))),
                "allocation": alloc.tolist(), "filled": filled,
                "activeft_final_loss": final_loss}
        return np.asarray(picked, dtype=np.int64), info
