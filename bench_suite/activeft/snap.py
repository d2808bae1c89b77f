"""Snapping of the optimised parameters to B unique real samples.

Works on a pool split across ranks (each rank holds the rows ``shard`` of the global pool) and gives the
same answer for any number of ranks: candidates are screened in float32, and every decision closer than
``eps`` (``assign.decision_eps``) is re-evaluated in float64 with ties broken by the lowest global row.
"""

from __future__ import annotations

import math

import numpy as np
import torch


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
