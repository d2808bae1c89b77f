"""Initial parameters of ActiveFT: B distinct rows of the pool, random (Alg. 1 line 3) or farthest-point.

Both work on a pool split across ranks (each rank holds the rows ``shard`` of the global pool) and give the
same rows for any number of ranks: the random rows are a function of the seed only; farthest-point sampling
screens in float32 and re-evaluates every decision closer than ``eps`` (``assign.decision_eps``) in float64,
ties broken by the lowest global row. ``gather_rows`` assembles the chosen rows on every rank.
"""

from __future__ import annotations

import math

import numpy as np
import torch

INITS = ("random", "fps")


def initial_rows(init: str, feats: torch.Tensor, shard: slice, n_total: int, budget: int, seed: int, dist,
                 eps: float) -> np.ndarray:
    """The ``budget`` global rows the parameters start from (``init``: random | fps)."""
    if init == "random":
        return random_init(n_total, budget, seed)
    if init == "fps":
        return fps_init(feats, shard, n_total, budget, seed, dist, eps)
    raise ValueError(f"unknown init {init!r}; known: {', '.join(INITS)}")


def gather_rows(feats: torch.Tensor, shard: slice, rows: np.ndarray, dist) -> torch.Tensor:
    """Float64 copies of the global ``rows`` of the pool, assembled from the ranks that own them."""
    rows = np.asarray(rows, dtype=np.int64)
    out = torch.zeros(len(rows), feats.shape[1], dtype=torch.float64, device=feats.device)
    mine = (rows >= shard.start) & (rows < shard.stop)
    if mine.any():
        loc = torch.as_tensor(rows[mine] - shard.start, device=feats.device)
        out[torch.as_tensor(np.flatnonzero(mine), device=feats.device)] = feats[loc].double()
    dist.all_reduce(out)  # each row comes from exactly one rank; the others add exact zeros
    return out


def random_init(n_total: int, budget: int, seed: int) -> np.ndarray:
    """B distinct random rows of the global pool, a function of the seed only (Alg. 1 line 3)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g)[:budget].numpy().astype(np.int64)


def fps_init(feats: torch.Tensor, shard: slice, n_total: int, budget: int, seed: int, dist,
             eps: float) -> np.ndarray:
    """Farthest-point sampling (Euclidean on the unit sphere = smallest max-similarity), first point random.

    Like the released code's ``farthest_distance_sample``, but never repeats a row. Cost O(N B d), memory
    bound (B passes over the pool), so it is slow at ImageNet scale - as in the original.
    """
    g = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(n_total, (1,), generator=g))
    dev = feats.device
    n_loc = feats.shape[0]
    maxsim = torch.full((n_loc,), -math.inf, dtype=torch.float32, device=dev)
    taken = torch.zeros(n_loc, dtype=torch.bool, device=dev)
    chosen = [first]
    sel64 = []
    cur = first
    for _ in range(budget - 1):
        x = gather_rows(feats, shard, np.array([cur]), dist)[0]
        sel64.append(x)
        if shard.start <= cur < shard.stop:
            taken[cur - shard.start] = True
        if n_loc:
            maxsim = torch.maximum(maxsim, feats @ x.float())
        cand = torch.where(taken, torch.full_like(maxsim, math.inf), maxsim)
        lmin = cand.min() if n_loc else torch.tensor(math.inf, device=dev)
        gmin = dist.all_reduce(lmin.reshape(1).clone(), "min")[0]
        # float64 re-evaluation of every row within eps of the float32 minimum
        best_v = torch.tensor([math.inf], dtype=torch.float64, device=dev)
        best_r = torch.tensor([float(n_total)], dtype=torch.float64, device=dev)
        if n_loc:
            near = (cand <= gmin + eps).nonzero().squeeze(1)
            if near.numel():
                xs = torch.stack(sel64)
                v64 = (feats[near].double() @ xs.T).max(dim=1).values
                vmin = v64.min()
                best_v[0] = vmin
                best_r[0] = float(int(near[v64 == vmin].min()) + shard.start)
        gv = dist.all_reduce(best_v.clone(), "min")
        r = torch.where(best_v == gv, best_r, torch.full_like(best_r, float(n_total)))
        cur = int(dist.all_reduce(r, "min")[0])
        chosen.append(cur)
    return np.asarray(chosen, dtype=np.int64)
