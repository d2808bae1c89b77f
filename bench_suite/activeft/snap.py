"""Initialisation (random / farthest-point) and snapping of parameters to unique real samples.

Both work on a pool split across ranks (each rank holds the rows ``shard`` of the global pool) and give the
same answer for any number of ranks: candidates are screened in float32, and every decision closer than
``eps`` is re-evaluated in float64 with ties broken by the lowest global row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench_suite.activeft.assign import U32


def decision_eps(d: int, fnorm: float = 1.0) -> float:
    """Margin above which a float32 similarity comparison is certainly right (2 x the rounding bound)."""
    return 2.0 * (d + 2) * U32 * fnorm + 1e-7


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


def snap(feats: torch.Tensor, shard: slice, n_total: int, c64: torch.Tensor, dist, *, eps: float,
         k: int = 8, block: int = 8192) -> tuple[np.ndarray, dict]:
    """Each parameter, in index order, takes its most similar real sample not already taken.

    Returns (global rows in parameter order, info). Distributed top-k: every rank keeps its k best rows per
    parameter and a bound on the rest; the merged lists decide whenever the best free candidate beats the
    bound of the unlisted rows, otherwise an exact pass over the pool picks for that parameter.
    """
    dev = feats.device
    b = int(c64.shape[0])
    c32 = c64.float()
    n_loc = int(feats.shape[0])
    k = max(1, min(int(k), max(n_loc, 1)))
    vals = torch.full((b, 0), -math.inf, dtype=torch.float32, device=dev)
    idx = torch.zeros((b, 0), dtype=torch.long, device=dev)
    for s in range(0, n_loc, block):
        e = min(n_loc, s + block)
        sim = c32 @ feats[s:e].T  # (B, blk)
        kk = min(k, e - s)
        tv, ti = sim.topk(kk, dim=1)
        vals = torch.cat([vals, tv], dim=1)
        idx = torch.cat([idx, ti + s], dim=1)
        if vals.shape[1] > k:
            vals, pos = vals.topk(k, dim=1)
            idx = idx.gather(1, pos)
    if n_loc > k:
        bound = vals[:, -1].clone()  # every unlisted local row is at most this (float32)
    else:
        bound = torch.full((b,), -math.inf, dtype=torch.float32, device=dev)
    v64 = torch.zeros(tuple(idx.shape), dtype=torch.float64, device=dev)
    for s in range(0, b if n_loc else 0, 1024):  # float64 values of the listed rows, in parameter blocks
        e = min(b, s + 1024)
        rows = feats[idx[s:e].reshape(-1)].double().reshape(e - s, -1, feats.shape[1])
        v64[s:e] = (rows * c64[s:e, None, :]).sum(dim=2)
    local = (v64.cpu().numpy(), (idx + shard.start).cpu().numpy(), bound.cpu().numpy())
    parts = dist.all_gather_object(local)
    all_v = np.concatenate([p[0] for p in parts], axis=1)
    all_r = np.concatenate([p[1] for p in parts], axis=1)
    g_bound = np.max(np.stack([p[2] for p in parts]), axis=0).astype(np.float64)
    lists = []
    for j in range(b):
        order = np.lexsort((all_r[j], -all_v[j]))
        lists.append((all_v[j][order].tolist(), all_r[j][order].tolist()))
    taken: set[int] = set()
    taken_loc = torch.zeros(n_loc, dtype=torch.bool, device=dev)
    out = np.empty(b, dtype=np.int64)
    fallbacks = collisions = 0
    for j in range(b):
        vs, rs = lists[j]
        pick = None
        for pos, (v, r) in enumerate(zip(vs, rs)):
            if r in taken:
                continue
            if v > g_bound[j] + eps:
                pick = r
                if pos:
                    collisions += 1
            break
        if pick is None:
            fallbacks += 1
            collisions += 1
            pick = _exact_free_best(feats, shard, n_total, c64[j], taken_loc, dist, eps)
        out[j] = pick
        taken.add(pick)
        if shard.start <= pick < shard.stop:
            taken_loc[pick - shard.start] = True
    return out, {"snap_fallbacks": fallbacks, "snap_collisions": collisions}


def _exact_free_best(feats, shard, n_total, cj64, taken_loc, dist, eps) -> int:
    """Best not-taken row for one parameter over the whole (split) pool; ties -> lowest global row."""
    dev = feats.device
    best_v = torch.tensor([-math.inf], dtype=torch.float64, device=dev)
    best_r = torch.tensor([float(n_total)], dtype=torch.float64, device=dev)
    if feats.shape[0]:
        sim = feats @ cj64.float()
        sim = torch.where(taken_loc, torch.full_like(sim, -math.inf), sim)
        m = sim.max()
        if torch.isfinite(m):
            near = (sim >= m - eps).nonzero().squeeze(1)
            v64 = feats[near].double() @ cj64
            vmax = v64.max()
            best_v[0] = vmax
            best_r[0] = float(int(near[v64 == vmax].min()) + shard.start)
    gv = dist.all_reduce(best_v.clone(), "max")
    r = torch.where(best_v == gv, best_r, torch.full_like(best_r, float(n_total)))
    pick = int(dist.all_reduce(r, "min")[0])
    if pick >= n_total:
        raise RuntimeError("snapping ran out of free samples (budget larger than the pool?)")
    return pick
