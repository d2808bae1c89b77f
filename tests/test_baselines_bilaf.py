"""BiLAF's own behaviour on real data (scikit-learn digits, L2-normalised pixels): cores kept, denoising drops
the sparse fringe, boundary picks score lower than the pool, allocation proportional, B = K is ActiveFT."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from bench_suite.methods import registry
from baselines.bilaf import _dist, allocate, boundary_picks, denoise, nearest_two_cores
from bench_suite.activeft import ActiveFT
from bench_suite.errors import BadInputError
from bench_suite.store import FeatureStore

CFG = {"core_pool_ratio": 0.005, "iters": 60}


@pytest.fixture(scope="module")
def digits():
    x = load_digits().data.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return FeatureStore(x, 1000 + 3 * np.arange(len(x)), None, {})


def test_cores_are_activefts_selection_and_all_kept(digits):
    sel = registry.get("bilaf", **CFG).select(digits, 60, seed=3)
    k = sel.info["cores"]
    assert k == 9 and sum(sel.info["allocation"]) == 60 and min(sel.info["allocation"]) >= 1
    core = ActiveFT(iters=60, progress=False).select(digits, k, seed=3)
    assert sorted(sel.info["core_ids"]) == sorted(core.ids.tolist())
    assert set(core.ids.tolist()) <= set(sel.ids.tolist())


def test_budget_equal_to_cores_is_activeft(digits):
    sel = registry.get("bilaf", cores=12, max_core_fraction=1.0, iters=60).select(digits, 12, seed=1)
    ref = ActiveFT(iters=60, progress=False).select(digits, 12, seed=1)
    assert sorted(sel.ids.tolist()) == sorted(ref.ids.tolist())


def test_denoise_drops_the_fringe_and_keeps_the_core(digits):
    x = torch.as_tensor(np.asarray(digits.features))
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(x), 300, replace=False))
    xc = x[torch.as_tensor(rows)]
    core = 17
    kept = denoise(xc, core, knn=10, growth=0.1, remove=0.1, min_size=10)
    assert kept[0] == core and len(np.unique(kept)) == len(kept) == int(300 * 0.9)  # 300 % 30 == 0: no leftovers
    dropped = np.setdiff1d(np.arange(300), kept)
    # the dropped members are the sparse fringe: farther from their 10 nearest kept members than the kept ones
    d = _dist(xc, xc[torch.as_tensor(kept)])
    knn_mean = d.topk(11, dim=1, largest=False).values[:, 1:].mean(1).numpy()
    assert knn_mean[dropped].mean() > knn_mean[kept].mean()
    small = denoise(xc[:7], 2, knn=10, growth=0.1, remove=0.1, min_size=10)
    assert sorted(small.tolist()) == list(range(7)) and small[0] == 2  # below min_size: nothing removed


def test_boundary_picks_score_lower_than_their_class(digits):
    x = torch.as_tensor(np.asarray(digits.features))
    core_rows = ActiveFT(iters=60, progress=False).select(digits, 9, seed=0).ids
    core_rows = (core_rows - 1000) // 3
    own, opp, b = nearest_two_cores(x, x[torch.as_tensor(core_rows)])
    j = int(torch.bincount(own).argmax())
    rows = np.flatnonzero(own.numpy() == j)
    rows = np.concatenate([[core_rows[j]], rows[rows != core_rows[j]]])
    xc = x[torch.as_tensor(rows)]
    picks = boundary_picks(xc, 0, b[torch.as_tensor(rows)], opp[torch.as_tensor(rows)], 9, 12, 1.1)
    assert picks[0] == 0 and len(set(picks)) == 12
    a = _dist(xc, xc).mean(1)
    bs = ((b[torch.as_tensor(rows)] - a) / torch.maximum(a, b[torch.as_tensor(rows)])).numpy()
    assert bs[picks[1:]].mean() < np.median(bs)  # nearer another pseudo-class than the typical member
    # the removal radius spreads them: no two picks are each other's nearest neighbours in the class
    d = _dist(xc[picks], xc[picks]).numpy() + np.eye(12) * 9
    assert d.min() > 0


def test_allocation_is_proportional_with_the_smallest_first():
    assert allocate(np.array([50, 30, 20]), 10).tolist() == [5, 3, 2]
    assert allocate(np.array([55, 25, 20]), 10).tolist() == [5, 3, 2]  # remainder 1 -> smallest allocation
    assert allocate(np.array([97, 2, 1]), 10).tolist() == [8, 1, 1]  # every core kept
    assert allocate(np.array([3, 2]), 5).tolist() == [3, 2]  # capped at the class size
    assert allocate(np.array([2, 100]), 10).tolist() == [1, 9]


def test_bad_options():
    for bad in ({"remove": 1.0}, {"penalty": 0.5}, {"knn": 0}, {"cores": 2.5}, {"growth": 0}):
        with pytest.raises(BadInputError):
            registry.get("bilaf", **bad)
