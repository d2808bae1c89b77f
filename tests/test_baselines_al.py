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
from PIL import Image

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
    "alfamix": (ALFAMix, {"alpha_mode": "closed_form", "alpha_cap": 0.2}),  # recomputed below with the formula
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


def make(name, **extra):
    cls, cfg = METHODS[name]
    return cls(**PROTO, **cfg, **extra)


def oracle_for(store):
    return Oracle(np.asarray(store.labels), store.ids)


@pytest.fixture(scope="module")
def runs(digits_store):
    """Each method run with seed 0 (twice) and seed 1; the selections, their oracles and the selectors (which
    keep the last round's trained models: ``last_round_models``)."""
    out = {}
    for name in METHODS:
        res = []
        for seed in (0, 0, 1):
            oracle = oracle_for(digits_store)
            method = make(name)
            sel = method.select(digits_store, BUDGET, seed=seed, oracle=oracle)
            res.append((sel, oracle, method))
        out[name] = res
    return out


# ------------------------------------------------------------------ independent recomputation of a round's picks
@pytest.fixture(scope="module")
def images32(digits_shards, digits_store):
    """The pool's images as the VAE methods see them, read here from the shards: grey -> RGB, PIL bilinear to
    32 x 32, row-aligned with digits_store (N x 3 x 32 x 32 uint8)."""
    ids, images, _ = read_all(digits_shards)
    np.testing.assert_array_equal(ids, digits_store.ids)
    return np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
                     for im in images])


def last_round(sel, store, labelled_before):
    """From the selection's ids alone: (rows labelled before the last round, the last round's picks in pick
    order, the rows unlabelled in that round)."""
    row_of = {int(i): r for r, i in enumerate(np.asarray(store.ids).tolist())}
    rows = np.array([row_of[int(i)] for i in sel.ids])
    labelled, picked = rows[:labelled_before], rows[labelled_before:]
    unlabelled = np.setdiff1d(np.arange(len(store)), labelled)
    return labelled, picked, unlabelled


def assert_k_lowest(picked, rows, scores, tol=1e-6):
    """``picked`` (in pick order) are the len(picked) rows of ``rows`` with the lowest ``scores``, lowest first
    (up to ``tol`` at the boundary, so a float near-tie cannot fail it)."""
    pos = {r: i for i, r in enumerate(rows.tolist())}
    assert len(set(picked.tolist())) == len(picked) and all(r in pos for r in picked.tolist())
    s_picked = scores[[pos[r] for r in picked.tolist()]]
    s_rest = scores[[pos[r] for r in np.setdiff1d(rows, picked).tolist()]]
    assert s_picked.max() <= s_rest.min() + tol, (s_picked.max(), s_rest.min())
    assert np.all(np.diff(s_picked) >= -tol), s_picked  # most extreme first
    assert s_picked.max() < np.median(scores)  # a real ranking, not a degenerate one


@torch.no_grad()
def disc_scores(vae, disc, images_u8, rank=None):
    """The discriminator's P(labelled) of each image, recomputed with plain torch: [-1, 1] pixels, the encoder's
    mean (no sampling; BatchNorm with its running statistics), [mu, r] into the discriminator's MLP for TA-VAAL."""
    vae.eval()
    disc.eval()
    x = torch.as_tensor(images_u8).float() / 127.5 - 1.0
    mu = vae.fc_mu(vae.encoder(x))
    inp = mu if rank is None else torch.cat([mu, rank.view(-1, 1)], 1)
    return disc.net(inp).view(-1).numpy()


@torch.no_grad()
def predicted_loss(head, ranker, feats):
    """The loss prediction module's output, recomputed: the taps (the head's input and each hidden layer) into
    the module."""
    h = torch.as_tensor(np.asarray(feats, dtype=np.float32))
    taps = [h]
    for block in head.blocks:
        h = block(h)
        taps.append(h)
    return ranker(taps).view(-1)


def original_label_changes(z, fc, anchors, cap):
    """ALFA-Mix as the authors' code computes it (calculate_optimum_alpha with the closed form, then the mixing):
    for each row of ``z``, does mixing toward some anchor change the classifier's prediction?"""
    n, d = z.shape
    with torch.no_grad():
        pred = fc(z).argmax(1)
    v = z.clone().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(fc(v), pred), v)[0]
    eps = cap / math.sqrt(d)
    changed = torch.zeros(n, dtype=torch.bool)
    with torch.no_grad():
        for anchor in anchors:
            a = anchor.view(1, -1).repeat(n, 1)
            diff = a - z
            alpha = (eps * diff.norm(dim=1) / g.norm(dim=1)).unsqueeze(1).repeat(1, d) * g / (diff + 1e-8)
            changed |= fc((1 - alpha) * z + alpha * a).argmax(1) != pred
    return changed.numpy()


def alfamix_candidates(head, store, labelled, unlabelled, k, num_classes=10):
    """The round's candidate set, recomputed: anchors = the mean embedding of each labelled class (all labelled
    when a class has none), the original mixing with caps 0.2, 0.4, ... up to 1 until more than k change."""
    feats = np.asarray(store.features, dtype=np.float32)
    y_l = np.asarray(store.labels)[labelled]  # what the oracle answered for them
    with torch.no_grad():
        z_l = head.embed(torch.as_tensor(feats[labelled]))
        z_u = head.embed(torch.as_tensor(feats[unlabelled]))
    anchors = torch.stack([z_l[torch.as_tensor(y_l == c)].mean(0) if (y_l == c).any() else z_l.mean(0)
                           for c in range(num_classes)])
    cand = np.zeros(len(unlabelled), dtype=bool)
    for cap in (0.2, 0.4, 0.6, 0.8, 1.0):
        cand |= original_label_changes(z_u, head.fc, anchors, cap)
        if cand.sum() > k:
            break
    return unlabelled[cand]


@pytest.mark.parametrize("name", list(METHODS))
def test_budget_unique_valid_deterministic_and_oracle_honest(runs, digits_store, name):
    (a, oa, _), (b, _, _), (c, _, _) = runs[name]
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


def test_learnloss_picks_the_highest_predicted_loss(runs, digits_store):
    # the last round's picks, recomputed from its trained head + loss prediction module: the 30 unlabelled
    # samples with the highest predicted loss, highest first (the subset is the whole unlabelled pool: 10000 > N)
    sel, _, method = runs["learnloss"][0]
    _, picked, unlabelled = last_round(sel, digits_store, 80)
    m = method.last_round_models
    pred = predicted_loss(m["head"], m["ranker"], digits_store.features[unlabelled]).numpy()
    assert_k_lowest(picked, unlabelled, -pred)


def test_alfamix_closed_form_matches_the_original_formula():
    torch.manual_seed(0)
    n, d, c = 400, 32, 10
    z = torch.randn(n, d).relu()  # ReLU embeddings: dead units where anchor and sample agree
    fc = torch.nn.Linear(d, c)
    anchors = torch.randn(c, d).relu()
    with torch.no_grad():
        logits = fc(z)
    for cap in (0.2, 0.6):
        mine = candidates_closed_form(z.numpy(), logits.numpy(), anchors.numpy(), fc.weight.detach().numpy(), cap,
                                      device="cpu", block=128)
        assert 0 < mine.sum() < n
        np.testing.assert_array_equal(mine, original_label_changes(z, fc, anchors, cap))


def test_alfamix_picks_from_the_candidates(runs, digits_store):
    # the candidates recomputed with the authors' formula from the last round's trained head: more than the
    # batch change their prediction, so every pick is one of them
    sel, _, method = runs["alfamix"][0]
    labelled, picked, unlabelled = last_round(sel, digits_store, 80)
    cand = alfamix_candidates(method.last_round_models["head"], digits_store, labelled, unlabelled, len(picked))
    assert len(picked) < len(cand) < len(unlabelled) // 2
    assert set(picked.tolist()) <= set(cand.tolist())
    assert sel.info["rounds"][-1]["candidates"] == len(cand)


def test_alfamix_takes_every_candidate_then_fills_randomly(digits_store):
    # a batch of 500: fewer samples than that change prediction even at cap 1, so all of them are taken (first,
    # one per k-means cluster) and the rest of the batch is drawn from the other unlabelled samples
    method = ALFAMix(init_size=40, batch_size=500, alpha_mode="closed_form", alpha_cap=0.2)
    sel = method.select(digits_store, 540, seed=0, oracle=oracle_for(digits_store))
    labelled, picked, unlabelled = last_round(sel, digits_store, 40)
    cand = alfamix_candidates(method.last_round_models["head"], digits_store, labelled, unlabelled, len(picked))
    assert 0 < len(cand) < len(picked)
    assert set(picked[:len(cand)].tolist()) == set(cand.tolist())
    fill = picked[len(cand):]
    assert len(set(fill.tolist())) == len(fill) and not set(fill.tolist()) & set(cand.tolist())


def original_learn_alpha_changes(z, fc, anchors, cap, gen, iters=5, lr=0.1, clf_coef=1.0, l2_coef=0.01):
    """The authors' learned alpha (AlphaMixSampling.generate_alpha + learn_alpha, one batch), transcribed: for each
    anchor alpha ~ N(cap/2, cap/2) clamped to [1e-8, cap]; ``iters`` steps of a fresh Adam (lr / 10 in the last
    third) on -CE + l2 ||alpha||, clamping after each; a prediction change seen before any step counts."""
    n, d = z.shape
    with torch.no_grad():
        pred = fc(z).argmax(1)
    changed = torch.zeros(n, dtype=torch.bool)
    for anchor in anchors:
        alpha = torch.normal(mean=cap / 2.0, std=cap / 2.0, size=(n, d), generator=gen)
        alpha[torch.isnan(alpha)] = 1
        alpha = torch.clamp(alpha, min=1e-8, max=cap)
        c_e = anchor.view(1, -1).repeat(n, 1)
        for i in range(iters):
            l = torch.autograd.Variable(alpha.clone(), requires_grad=True)
            opt = torch.optim.Adam([l], lr=lr / (1. if i < iters * 2 / 3 else 10.))
            out = fc((1 - l) * z + l * c_e)
            changed |= (out.argmax(dim=1) != pred).detach()
            clf_loss = F.cross_entropy(out, pred, reduction="none") * -1
            loss = clf_coef * clf_loss + l2_coef * torch.norm(l, dim=1)
            loss.sum().backward()
            opt.step()
            alpha = torch.clamp(l, min=1e-8, max=cap).detach()
    return changed.numpy()


def test_alfamix_learned_alpha_matches_the_authors_learn_alpha():
    from baselines.alfamix import candidates_learned

    torch.manual_seed(0)
    n, d, c = 300, 24, 6
    z = torch.randn(n, d).relu()
    fc = torch.nn.Linear(d, c)
    anchors = torch.randn(c, d).relu()
    with torch.no_grad():
        logits = fc(z)
    for cap in (0.03125, 0.25):
        mine = candidates_learned(z.numpy(), logits.numpy(), anchors.numpy(), fc, cap,
                                  gen=torch.Generator().manual_seed(5), device="cpu")
        ref = original_learn_alpha_changes(z, fc, anchors, cap, torch.Generator().manual_seed(5))
        np.testing.assert_array_equal(mine, ref)
    assert 0 < ref.sum() < n  # cap 0.25 changes some predictions, not all


def test_alfamix_defaults_are_the_authors_main_command():
    # README: `--strategy AlphaMixSampling --alpha_opt` with the code's default --alpha_cap 0.03125
    o = ALFAMix().options
    assert (o.alpha_mode, o.alpha_cap, o.alpha_learning_iters, o.alpha_learning_rate, o.alpha_clf_coef,
            o.alpha_l2_coef) == ("learned", 0.03125, 5, 0.1, 1.0, 0.01)


def test_alfamix_learned_alpha_runs(digits_store):
    sel = ALFAMix(**PROTO).select(digits_store, 80, seed=0, oracle=oracle_for(digits_store))
    assert len(sel.ids) == 80 and sel.info["rounds"][0]["candidates"] > 0
    assert sel.config["alpha_mode"] == "learned"


def test_vaal_picks_what_the_discriminator_calls_unlabelled(runs, digits_store, images32):
    # the last round's picks, recomputed from its trained VAE + discriminator: the 30 unlabelled images the
    # discriminator scores lowest (most surely unlabelled), lowest first
    sel, _, method = runs["vaal"][0]
    _, picked, unlabelled = last_round(sel, digits_store, 80)
    m = method.last_round_models
    assert_k_lowest(picked, unlabelled, disc_scores(m["vae"], m["disc"], images32[unlabelled]))
    assert sel.info["rounds"][-1]["vae_iters"] == FAST_VAE["vae_iters"]
    # not a random draw: the batch differs from what a random sampler with the same seed would take
    rng = np.random.default_rng(0)
    init = rng.choice(len(digits_store), 40, replace=False)
    np.testing.assert_array_equal(sel.ids[:40], digits_store.ids[init])  # the initial set is the random one
    rest = np.setdiff1d(np.arange(len(digits_store)), init)
    random_batch = set(digits_store.ids[np.random.default_rng(0).choice(rest, 40, replace=False)].tolist())
    assert len(random_batch & set(sel.ids[40:80].tolist())) < 20


def test_tavaal_picks_what_the_discriminator_calls_unlabelled_given_the_rank(runs, digits_store, images32):
    # recomputed from the last round's trained task head + ranker + VAE + discriminator: r = the ranker's
    # predicted loss, the picks = the 30 unlabelled images (the subset is all of them: 10000 > N) with the
    # lowest discriminator score of [mu, r]
    sel, _, method = runs["tavaal"][0]
    _, picked, unlabelled = last_round(sel, digits_store, 80)
    m = method.last_round_models
    r = predicted_loss(m["head"], m["ranker"], digits_store.features[unlabelled])
    assert_k_lowest(picked, unlabelled, disc_scores(m["vae"], m["disc"], images32[unlabelled], r))


def test_tavaal_ranker_changes_the_picks(runs, digits_store, images32):
    sel, _, method = runs["tavaal"][0]
    _, picked, unlabelled = last_round(sel, digits_store, 80)
    k, m = len(picked), method.last_round_models
    r = predicted_loss(m["head"], m["ranker"], digits_store.features[unlabelled])
    # the same trained models, each image scored with another image's rank, or with the mean rank: the k
    # lowest are another batch
    shuffled = r[torch.randperm(len(r), generator=torch.Generator().manual_seed(0))]
    for other in (shuffled, torch.full_like(r, float(r.mean()))):
        alt = unlabelled[np.argsort(disc_scores(m["vae"], m["disc"], images32[unlabelled], other))[:k]]
        assert len(set(alt.tolist()) - set(picked.tolist())) >= k // 4
    # a whole run whose ranker is left untrained (loss_weight 0: no gradient reaches it): the same initial set,
    # subset and VAE seed, and the head reaches TA-VAAL's picks only through r - another first batch
    untrained = make("tavaal", loss_weight=0.0).select(digits_store, 80, seed=0, oracle=oracle_for(digits_store))
    np.testing.assert_array_equal(untrained.ids[:40], sel.ids[:40])
    assert len(set(untrained.ids[40:].tolist()) - set(sel.ids[40:80].tolist())) >= 40 // 4


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
