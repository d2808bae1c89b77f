"""The five active-learning baselines (coreset, vaal, learnloss, tavaal, alfamix) on a small real pool.

The pool: scikit-learn's digits train split written as real WebDataset shards (conftest.digits_shards);
features = the 64 pixel values per image, L2-normalised; labels only through an Oracle.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines._al_head import HeadRecipe, head_outputs, train_head
from baselines.alfamix import ALFAMix, candidates_closed_form
from baselines.coreset import CoreSet, kcenter_greedy
from baselines.learnloss import LearnLoss
from baselines.tavaal import TAVAAL
from baselines.vaal import VAAL
from bench_suite.data.shards import read_all
from bench_suite.errors import BadInputError
from bench_suite.methods.selection import Oracle
from bench_suite.runtime import Runtime
from bench_suite.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]

# small but real: 40 random labels, then batches of 40 (the last one truncated to 30)
PROTO = {"init_size": 40, "batch_size": 40}
BUDGET = 110
FAST_VAE = {"vae_width": 8, "vae_iters": 6, "vae_batch_size": 64}
METHODS = {
    "coreset": (CoreSet, {}),
    "learnloss": (LearnLoss, {}),
    "alfamix": (ALFAMix, {}),
    "vaal": (VAAL, FAST_VAE),
    "tavaal": (TAVAAL, FAST_VAE),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for this module, set once: on a busy 2-core box two OpenMP threads (and switching the
    count back and forth) made these small models 10-100x slower, at random."""
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits_store(digits_shards):
    ids, images, labels = read_all(digits_shards)
    feats = images.reshape(len(ids), -1).astype(np.float32)
    return FeatureStore.from_array(feats, ids=ids, labels=labels,
                                   meta={"shards": str(digits_shards), "num_classes": 10}, normalize=True)


def make(name, **extra):
    cls, cfg = METHODS[name]
    return cls(**PROTO, **cfg, **extra)


def oracle_for(store):
    return Oracle(np.asarray(store.labels), store.ids)


@pytest.fixture(scope="module")
def runs(digits_store):
    """Each method run with seed 0 (twice) and seed 1; the selections and their oracles."""
    out = {}
    for name in METHODS:
        res = []
        for seed in (0, 0, 1):
            oracle = oracle_for(digits_store)
            sel = make(name).select(digits_store, BUDGET, seed=seed, oracle=oracle)
            res.append((sel, oracle))
        out[name] = res
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_budget_unique_valid_deterministic_and_oracle_honest(runs, digits_store, name):
    (a, oa), (b, _), (c, _) = runs[name]
    pool = set(digits_store.ids.tolist())
    assert len(a.ids) == BUDGET and len(set(a.ids.tolist())) == BUDGET and set(a.ids.tolist()) <= pool
    assert a.method == name and a.budget == BUDGET and a.seconds > 0
    np.testing.assert_array_equal(a.ids, b.ids)  # same seed, same selection
    assert set(a.ids.tolist()) != set(c.ids.tolist())  # another seed, another selection
    # the oracle was asked exactly for the returned ids, each once
    assert len(oa.queried) == BUDGET and set(oa.queried) == set(a.ids.tolist())
    info = a.info
    assert info["labelled_sizes"] == [40, 80, 110] and info["n_rounds"] == 2
    assert [r["picked"] for r in info["rounds"]] == [40, 30]  # the last batch fills the budget exactly
    assert info["oracle_queries"] == BUDGET
    for r in info["rounds"]:
        assert r["seconds"] >= r.get("train_seconds", 0) >= 0
    json.dumps(a.to_json())  # info and config are serialisable


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_input(digits_store, name):
    with pytest.raises(BadInputError, match="oracle"):
        make(name).select(digits_store, BUDGET, seed=0, oracle=None)
    oracle = oracle_for(digits_store)
    with pytest.raises(BadInputError, match="initial"):
        make(name).select(digits_store, 39, seed=0, oracle=oracle)
    assert oracle.queried == []
    with pytest.raises(BadInputError, match="unknown option"):
        make(name, no_such_option=1)
    with pytest.raises(BadInputError, match="init_ratio"):
        METHODS[name][0](init_ratio=1.5)


def test_sizes_from_ratios(digits_store):
    # 1% of 1297 -> 13 initial labels, batches of 13 (batch_ratio defaults to init_ratio)
    sel = CoreSet(init_ratio=0.01).select(digits_store, 40, seed=0, oracle=oracle_for(digits_store))
    assert sel.info["labelled_sizes"] == [13, 26, 39, 40]
    sel = CoreSet(init_ratio=0.01, batch_ratio=0.02).select(digits_store, 40, seed=0, oracle=oracle_for(digits_store))
    assert sel.info["labelled_sizes"] == [13, 39, 40]


def test_oracle_without_label_is_an_error(digits_store):
    labels = np.asarray(digits_store.labels).copy()
    labels[:] = -1
    with pytest.raises(BadInputError, match="no label"):
        CoreSet(**PROTO).select(digits_store, BUDGET, seed=0, oracle=Oracle(labels, digits_store.ids))


def test_vaal_needs_the_images(digits_store):
    bare = FeatureStore.from_array(digits_store.features, ids=digits_store.ids, meta={"num_classes": 10})
    for cls in (VAAL, TAVAAL):
        with pytest.raises(BadInputError, match="shards"):
            cls(**PROTO, **FAST_VAE).select(bare, BUDGET, seed=0, oracle=oracle_for(digits_store))


# ------------------------------------------------------------------ what makes each method itself
def test_coreset_radius_decreases_monotonically(runs):
    sel = runs["coreset"][0][0]
    for r in sel.info["rounds"]:
        radii = np.asarray(r["radius"])
        assert len(radii) == r["picked"] and radii[0] > 0
        assert np.all(np.diff(radii) <= 1e-9), radii


def test_kcenter_greedy_is_farthest_first():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    centres = np.array([0, 1, 2])
    picks, radii = kcenter_greedy(x, centres, 20, block=64)  # several row blocks
    chosen = list(centres)
    for p, r in zip(picks, radii):
        d = np.sqrt(((x[:, None, :] - x[None, chosen, :]) ** 2).sum(-1)).min(1)
        assert math.isclose(d.max(), r, rel_tol=1e-4, abs_tol=1e-4)
        assert math.isclose(d[p], d.max(), rel_tol=1e-4, abs_tol=1e-4)
        chosen.append(p)
    assert len(set(picks.tolist())) == 20 and not set(picks.tolist()) & set(centres.tolist())


def test_head_on_initial_set_beats_chance(digits_store):
    rng = np.random.default_rng(0)
    n = len(digits_store)
    tr = rng.choice(n, 40, replace=False)
    te = np.setdiff1d(np.arange(n), tr)
    head, _, stats = train_head(digits_store.features[tr], digits_store.labels[tr], 10, HeadRecipe(), seed=0, device="cpu")
    logits = head_outputs(head, digits_store, te, device="cpu", what=("logits",))["logits"]
    acc = (logits.argmax(1) == digits_store.labels[te]).mean()
    assert acc > 0.5, acc  # chance is 0.1


def test_learnloss_predicted_loss_ranks_true_loss(digits_store):
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    n = len(digits_store)
    tr = rng.choice(n, 200, replace=False)
    te = np.setdiff1d(np.arange(n), tr)
    head, net, _ = train_head(digits_store.features[tr], digits_store.labels[tr], 10, HeadRecipe(), seed=0,
                              device="cpu", loss_module=True, stop_grad_epoch=60)
    out = head_outputs(head, digits_store, te, device="cpu", what=("logits",), lossnet=net)
    true = F.cross_entropy(torch.tensor(out["logits"]), torch.tensor(digits_store.labels[te]), reduction="none").numpy()
    assert spearmanr(out["pred_loss"], true)[0] > 0.2


def test_learnloss_picks_highest_predicted_loss(runs):
    for r in runs["learnloss"][0][0].info["rounds"]:
        assert r["pred_loss_picked_mean"] > r["pred_loss_subset_mean"]
        assert r["subset_size"] <= 1297 - r["labelled_before"]


def test_alfamix_closed_form_matches_the_original_formula():
    torch.manual_seed(0)
    n, d, c = 400, 32, 10
    z = torch.randn(n, d).relu()  # ReLU embeddings: dead units where anchor and sample agree
    fc = torch.nn.Linear(d, c)
    anchors = torch.randn(c, d).relu()
    with torch.no_grad():
        logits = fc(z)
    pred = logits.argmax(1)
    v = z.clone().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(fc(v), pred), v)[0]
    for cap in (0.2, 0.6):
        mine = candidates_closed_form(z.numpy(), logits.numpy(), anchors.numpy(), fc.weight.detach().numpy(), cap,
                                      device="cpu", block=128)
        eps = cap / math.sqrt(d)
        orig = torch.zeros(n, dtype=torch.bool)
        with torch.no_grad():
            for i in range(c):  # calculate_optimum_alpha + the mixing of the authors' code
                a = anchors[i].view(1, -1).repeat(n, 1)
                diff = a - z
                alpha = (eps * diff.norm(dim=1) / g.norm(dim=1)).unsqueeze(1).repeat(1, d) * g / (diff + 1e-8)
                orig |= fc((1 - alpha) * z + alpha * a).argmax(1) != pred
        assert 0 < mine.sum() < n
        np.testing.assert_array_equal(mine, orig.numpy())


def test_alfamix_picks_from_candidates(runs):
    for r in runs["alfamix"][0][0].info["rounds"]:
        assert r["candidates"] > 0 and r["alpha_caps"][0][0] == 0.2
        assert r["random_fill"] == max(0, r["picked"] - r["candidates"])


def test_alfamix_learned_alpha_runs(digits_store):
    sel = ALFAMix(**PROTO, alpha_mode="learned").select(digits_store, 80, seed=0, oracle=oracle_for(digits_store))
    assert len(sel.ids) == 80 and sel.info["rounds"][0]["candidates"] > 0


def test_vaal_picks_what_the_discriminator_calls_unlabelled(runs, digits_store):
    sel = runs["vaal"][0][0]
    for r in sel.info["rounds"]:
        assert r["vae_iters"] == FAST_VAE["vae_iters"]
        assert r["disc_mean_picked"] < r["disc_mean_unlabelled"]
    # not a random draw: the batch differs from what a random sampler with the same seed would take
    rng = np.random.default_rng(0)
    init = rng.choice(len(digits_store), 40, replace=False)
    np.testing.assert_array_equal(sel.ids[:40], digits_store.ids[init])  # the initial set is the random one
    rest = np.setdiff1d(np.arange(len(digits_store)), init)
    random_batch = set(digits_store.ids[np.random.default_rng(0).choice(rest, 40, replace=False)].tolist())
    assert len(random_batch & set(sel.ids[40:80].tolist())) < 20


def test_tavaal_uses_the_ranker(runs):
    for r in runs["tavaal"][0][0].info["rounds"]:
        assert "final_module_loss" in r and "pred_loss_picked_mean" in r
        assert r["disc_mean_picked"] < r["disc_mean_subset"]


@dataclass
class TwoRanks(Runtime):
    """Two ranks without a process group: rank 0 publishes, rank 1 receives what rank 0 published."""

    world: int = 2
    box: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        return True

    def broadcast_object(self, obj, src=0):
        if self.is_main:
            self.box.append(obj)
        return self.box[0]


def test_distributed_rank0_selects_and_broadcasts(digits_store):
    box = []
    o0, o1 = oracle_for(digits_store), oracle_for(digits_store)
    s0 = make("coreset").select(digits_store, 80, seed=0, oracle=o0, dist=TwoRanks(rank=0, box=box))
    s1 = make("coreset").select(digits_store, 80, seed=0, oracle=o1, dist=TwoRanks(rank=1, box=box))
    np.testing.assert_array_equal(s0.ids, s1.ids)
    assert len(o0.queried) == 80 and o1.queried == []  # only rank 0 asks the oracle
    box.clear()
    with pytest.raises(BadInputError, match="initial"):  # an error on rank 0 reaches the other ranks
        make("coreset").select(digits_store, 10, seed=0, oracle=o0, dist=TwoRanks(rank=0, box=box))
    with pytest.raises(BadInputError, match="initial"):
        make("coreset").select(digits_store, 10, seed=0, oracle=o1, dist=TwoRanks(rank=1, box=box))


# ------------------------------------------------------------------ the CLI
def test_cli_runs_an_al_method(tmp_path, digits_store):
    store_dir = tmp_path / "store"
    FeatureStore.from_array(digits_store.features, ids=digits_store.ids, labels=digits_store.labels,
                            meta=dict(digits_store.meta)).save(store_dir)
    out = tmp_path / "sel.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench_suite.cli.select", "--features", str(store_dir), "--budget", "60", "--method",
           "alfamix", "--labels", "store", "--seed", "3", "--set", "init_size=20", "batch_size=20", "head_epochs=50", "cpu_threads=1",
           "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["method"] == "alfamix" and len(set(data["ids"])) == 60
    assert data["info"]["oracle_queries"] == 60 and data["config"]["head_epochs"] == 50
    assert data["info"]["labelled_sizes"] == [20, 40, 60] and data["seconds"] > 0
    # an AL method without labels: a one-line error, exit status 2
    no_labels = [a for a in cmd if a not in ("--labels", "store")]
    res = subprocess.run(no_labels, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "labels" in res.stderr


def test_cpu_threads_option_is_scoped(digits_store):
    before = torch.get_num_threads()
    CoreSet(**PROTO, cpu_threads=2).select(digits_store, 80, seed=0, oracle=oracle_for(digits_store))
    assert torch.get_num_threads() == before
    with pytest.raises(BadInputError, match="cpu_threads"):
        CoreSet(cpu_threads=-1)
