"""BiLAF's own behaviour on real data (scikit-learn digits, L2-normalised pixels): cores kept, denoising drops
the sparse fringe, boundary picks score lower than the pool, allocation proportional, B = K is ActiveFT."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from baselines.bilaf import _dist, allocate, boundary_picks, denoise, nearest_two_cores
from bench_suite import runtime
from bench_suite.activeft import ActiveFT
from bench_suite.errors import BadInputError, BenchError
from bench_suite.methods import registry
from bench_suite.runtime import Runtime
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
    for bad, msg in (({"remove": 1.0}, r"option remove must be in \[0, 1\)"),
                     ({"penalty": 0.5}, "option penalty must be >= 1"), ({"knn": 0}, "option knn must be >= 1"),
                     ({"cores": 2.5}, "option cores must be an integer"),
                     ({"growth": 0}, r"option growth must be in \(0, 1\]"), ({"no_such": 1}, "unknown option")):
        with pytest.raises(BadInputError, match="bilaf: " + msg):
            registry.get("bilaf", **bad)
    with pytest.raises(BenchError, match="objective"):  # ActiveFT's own options are checked when BiLAF is built
        registry.get("bilaf", objective="no_such_objective")


class TwoRankRuntime(Runtime):
    """Rank 0 of a 2-process launch without a process group: only a broadcast is allowed, and it echoes."""

    def __init__(self):
        super().__init__(rank=0, world=2)

    @property
    def active(self):
        return True

    def broadcast_object(self, obj, src=0):
        return obj

    def all_reduce(self, tensor, op="sum"):
        raise AssertionError("BiLAF ran a collective: ActiveFT must run in rank 0's process alone")

    def all_gather_object(self, obj):
        raise AssertionError("BiLAF ran a collective: ActiveFT must run in rank 0's process alone")


def test_core_stage_runs_alone_on_rank_zero(digits, monkeypatch):
    """Under a distributed launch BiLAF runs on rank 0 only, so its ActiveFT must not join the other ranks."""
    ref = registry.get("bilaf", **CFG).select(digits, 30, seed=2)
    launch = TwoRankRuntime()
    monkeypatch.setattr(runtime, "current", lambda: launch)  # what ActiveFT would find without dist=
    sel = registry.get("bilaf", **CFG).select(digits, 30, seed=2, dist=launch)
    assert np.array_equal(sel.ids, ref.ids) and sel.info["core_ids"] == ref.info["core_ids"]
