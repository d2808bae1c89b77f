"""ProbCover (Yehuda, Dekel, Hacohen & Weinshall, "Active Learning Through a Covering Lens", NeurIPS 2022),
the cold-start (no labelled set) variant, on the pretrained features.

Not in the ActiveFT paper: a stronger label-free cold-start method that came after it. Faithful to the paper
and the authors' released code (github.com/avihu111/TypiClust, deep-al/pycls/al/prob_cover.py):

1. delta-ball graph: a directed edge x -> y iff ||f_x - f_y||_2 < delta (L2 on the unit-norm features, i.e.
   cosine similarity > 1 - delta^2 / 2); every sample covers itself.
2. Greedy max coverage: B times, pick the sample whose ball holds the most not-yet-covered samples (the
   highest out-degree once edges into covered samples are removed), then mark its ball covered.
   Ties are broken uniformly at random with the seed and already-picked samples are excluded, as in the
   authors' later version of the code (``degrees[curr_l_set] = -1; cur = np.random.choice(argmax set)``;
   the first release used ``degrees.argmax()`` with a comment that the paper randomises). Consequently, once
   everything is covered (max degree 0), the remaining picks are uniform random among unpicked samples -
   the original's fallback; ``info["random_picks"]`` counts them.
3. delta by the paper's purity heuristic: cluster the features with k-means into K = number of classes
   (``num_classes`` option, else the store's ``meta["num_classes"]`` / ``len(meta["classes"])``, else 10)
   pseudo-labels; a ball B_delta(x) is pure if every sample in it has x's pseudo-label; purity(delta) is the
   fraction of pure balls; delta = the largest delta with purity >= alpha (= 0.95). Rather than searching
   delta numerically (e.g. over a grid), we compute that largest value exactly: B_delta(x) is pure iff
   delta <= d_x, the distance from x to the nearest sample with another pseudo-label, so
   purity(delta) = #{d_x >= delta} / N and the largest admissible delta is the ceil(alpha N)-th largest d_x
   (one tiled pass, O(N) memory). ``delta=...`` overrides it.

Hyper-parameters: ``alpha`` = 0.95 (the paper), ``num_classes`` (see above), ``delta`` = None (purity
heuristic), k-means options as in baselines/kmeans.py (``niter`` 25, ``init`` random, ``kmeans_backend``,
``device``), ``max_edges`` = 400M (see below).

Implementation and memory: the graph is built in tiles of at most 16M similarities (never N x N) and kept
sparse, as the original keeps an edge list: CSR out-edges and CSC in-edges with int32 indices, about 10 bytes
per edge once built (up to about 14 while building). The greedy decrements the out-degree of every x with
x -> y when y becomes covered, which is exactly the original's edge removal. ``max_edges`` stops the build
early with a clear error instead of exhausting memory (choose a smaller ``delta`` or ``alpha`` closer to 1,
or raise ``max_edges``). ``info``: ``delta`` (L2),
``purity`` (at that delta), ``edges``, ``coverage`` (fraction of the pool within delta of a pick, after the B
picks), ``random_picks``; the per-pick coverage curve is kept on the selector as ``coverage_`` (and the
pseudo-labels as ``pseudo_labels_``).

Departures from the original, and why:
- Pseudo-labels from spherical k-means (faiss; cosine geometry), like every label-free baseline here; the
  paper used k-means on its self-supervised features too, library unspecified.
- delta: the exact largest admissible value (same rule, no numerical search).
- The original builds the graph in batches of 500 rows and silently drops the last partial batch
  (``range(N // batch_size)``); every sample is in the graph here.

Speed: the k-means, delta and graph do not depend on the budget; they are kept (up to 256 MiB of graphs) for
the next selection on the same pool (features and ids by content), seed and options in this process, so a
table's cells at several ratios build them once (``info["graph_reused"]``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from baselines._labelfree import (KMEANS_BACKENDS, KMEANS_INITS, ProcessMemo, _blocks, as_tensor, choose_backend,
                                  content_key, fraction, max_sim_other_label, pool_array, spherical_kmeans)
from bench_suite.errors import BadInputError
from bench_suite.methods import Pool, Selector, register
from bench_suite.options import opt

log = logging.getLogger(__name__)
# the k-means, delta and graph of a pool (per seed), for the next selection on it in this process (budgets differ)
_GRAPHS = ProcessMemo(256 << 20)


def _positive_delta(delta) -> str | None:
    return None if delta > 0 else "a positive number (L2 on unit features)"


def purity_threshold(max_other: np.ndarray, alpha: float) -> float:
    """Similarity threshold t (balls are {s > t}) of the largest delta whose purity is >= alpha.

    ``max_other[x]`` = largest similarity of x to a sample with another pseudo-label. The ball {s > t} of x is
    pure iff max_other[x] <= t, so purity(t) = #{max_other <= t} / N; the smallest admissible t (largest
    delta) is the ceil(alpha N)-th smallest max_other.
    """
    n = len(max_other)
    need = min(n, max(1, math.ceil(alpha * n - 1e-9)))
    return float(np.partition(max_other, need - 1)[need - 1])


def sim_to_delta(t: float) -> float:
    return float(math.sqrt(max(0.0, 2.0 - 2.0 * t))) if math.isfinite(t) else 2.0


@torch.no_grad()
def delta_graph(x: torch.Tensor, thr: float, *, max_edges: int, tile: int | None = None):
    """Directed delta-ball graph {x -> y : <x, y> > thr} plus self-loops, as CSR (indptr int64, indices int32)."""
    import scipy.sparse as sp

    n = x.shape[0]
    rb, cb = _blocks(n, n, tile)
    counts = np.zeros(n, dtype=np.int64)
    chunks = []
    total = 0
    for r0 in range(0, n, rb):
        r1 = min(n, r0 + rb)
        rows_parts, cols_parts = [], []
        for c0 in range(0, n, cb):
            c1 = min(n, c0 + cb)
            mask = (x[r0:r1] @ x[c0:c1].T) > thr
            lo, hi = max(r0, c0), min(r1, c1)
            if lo < hi:  # every sample is in its own ball
                diag = torch.arange(lo, hi, device=x.device)
                mask[diag - r0, diag - c0] = True
            r, c = torch.nonzero(mask, as_tuple=True)
            total += int(r.numel())
            if total > max_edges:
                raise BadInputError(f"probcover: the delta-ball graph has more than max_edges={max_edges} edges "
                                    f"(delta too large for this pool); set a smaller delta, an alpha closer to 1, "
                                    f"or raise max_edges (about 10 bytes per edge)")
            rows_parts.append((r + r0).to(torch.int32).cpu().numpy())
            cols_parts.append((c + c0).to(torch.int32).cpu().numpy())
        rr = np.concatenate(rows_parts)
        cc = np.concatenate(cols_parts)
        order = np.argsort(rr, kind="stable")  # row-major; columns ascending within a row
        chunks.append(cc[order])
        counts[r0:r1] = np.bincount(rr - r0, minlength=r1 - r0)
    indices = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    graph = sp.csr_matrix((np.ones(len(indices), dtype=np.bool_), indices, indptr), shape=(n, n))
    return graph


def greedy_cover(graph, budget: int, rng: np.random.Generator):
    """ProbCover's greedy max coverage -> (rows, coverage after each pick, number of random picks)."""
    n = graph.shape[0]
    out_ptr, out_idx = graph.indptr, graph.indices
    inc = graph.tocsc()  # column y lists every x with x -> y
    in_ptr, in_idx = inc.indptr, inc.indices
    degree = np.diff(out_ptr).astype(np.int64)  # uncovered samples in each ball
    covered = np.zeros(n, dtype=bool)
    picked = np.zeros(n, dtype=bool)
    rows, curve, random_picks, n_covered = [], [], 0, 0
    for _ in range(budget):
        eff = np.where(picked, -1, degree)
        best = eff.max()
        ties = np.flatnonzero(eff == best)
        cur = int(ties[rng.integers(len(ties))]) if len(ties) > 1 else int(ties[0])
        random_picks += int(best == 0)
        nbrs = out_idx[out_ptr[cur]:out_ptr[cur + 1]]
        new = nbrs[~covered[nbrs]]
        if new.size:
            covered[new] = True
            n_covered += int(new.size)
            starts, ends = in_ptr[new], in_ptr[new + 1]
            src = np.concatenate([in_idx[s:e] for s, e in zip(starts.tolist(), ends.tolist())])
            if len(src) * 8 < n:
                np.subtract.at(degree, src, 1)
            else:
                degree -= np.bincount(src, minlength=n)
        picked[cur] = True
        rows.append(cur)
        curve.append(n_covered / n)
    return np.asarray(rows, dtype=np.int64), np.asarray(curve), random_picks


@register
class ProbCover(Selector):
    name = "probcover"
    label = "ProbCover"
    description = "ProbCover (Yehuda et al., NeurIPS 2022): greedy max coverage of delta-balls, delta by k-means purity"
    label_free = True

    @dataclass
    class Options:
        alpha: float = opt(0.95, check=fraction, doc="purity the delta must reach (the paper's 0.95)")
        num_classes: int | None = opt(None, minimum=2, doc="pseudo-classes of the purity heuristic (None: the "
                                                           "store's meta num_classes / classes, else 10)")
        delta: float | None = opt(None, check=_positive_delta, doc="ball radius (L2); None: the purity heuristic")
        niter: int = opt(25, minimum=1, doc="k-means: Lloyd iterations at most")
        init: str = opt("random", choices=KMEANS_INITS, doc="k-means: initial centroids (kmeans++: faiss CPU only)")
        kmeans_backend: str = opt("auto", choices=KMEANS_BACKENDS, doc="auto: faiss; torch on a GPU without faiss-gpu")
        device: str = opt("auto", role="runtime", doc="auto (the rank's local GPU, else cpu) | cpu | cuda | cuda:N")
        max_edges: int = opt(400_000_000, role="runtime", minimum=1,
                             doc="refuse a delta-ball graph larger than this (~10 B/edge)")

    def _num_classes(self, store) -> int:
        if self.options.num_classes is not None:
            return self.options.num_classes
        meta = store.meta or {}
        if meta.get("num_classes"):
            return int(meta["num_classes"])
        if meta.get("classes"):
            return len(meta["classes"])
        return 10

    def choose(self, pool: Pool):
        o, store, device = self.options, pool.store, pool.device
        backend = choose_backend(self.name, o.kmeans_backend, device)
        x_np = pool_array(store)
        n = x_np.shape[0]
        # everything before the greedy is the same for every budget: kept for this process's next selection
        key = (content_key(x_np, store.ids), None if o.delta is not None else pool.seed, self._num_classes(store),
               o.alpha, o.delta, o.niter, o.init, backend, str(device), o.max_edges)
        kept = _GRAPHS.get(key)
        reused = kept is not None
        if kept is None:
            kept = self._graph(x_np, pool.seed, backend, device, store)
            graph = kept[0]
            _GRAPHS.put(key, kept, graph.indices.nbytes + graph.data.nbytes + graph.indptr.nbytes + 8 * n)
        graph, thr, purity, info, pseudo = kept
        info = {**info, "graph_reused": reused}
        if pseudo is not None:
            self.pseudo_labels_ = pseudo
        rows, curve, random_picks = greedy_cover(graph, pool.budget, np.random.default_rng(pool.seed))
        self.coverage_, self.threshold_ = curve, thr
        self.delta_ = sim_to_delta(thr) if o.delta is None else o.delta
        info.update(delta=self.delta_, purity=purity, edges=int(graph.nnz),
                    mean_ball=round(graph.nnz / n, 3), coverage=float(curve[-1]), random_picks=random_picks)
        log.info("probcover: delta %.4f (purity %s), %d edges, coverage %.3f, %d random picks",
                 self.delta_, purity, graph.nnz, curve[-1], random_picks)
        return rows, info

    def _graph(self, x_np, seed, backend, device, store):
        """The delta-ball graph: (graph, similarity threshold, purity, info, pseudo-labels or None)."""
        o = self.options
        x = as_tensor(x_np, device)
        info, pseudo = {}, None
        if o.delta is None:
            k = min(self._num_classes(store), x_np.shape[0])
            km = spherical_kmeans(x_np, k, seed=seed, niter=o.niter, backend=backend, device=device, init=o.init)
            max_other = max_sim_other_label(x, as_tensor(km.labels, device)).cpu().numpy()
            thr = purity_threshold(max_other, o.alpha)
            if not math.isfinite(thr):  # one pseudo-class only: every ball is pure
                thr = -1.0 - 1e-6
            purity = float(np.mean(max_other <= thr))
            pseudo = km.labels
            info.update(pseudo_classes=k, backend=km.backend, kmeans_seconds=round(km.seconds, 4))
        else:
            thr = 1.0 - o.delta ** 2 / 2.0
            purity = None
        graph = delta_graph(x, thr, max_edges=o.max_edges)
        return graph, thr, purity, info, pseudo
