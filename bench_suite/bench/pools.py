"""Seeded synthetic feature pools for benchmarks: clusters on the unit sphere shaped like real embeddings."""

from __future__ import annotations

import numpy as np


def clustered_sphere(n: int, d: int = 384, classes: int = 100, *, seed: int = 0, rank: int = 32,
                     spread: float = 0.9, noise: float = 0.35, shared: float = 0.5, chunk: int = 65536,
                     out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An N x d float32 pool of unit rows in ``classes`` clusters, and the cluster labels.

    Each cluster is a centre (random direction plus a shared component, so clusters are not orthogonal -
    real features have a common mean) with a random ``rank``-dimensional anisotropic spread and a small
    isotropic noise. With the defaults, same-cluster cosine similarity is about 0.5 and cross-cluster about
    0.1, similar to DINO ViT-S/16 CLS features. Generated in chunks (ImageNet size fits in 2 GiB); ``out``
    may be a preallocated (e.g. memmap) N x d float32 array.
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(d)
    g /= np.linalg.norm(g)
    mu = rng.standard_normal((classes, d))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    mu = mu + shared * g
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    bases = np.stack([np.linalg.qr(rng.standard_normal((d, rank)))[0] for _ in range(classes)])  # (k, d, r)
    scales = spread / np.sqrt(rank) * (0.5 + rng.random((classes, rank)))
    labels = rng.integers(0, classes, n)
    feats = np.empty((n, d), dtype=np.float32) if out is None else out
    for start in range(0, n, chunk):
        lab = labels[start:start + chunk]
        m = len(lab)
        z = rng.standard_normal((m, rank)) * scales[lab]
        x = mu[lab] + noise / np.sqrt(d) * rng.standard_normal((m, d))
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], np.arange(classes + 1))
        for c in range(classes):
            rows = order[bounds[c]:bounds[c + 1]]
            if len(rows):
                x[rows] += z[rows] @ bases[c].T
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        feats[start:start + m] = x.astype(np.float32)
    return feats, labels.astype(np.int64)
