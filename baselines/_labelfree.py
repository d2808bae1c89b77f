"""Shared geometry for the label-free selectors (fds, kmeans, typiclust, probcover, bilaf).

A toolkit, not a framework: options, the pool and budget checks, the device, running on rank 0 and
building the Selection are the ``Selector`` base's work (bench_suite/methods/base.py); what is here is the
pool as an array, the tiled similarity kernels, spherical k-means and the distinct nearest samples.

Everything here works on the unit sphere (FeatureStore rows are L2-normalised), so similarity is the dot
product, cosine distance is ``1 - s`` and squared Euclidean distance is ``2 - 2 s``.

Memory: no function ever holds an N x N matrix. Pairwise work runs over tiles of at most ``TILE`` elements
(rows x columns), so the extra memory is O(TILE) plus O(N k) for k-nearest-neighbour lists.

Devices: the tiled kernels use torch, so they run on the CPU or on a CUDA GPU (the selectors' ``device``
option, resolved by the base with the project's one rule: ``auto`` = the rank's local GPU when torch sees
one, else the CPU). Spherical k-means runs on faiss (CPU, or faiss-GPU when the installed faiss has
GPU support) or on a small torch implementation (any torch device; the fallback on a GPU node without
faiss-gpu). See baselines/kmeans.py for the speed comparison that chose faiss.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from bench_suite.errors import BadInputError

TILE = 1 << 24  # elements per similarity tile (64 MiB of float32)

# faiss announces at INFO which of its SIMD builds it tried and loaded (five lines); quiet unless asked for
if logging.getLogger("faiss.loader").level == logging.NOTSET:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- options and the pool
KMEANS_INITS = ("random", "kmeans++")  # kmeans++ is faiss only
KMEANS_BACKENDS = ("auto", "faiss", "torch")


def fraction(value) -> str | None:
    """An ``opt(check=...)`` rule: a fraction in (0, 1] (None when it is one, else what it must be)."""
    return None if 0 < value <= 1 else "in (0, 1]"


def pool_array(store) -> np.ndarray:
    """The features as a writable, C-contiguous float32 array (a memmap is read into memory once: N x d)."""
    feats = store.features
    if isinstance(feats, np.memmap) or not getattr(feats, "flags", None) or not feats.flags.writeable \
            or feats.dtype != np.float32 or not feats.flags.c_contiguous:
        return np.array(feats, dtype=np.float32, order="C", copy=True)
    return feats


def content_key(x: np.ndarray, ids=None) -> str:
    """A digest of the pool's features (and ids): what a per-process memo of pool-level results is keyed by."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((x.shape, str(x.dtype))).encode())
    h.update(np.ascontiguousarray(x).data)
    if ids is not None:
        h.update(np.ascontiguousarray(np.asarray(ids, dtype=np.int64)).data)
    return h.hexdigest()


class ProcessMemo:
    """Pool-level intermediate results kept for this process's next selection with the same inputs.

    A table runs one method on one pool at several budgets and seeds; what does not depend on the budget
    (ProbCover's k-means and delta-ball graph, BiLAF's ActiveFT cores) is the same computation every time.
    The key must hold everything that decides the value (the pool's content digest, the seed, the options);
    values are returned as stored (callers never modify them). At most ``max_bytes`` in all (``nbytes`` of
    each value as its caller states it), least recently used first out; a larger value is not kept.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()  # key -> (value, nbytes)
        self.hits = 0

    def get(self, key):
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return self._items[key][0]

    def put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        self._items[key] = (value, int(nbytes))
        self._items.move_to_end(key)
        while sum(n for _, n in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def as_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(x).to(device)


def rng_seed(seed) -> int:
    """A non-negative 31-bit seed for libraries that want one (faiss)."""
    return int(seed) % (2 ** 31 - 1)


# --------------------------------------------------------------------------- tiled similarity kernels
def _blocks(n_rows: int, n_cols: int, tile: int | None = None):
    tile = int(tile or TILE)  # read at call time, so tests can shrink TILE
    cols = max(1, min(n_cols, 4 * math.isqrt(tile)))
    rows = max(1, min(n_rows, tile // cols))
    return rows, cols


@torch.no_grad()
def topk_sim(q: torch.Tensor, x: torch.Tensor, k: int, *, q_index: torch.Tensor | None = None,
             col_valid: torch.Tensor | None = None, tile: int | None = None):
    """The k most similar rows of ``x`` for each row of ``q`` -> (sims, cols), each (len(q), k), best first.

    ``q_index[i]`` (optional) is the row of ``x`` that query i is, excluded from its own neighbours;
    ``col_valid`` (optional bool, len(x)) excludes columns. Excluded/missing slots get sim -inf, col -1.
    """
    nq, n = q.shape[0], x.shape[0]
    k = int(k)
    out_v = torch.full((nq, k), float("-inf"), device=q.device)
    out_i = torch.full((nq, k), -1, dtype=torch.long, device=q.device)
    if nq == 0 or k == 0:
        return out_v, out_i
    rb, cb = _blocks(nq, n, tile)
    for r0 in range(0, nq, rb):
        r1 = min(nq, r0 + rb)
        best_v, best_i = out_v[r0:r1], out_i[r0:r1]
        for c0 in range(0, n, cb):
            c1 = min(n, c0 + cb)
            s = q[r0:r1] @ x[c0:c1].T
            if col_valid is not None:
                s[:, ~col_valid[c0:c1]] = float("-inf")
            if q_index is not None:
                qi = q_index[r0:r1]
                inside = (qi >= c0) & (qi < c1)
                if inside.any():
                    rows = torch.nonzero(inside).squeeze(1)
                    s[rows, qi[rows] - c0] = float("-inf")
            kk = min(k, c1 - c0)
            v, i = s.topk(kk, dim=1)
            cat_v = torch.cat([best_v, v], 1)
            cat_i = torch.cat([best_i, i + c0], 1)
            sel_v, pos = cat_v.topk(k, dim=1)
            best_v, best_i = sel_v, cat_i.gather(1, pos)
        best_i[torch.isinf(best_v)] = -1
        out_v[r0:r1], out_i[r0:r1] = best_v, best_i
    return out_v, out_i


@torch.no_grad()
def nearest_sim(q: torch.Tensor, x: torch.Tensor, *, col_valid: torch.Tensor | None = None,
                tile: int | None = None):
    """The most similar row of ``x`` for each row of ``q`` -> (sims, cols); the first column on exact ties."""
    nq, n = q.shape[0], x.shape[0]
    out_v = torch.full((nq,), float("-inf"), device=q.device)
    out_i = torch.full((nq,), -1, dtype=torch.long, device=q.device)
    rb, cb = _blocks(nq, n, tile)
    for r0 in range(0, nq, rb):
        r1 = min(nq, r0 + rb)
        best_v, best_i = out_v[r0:r1], out_i[r0:r1]
        for c0 in range(0, n, cb):
            c1 = min(n, c0 + cb)
            s = q[r0:r1] @ x[c0:c1].T
            if col_valid is not None:
                s[:, ~col_valid[c0:c1]] = float("-inf")
            v, i = s.max(dim=1)  # first maximum within the tile
            better = v > best_v  # strict: an earlier tile keeps its tie
            best_v = torch.where(better, v, best_v)
            best_i = torch.where(better, i + c0, best_i)
        out_v[r0:r1], out_i[r0:r1] = best_v, best_i
    return out_v, out_i


@torch.no_grad()
def assign_nearest(x: torch.Tensor, c: torch.Tensor, tile: int | None = None):
    """Nearest centre (max similarity, lowest centre index on exact ties) of every row -> (labels, sims)."""
    sims, labels = nearest_sim(x, c, tile=tile)
    return labels, sims


@torch.no_grad()
def max_sim_other_label(x: torch.Tensor, labels: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """For each row, the largest similarity to a row with a different label (-inf when there is none)."""
    n = x.shape[0]
    out = torch.full((n,), float("-inf"), device=x.device)
    rb, cb = _blocks(n, n, tile)
    for r0 in range(0, n, rb):
        r1 = min(n, r0 + rb)
        best = out[r0:r1]
        for c0 in range(0, n, cb):
            c1 = min(n, c0 + cb)
            s = x[r0:r1] @ x[c0:c1].T
            s[labels[r0:r1, None] == labels[None, c0:c1]] = float("-inf")
            best = torch.maximum(best, s.max(1).values)
        out[r0:r1] = best
    return out


# --------------------------------------------------------------------------- spherical k-means
@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32, unit rows
    labels: np.ndarray  # (N,) int64: nearest final centroid of every row
    sims: np.ndarray  # (N,) float32: similarity to it
    backend: str
    iterations: int
    seconds: float

    @property
    def objective(self) -> float:
        """Mean cosine similarity of the rows to their centroid (spherical k-means maximises it)."""
        return float(np.mean(self.sims, dtype=np.float64))


def _faiss_gpus() -> int:
    try:
        import faiss

        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        return 0


def choose_backend(method: str, backend: str, device: torch.device) -> str:
    """``auto``: faiss on the CPU; on a GPU, faiss-GPU if the installed faiss has it, else the torch one."""
    if backend not in KMEANS_BACKENDS:
        raise BadInputError(f"{method}: option kmeans_backend must be auto, faiss or torch, got {backend!r}")
    if backend == "auto":
        return "faiss" if device.type == "cpu" or _faiss_gpus() > 0 else "torch"
    if backend == "faiss" and device.type == "cuda" and _faiss_gpus() == 0:
        raise BadInputError(f"{method}: kmeans_backend=faiss on a GPU needs faiss with GPU support "
                            "(pip install faiss-gpu-cu12, or conda install -c pytorch faiss-gpu); "
                            "or use kmeans_backend=torch")
    return backend


def spherical_kmeans(x: np.ndarray, k: int, *, seed: int, niter: int = 25, backend: str = "faiss",
                     device: torch.device = torch.device("cpu"), init: str = "random",
                     max_points_per_centroid: int | None = None) -> KMeansResult:
    """Spherical k-means (unit centroids, assignment by max cosine) of the rows of ``x`` into ``k`` clusters.

    Both backends: seeded uniform-random initial centroids (k distinct rows; ``init="kmeans++"`` is faiss
    only), Lloyd iterations until the assignment stops changing or ``niter``, empty clusters repaired (faiss
    splits a big cluster; torch re-seeds at the worst-fitting rows, as scikit-learn does). No subsampling
    unless ``max_points_per_centroid`` is given. The returned labels are w.r.t. the final centroids.
    """
    t0 = time.perf_counter()
    n, d = x.shape
    if not 1 <= k <= n:
        raise BadInputError(f"k-means: cannot make {k} clusters of {n} samples")
    if backend == "faiss":
        import faiss

        kw = dict(niter=int(niter), spherical=True, seed=rng_seed(seed), min_points_per_centroid=1,
                  max_points_per_centroid=int(max_points_per_centroid or n), verbose=False)
        if init == "kmeans++":
            kw["init_method"] = 1
        elif init != "random":
            raise BadInputError(f"k-means: init must be random or kmeans++, got {init!r}")
        if device.type == "cuda":
            kw["gpu"] = True
        km = faiss.Kmeans(d, int(k), **kw)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
        cent = np.asarray(km.centroids, dtype=np.float32)
        iters = len(km.iteration_stats or [])
        dev = device
    elif backend == "torch":
        if init != "random":
            raise BadInputError("k-means: the torch backend only has init=random (kmeans++ is faiss only)")
        cent, iters = _kmeans_torch(x, int(k), seed=seed, niter=int(niter), device=device)
        dev = device
    else:
        raise BadInputError(f"k-means: unknown backend {backend!r}")
    cent = cent / np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    xt = as_tensor(x, dev)
    labels, sims = assign_nearest(xt, as_tensor(np.ascontiguousarray(cent, dtype=np.float32), dev))
    return KMeansResult(cent.astype(np.float32), labels.cpu().numpy().astype(np.int64), sims.cpu().numpy(),
                        backend + ("-gpu" if dev.type == "cuda" else ""), iters, time.perf_counter() - t0)


@torch.no_grad()
def _kmeans_torch(x_np: np.ndarray, k: int, *, seed: int, niter: int, device: torch.device):
    """Lloyd iterations of spherical k-means in torch; deterministic (sums by one-hot matmul, no atomics)."""
    n, d = x_np.shape
    x = as_tensor(x_np, device)
    rng = np.random.default_rng(seed)
    c = x[torch.as_tensor(rng.choice(n, k, replace=False), device=device)].clone()
    prev = None
    it = 0
    rows = max(1, TILE // max(k, d, 1))
    for it in range(1, niter + 1):
        labels, sims = assign_nearest(x, c)
        if prev is not None and torch.equal(labels, prev):
            break
        prev = labels
        sums = torch.zeros((k, d), device=device)
        for r0 in range(0, n, rows):
            lab = labels[r0:r0 + rows]
            onehot = torch.zeros((lab.shape[0], k), device=device)
            onehot[torch.arange(lab.shape[0], device=device), lab] = 1.0
            sums += onehot.T @ x[r0:r0 + rows]
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel():  # re-seed empty clusters at the rows that fit their centre worst
            worst = torch.argsort(sims, stable=True)[:empty.numel()]
            sums[empty] = x[worst]
        c = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return c.cpu().numpy(), it


@torch.no_grad()
def nearest_unique(x: torch.Tensor, c: torch.Tensor) -> tuple[np.ndarray, int]:
    """For every centre, the real row nearest to it, all distinct -> (rows, number of centres that lost).

    (Nearest = most similar, the lowest row index on exact ties.)

    Round after round each unassigned centre proposes its nearest row not yet taken; a row wanted by
    several centres goes to the most similar one (lowest centre index on exact ties), the others propose
    again next round. So a centre whose nearest row no other centre wants always gets that row.
    """
    k, n = c.shape[0], x.shape[0]
    if k > n:
        raise BadInputError(f"cannot give {k} centres distinct samples from {n}")
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    rows = np.full(k, -1, dtype=np.int64)
    pending = np.arange(k)
    first_round = True
    lost = 0
    while pending.size:
        sims, idx = nearest_sim(c[torch.as_tensor(pending, device=c.device)], x,
                                col_valid=None if first_round else ~taken)
        s, r = sims.cpu().numpy(), idx.cpu().numpy()
        order = np.lexsort((pending, -s.astype(np.float64)))  # most similar first, then centre index
        won = np.zeros(pending.size, dtype=bool)
        claimed = set()
        for j in order:
            if r[j] >= 0 and r[j] not in claimed:
                claimed.add(int(r[j]))
                won[j] = True
        rows[pending[won]] = r[won]
        taken[torch.as_tensor(r[won], device=x.device)] = True
        if first_round:
            lost = int((~won).sum())
        pending = pending[~won]
        first_round = False
    return rows, lost
