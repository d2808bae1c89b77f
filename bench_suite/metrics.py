"""Selection-quality metrics on features (no labels): the paper's Eq. 16 EMD and the covering radius."""

from __future__ import annotations

import numpy as np
import torch


def nearest_similarity(features, selected: np.ndarray, block: int = 8192) -> np.ndarray:
    """For every pool row, the cosine similarity to its most similar selected feature (blocked)."""
    sel = torch.from_numpy(np.ascontiguousarray(selected, dtype=np.float32))
    out = np.empty(len(features), dtype=np.float32)
    for start in range(0, len(features), block):
        f = torch.as_tensor(np.array(features[start:start + block], dtype=np.float32))  # a memmap is read-only
        out[start:start + len(f)] = (f @ sel.T).max(dim=1).values.numpy()
    return out


def selection_emd(features, selected_rows) -> float:
    """Eq. 16: (1/N) sum_i sqrt(2 - 2 sim(f_i, nearest selected)) - lower is a closer cover of the pool."""
    sim = nearest_similarity(features, np.asarray(features[np.sort(selected_rows)]))
    return float(np.sqrt(np.clip(2.0 - 2.0 * sim.astype(np.float64), 0.0, None)).mean())


def covering_radius(features, selected_rows) -> float:
    """Largest distance from any pool sample to its nearest selected sample (what k-center minimises)."""
    sim = nearest_similarity(features, np.asarray(features[np.sort(selected_rows)]))
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * float(sim.min()))))
