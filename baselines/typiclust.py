"""TypiClust (Hacohen, Dekel & Weinshall, "Active Learning on a Budget: Opposite Strategies Suit High and Low
Budgets", ICML 2022), the cold-start (no labelled set) variant, on the pretrained features.

Not in the ActiveFT paper: a stronger label-free cold-start method that came after it and that the field
compares against now. Faithful to the authors' released code (github.com/avihu111/TypiClust,
deep-al/pycls/al/typiclust.py, class TypiClust):

1. Cluster the pool into K = min(|L| + B, max_clusters) clusters; in active finetuning |L| = 0, so
   K = min(B, 500).
2. Drop clusters with ``size <= min_cluster_size`` (= 5; the code keeps ``cluster_size > MIN_CLUSTER_SIZE``).
3. Order the remaining clusters by number of labelled samples (all 0 here), then size, largest first.
4. For pick i = 0 .. B-1, visit cluster ``order[i mod len(order)]`` (so with B > K clusters are revisited
   round robin, i.e. always the largest least-covered cluster); among its not-yet-picked samples take the
   most typical one, typicality(x) = 1 / (mean squared L2 distance from x to its k nearest neighbours
   within the cluster's not-yet-picked samples + 1e-5), k = min(20, m // 2) for m remaining samples
   (the code's ``min(K_NN, len(indices) // 2)``; faiss ``IndexFlatL2`` returns squared distances, which on
   the unit sphere are 2 - 2 cos). Ties: first sample in pool order (``argmax``).

Hyper-parameters: ``max_clusters`` = 500, ``min_cluster_size`` = 5, ``knn`` = 20 (the paper's and code's
values); k-means options as in baselines/kmeans.py (``niter`` 25, ``init`` random, ``kmeans_backend``,
``device``).

Implementation: per visited cluster, the k-nearest-neighbour lists of its remaining samples are computed
once in tiles (O(m k) memory; never m x m at once, never N x N) and updated incrementally after each pick
(only samples that had the picked one among their neighbours are recomputed; all of them when k changes),
which gives exactly the typicality the original recomputes from scratch.

Departures from the original, and why:
- None in the typicality itself. (The paper writes typicality with plain L2 distances; we follow the code,
  whose faiss ``IndexFlatL2`` search returns squared L2 distances - the two can rank samples differently.)
- Clustering: spherical k-means (faiss, random init; cosine geometry, unit centroids) instead of the code's
  scikit-learn ``KMeans`` (K <= 50) / ``MiniBatchKMeans(batch_size=5000)`` (K > 50) on the same unit-norm
  features: one k-means for every label-free baseline here, and at these K scikit-learn's KMeans (k-means++
  seeding) is 15-100x and MiniBatchKMeans 10-60x slower than faiss on our 2 cores (timings in
  baselines/kmeans.py). The paper also offers SCAN clustering; we use its k-means variant
  (SCAN would need training the representation).
- Edge cases the original cannot handle (it crashes): if every cluster is small (all <= 5 samples, e.g. B
  close to N) or the kept clusters run out of samples, picking continues round robin over the skipped
  small clusters, largest first (``info["small_cluster_picks"]`` counts them); an emptied cluster leaves the
  rotation; a cluster with one sample left gives that sample (k = 0 in the original is undefined).
- The largest cluster is first regardless of pandas' unstable sort: equal sizes are ordered by cluster
  index (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baselines._labelfree import (KMEANS_BACKENDS, KMEANS_INITS, as_tensor, choose_backend, pool_array,
                                  spherical_kmeans, topk_sim)
from bench_suite.methods import Pool, Selector, register
from bench_suite.options import opt


class ClusterTypicality:
    """The remaining samples of one cluster and their k-NN lists; picks the most typical one at a time."""

    def __init__(self, rows: np.ndarray, x: torch.Tensor, knn: int):
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))  # pool rows, ascending (the original's order)
        self.xc = x[torch.as_tensor(self.rows, device=x.device)]
        self.alive = torch.ones(len(self.rows), dtype=torch.bool, device=x.device)
        self.knn = knn
        self.k = -1
        self.nbr_sim = None  # (m, k) similarities of each sample's k nearest alive neighbours
        self.nbr_idx = None  # (m, k) their local indices

    @property
    def remaining(self) -> int:
        return int(self.alive.sum())

    def _lists(self, local: torch.Tensor):
        return topk_sim(self.xc[local], self.xc, self.k, q_index=local, col_valid=self.alive)

    def typicality(self) -> np.ndarray:
        """Typicality of every sample (-inf for picked ones), refreshing the neighbour lists as needed."""
        m = self.remaining
        k = min(self.knn, m // 2)
        dev = self.xc.device
        if k != self.k or self.nbr_sim is None:
            self.k = k
            self.nbr_sim, self.nbr_idx = self._lists(torch.arange(len(self.rows), device=dev))
        if k == 0:
            mean_d = torch.zeros(len(self.rows), device=dev)
        else:
            mean_d = (2.0 - 2.0 * self.nbr_sim).clamp_min(0.0).mean(1)
        typ = 1.0 / (mean_d + 1e-5)
        typ[~self.alive] = float("-inf")
        return typ.cpu().numpy()

    def pick(self) -> int | None:
        """Remove and return (as a pool row) the most typical remaining sample; None when empty."""
        if self.remaining == 0:
            return None
        local = int(np.argmax(self.typicality()))
        self.alive[local] = False
        new_k = min(self.knn, self.remaining // 2)
        if new_k == self.k and self.k > 0:  # only lists that contained the picked sample change
            hit = torch.nonzero((self.nbr_idx == local).any(1) & self.alive).squeeze(1)
            if hit.numel():
                s, i = self._lists(hit)
                self.nbr_sim[hit], self.nbr_idx[hit] = s, i
        return int(self.rows[local])


def typiclust_rows(x_np: np.ndarray, labels: np.ndarray, budget: int, *, min_cluster_size: int, knn: int,
                   device: torch.device):
    """TypiClust's selection given cluster labels.

    Returns (pool rows in pick order, picks from small clusters, kept clusters, skipped small clusters).
    """
    sizes = np.bincount(labels)
    cids = np.flatnonzero(sizes)
    order = sorted(cids.tolist(), key=lambda c: (-sizes[c], c))
    kept = [c for c in order if sizes[c] > min_cluster_size]
    small = [c for c in order if sizes[c] <= min_cluster_size]
    x = as_tensor(x_np, device)
    sort_idx = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=len(sizes)))])
    state: dict[int, ClusterTypicality] = {}

    def cluster(c):
        if c not in state:
            state[c] = ClusterTypicality(sort_idx[bounds[c]:bounds[c + 1]], x, knn)
        return state[c]

    rows, from_small = [], 0
    rotation, using_small, pos = kept, False, 0
    while len(rows) < budget:
        if not rotation:
            if using_small or not small:
                raise AssertionError("typiclust: ran out of samples (cannot happen for budget <= N)")
            rotation, using_small, pos = small, True, 0
            continue
        c = rotation[pos]
        r = cluster(c).pick()
        if r is None:  # emptied: leave the rotation
            rotation = [q for q in rotation if q != c]
            pos = pos % len(rotation) if rotation else 0
            continue
        rows.append(r)
        from_small += int(using_small)
        pos = (pos + 1) % len(rotation)
    return np.asarray(rows, dtype=np.int64), from_small, len(kept), len(small)


@register
class TypiClust(Selector):
    name = "typiclust"
    label = "TypiClust"
    description = "TypiClust (Hacohen et al., ICML 2022): most typical sample of the largest uncovered k-means clusters"
    label_free = True

    @dataclass
    class Options:
        max_clusters: int = opt(500, minimum=1, doc="K = min(B, max_clusters) k-means clusters")
        min_cluster_size: int = opt(5, minimum=0, doc="clusters of at most this many samples are skipped")
        knn: int = opt(20, minimum=1, doc="neighbours of the typicality (min(knn, m // 2) for m samples left)")
        niter: int = opt(25, minimum=1, doc="k-means: Lloyd iterations at most")
        init: str = opt("random", choices=KMEANS_INITS, doc="k-means: initial centroids (kmeans++: faiss CPU only)")
        kmeans_backend: str = opt("auto", choices=KMEANS_BACKENDS, doc="auto: faiss; torch on a GPU without faiss-gpu")
        device: str = opt("auto", role="runtime", doc="auto (the rank's local GPU, else cpu) | cpu | cuda | cuda:N")

    def choose(self, pool: Pool):
        o, budget, device = self.options, pool.budget, pool.device
        backend = choose_backend(self.name, o.kmeans_backend, device)
        k_clusters = min(budget, o.max_clusters)
        x = pool_array(pool.store)
        km = spherical_kmeans(x, k_clusters, seed=pool.seed, niter=o.niter, backend=backend, device=device,
                              init=o.init)
        rows, from_small, n_kept, n_small = typiclust_rows(x, km.labels, budget, min_cluster_size=o.min_cluster_size,
                                                           knn=o.knn, device=device)
        self.clusters_ = km.labels
        info = {"clusters": k_clusters, "kept_clusters": n_kept, "small_clusters_skipped": n_small,
                "small_cluster_picks": from_small, "backend": km.backend, "iterations": km.iterations,
                "kmeans_seconds": round(km.seconds, 4)}
        return rows, info
