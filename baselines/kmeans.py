"""K-Means: the ActiveFT paper's baseline (Xie et al., CVPR 2023, Sec. 4.1 item 3): "We conduct K-Means over
the feature pool and choose samples closest to the centers. K equals to the budget size B."

Algorithm: spherical k-means (unit-norm centroids, assignment by cosine similarity - the features live on
the unit sphere and the encoder was trained with a cosine geometry) into K = B clusters over the whole pool
(no subsampling), seeded; then every centre takes the real sample most similar to it. Picks are made
distinct: a sample that is the nearest of several centres goes to the most similar centre and each other
centre takes its next nearest unused sample (baselines._labelfree.nearest_unique; ``info["conflicts"]`` counts
such centres). A centre whose nearest sample no other centre wants always gets exactly that sample.

Hyper-parameters (``--set key=value``): ``niter`` = 25 Lloyd iterations at most (faiss's default; stops
earlier when the assignment is stable), ``init`` = random (k distinct random rows, faiss's default;
``kmeans++`` is available on the faiss CPU backend), ``kmeans_backend`` = auto | faiss | torch,
``device`` = auto | cpu | cuda, ``max_points_per_centroid`` = None (cluster every sample; an integer lets
faiss subsample the pool to K x that many points).

Why faiss (measured here, 2 CPU cores shared with other jobs - load average 4-8, so absolute times are
pessimistic; d = 384 synthetic clustered unit vectors, float32; at most 25 Lloyd iterations, each library
stopping earlier at convergence; faiss-cpu 1.15.1, scikit-learn 1.9.1; seconds for a full clustering,
(iterations run) and the mean cosine distance to the nearest centre reached):

    N    K     faiss spherical    sklearn KMeans      sklearn KMeans       sklearn MiniBatch   ours, torch CPU
               (random init)      (random init)       (k-means++ init)     (batch 5000)        (random init)
    10k  100   0.78 (8)  .4044    0.33 (5)  .4109     13.4 (6)   .3982     9.0 (31)  .4036     1.6 (8)   .4010
    10k  1000  0.95 (4)  .1588    0.58 (3)  .1589     97.5 (2)   .1585     58.8 (26) .1612     1.3 (3)   .1588
    50k  100   1.75 (7)  .4100    0.95 (6)  .4132     111.9 (6)  .4026     50.2 (58) .4098     1.9 (7)   .4102
    50k  1000  9.54 (12) .1756    7.65 (9)  .1756     413.2 (10) .1755     150.6 (47) .1772    19.9 (10) .1756

(An earlier run at a lower load, 20 iterations at most: faiss 0.13 / 0.62 / 1.22 / 9.91 s, sklearn random
init 0.24 / 0.46 / 0.81 / 5.78 s, sklearn k-means++ 15.9 / 173.7 / 73.0 / 215.9 s, MiniBatch 6.9 / 43.0 /
9.6 / 339.4 s, same order of rows.) So: one Lloyd iteration costs about the same in faiss and scikit-learn
(both are a BLAS GEMM per block: 0.80 vs 0.85 s per iteration at N = 50k, K = 1000), and scikit-learn with
random init is even a little faster in total because it declares convergence sooner. What decides it:
scikit-learn has no spherical (cosine) k-means, its default k-means++ seeding makes a clustering 15-100x
slower than faiss's at these K, MiniBatchKMeans is slower still and less accurate at large K, and faiss
runs the same clustering on GPUs. So faiss (``spherical=True``) is the default on the CPU.

At ImageNet size on a GPU node (N = 1.28M, d = 384, K = B = 12.8k at 1% or 64k at 5%): one Lloyd
iteration is an N x K x d GEMM (1.3e13 flop at 1%): minutes per iteration on a few CPU cores, of the order
of a second on one modern GPU (an estimate from the flop count - no GPU was available to measure it here);
the features (2 GB) and centroids fit in GPU memory. Two ways, both picked by
``device=auto`` when torch sees a GPU:
  - faiss-GPU: install the GPU build of faiss (``pip install faiss-gpu-cu12`` or
    ``conda install -c pytorch faiss-gpu``) in place of faiss-cpu; ``kmeans_backend=auto`` then uses
    ``faiss.Kmeans(..., spherical=True, gpu=True)`` (all visible GPUs).
  - torch: with only the project's pinned torch (CUDA build) installed, ``kmeans_backend=auto`` falls back to
    the torch implementation in baselines/_labelfree.py (same algorithm: seeded random init, Lloyd, spherical,
    tiles of 16M similarities, deterministic sums via one-hot GEMMs).
The nearest-sample step is one more tiled K x N pass on the same device. ``auto`` is the rank's local GPU;
under a distributed launch rank 0 clusters the whole pool and every rank gets its selection. For example:
``python -m bench_suite.cli.select --features STORE --ratio 0.01 --method kmeans --set device=cuda --out sel.json``.

Departures from the paper: the paper does not say which k-means implementation or initialisation it used; we
use spherical k-means (cosine) rather than Euclidean k-means, matching its cosine FDS and the
unit-norm features, with faiss's random initialisation (k-means++ seeding is optional) for speed at scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from baselines._labelfree import (KMEANS_BACKENDS, KMEANS_INITS, as_tensor, choose_backend, nearest_unique, pool_array,
                                  spherical_kmeans)
from bench_suite.methods import Pool, Selector, register
from bench_suite.options import opt


@register
class KMeansSelector(Selector):
    name = "kmeans"
    label = "K-Means"
    description = "K-Means (ActiveFT paper baseline): spherical k-means with K = B, the sample nearest each centre"
    label_free = True

    @dataclass
    class Options:
        niter: int = opt(25, minimum=1, doc="Lloyd iterations at most (stops earlier once the assignment is stable)")
        init: str = opt("random", choices=KMEANS_INITS, doc="initial centroids (kmeans++: faiss CPU only)")
        kmeans_backend: str = opt("auto", choices=KMEANS_BACKENDS, doc="auto: faiss; torch on a GPU without faiss-gpu")
        device: str = opt("auto", role="runtime", doc="auto (the rank's local GPU, else cpu) | cpu | cuda | cuda:N")
        max_points_per_centroid: int | None = opt(None, minimum=1, doc="None: cluster every sample; else faiss "
                                                                       "subsamples the pool to K x this")

    def choose(self, pool: Pool):
        o, budget, device = self.options, pool.budget, pool.device
        backend = choose_backend(self.name, o.kmeans_backend, device)
        x = pool_array(pool.store)
        km = spherical_kmeans(x, budget, seed=pool.seed, niter=o.niter, backend=backend, device=device, init=o.init,
                              max_points_per_centroid=o.max_points_per_centroid)
        rows, conflicts = nearest_unique(as_tensor(x, device), as_tensor(km.centroids, device))
        self.centroids_, self.clusters_ = km.centroids, km.labels
        sizes = np.bincount(km.labels, minlength=budget)
        info = {"backend": km.backend, "iterations": km.iterations, "kmeans_seconds": round(km.seconds, 4),
                "mean_cos_to_centre": km.objective, "conflicts": conflicts,
                "empty_clusters": int((sizes == 0).sum()), "largest_cluster": int(sizes.max())}
        return rows, info
