"""ActiveFT selector: the fast (pruned, analytic) path equals the naive autograd reference; properties; bad input."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from bench_suite.methods import registry
from bench_suite import runtime as bdist
from bench_suite.activeft import ActiveFT, Options, optimize, reference_select
from bench_suite.activeft import objectives as obj
from bench_suite.activeft import assign
from bench_suite.activeft.assign import Assigner
from bench_suite.bench.pools import clustered_sphere
from bench_suite.errors import BadInputError, UnknownNameError
from bench_suite.options import as_dict
from bench_suite.metrics import selection_emd
from bench_suite.store import FeatureStore


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    x = load_digits().data.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def sphere():
    x, _ = clustered_sphere(2500, 48, 12, seed=3, rank=8)
    return x


def _fast(x, budget, **cfg):
    seed = cfg.pop("seed", 0)
    cfg.setdefault("progress", False)
    conf = ActiveFT(**cfg).options
    n = len(x)
    return optimize(torch.from_numpy(np.ascontiguousarray(x)), slice(0, n), n, budget, conf, seed=seed,
                    dist=bdist.Runtime())


def _same_run(x, budget, **cfg):
    fast = _fast(x, budget, verify=True, **dict(cfg))
    cfg.pop("candidates", None)
    cfg.pop("prune", None)
    cfg.pop("screen", None)
    ref = reference_select(x, budget, dtype=torch.float64, **cfg)
    np.testing.assert_allclose(fast["losses"], ref["losses"], rtol=2e-6, atol=2e-6)
    assert math.isclose(fast["final_loss"], ref["final_loss"], rel_tol=2e-6, abs_tol=2e-6)
    np.testing.assert_array_equal(fast["rows"], ref["rows"])  # same ids, same (parameter) order
    np.testing.assert_allclose(fast["theta"].numpy(), ref["theta"].numpy(), atol=1e-5)
    return fast, ref


# ---------------------------------------------------------------------------- fast path == naive reference
@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("objective", ["official", "paper"])
def test_fast_equals_naive_reference_on_digits(digits, objective, prune):
    fast, _ = _same_run(digits, 40, objective=objective, iters=60, seed=1, prune=prune)
    assert fast["pruned"] is prune
    if prune:
        assert fast["assign_stats"]["certified"] > fast["assign_stats"]["refreshed"]  # the pruning did prune
    else:
        assert fast["assign_stats"]["refreshed"] == len(digits) * 61  # the full product, every iteration


@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("objective", ["official", "paper"])
def test_fast_equals_naive_reference_on_clustered_sphere(sphere, objective, prune):
    # K=4 candidates: the non-candidate bound and the full refresh path are exercised too
    fast, _ = _same_run(sphere, 60, objective=objective, iters=40, seed=2, candidates=4, prune=prune)
    assert fast["assign_stats"]["refreshed"] > len(sphere)


def test_prune_auto_resolves_by_budget_and_device():
    """None (auto): pruned on a CPU from PRUNE_MIN_B_CPU parameters (where it pays there), never on a GPU."""
    from bench_suite.activeft.optimize import PRUNE_MIN_B_CPU, resolve_prune

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not resolve_prune(None, PRUNE_MIN_B_CPU - 1, cpu) and resolve_prune(None, PRUNE_MIN_B_CPU, cpu)
    assert not resolve_prune(None, 10 ** 5, gpu)
    assert resolve_prune(True, 5, gpu) and not resolve_prune(False, 10 ** 5, cpu)


@pytest.mark.parametrize("cfg", [
    {"regularizer": "none"}, {"regularizer": "infonce"}, {"regularizer": "infonce", "objective": "paper"},
    {"update_assign": False}, {"subset": 700}, {"init": "fps"}, {"temperature": 0.2, "lr": 3e-3},
    {"scheduler": "cosine", "balance": 0.5},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "full"])
def test_ablation_switches_equal_naive_reference(digits, cfg, prune):
    _same_run(digits, 30, iters=25, seed=4, prune=prune, **cfg)


def test_certified_assignments_equal_full_argmax_under_random_motion(sphere):
    """Drive the assigner with parameters moving at Adam-like speeds, duplicates and exact ties included."""
    rng = np.random.default_rng(0)
    f = np.concatenate([sphere[:1500], sphere[:100]])  # duplicate rows
    feats = torch.from_numpy(np.ascontiguousarray(f))
    b = 80
    c = f[rng.choice(len(sphere[:1500]), b, replace=False)].astype(np.float64)
    c[5] = c[4]  # two identical parameters: exact ties, lowest index must win
    asg = Assigner(feats, b, candidates=6, block=512, max_steps=40)
    for step in range(40):
        c64 = torch.from_numpy(c / np.linalg.norm(c, axis=1, keepdims=True))
        asg.set_params(c64)
        rows = None if step % 3 else torch.from_numpy(np.sort(rng.choice(len(f), 900, replace=False)))
        got = torch.cat([p for _, p, _ in asg.iterate(rows)]).numpy()
        sims = f.astype(np.float64) @ c64.numpy().T
        want = sims.argmax(axis=1)  # numpy: first index on ties
        sel = np.arange(len(f)) if rows is None else rows.numpy()
        np.testing.assert_array_equal(got, want[sel])
        step_size = 0.02 if step < 20 else 0.002
        c[:, :] += step_size * rng.standard_normal(c.shape) / math.sqrt(c.shape[1])
        c[5] = c[4]
    assert asg.totals["certified"] > 0 and asg.totals["pairs"] > 0


@pytest.mark.parametrize("recheck_k", [3, 8])
@pytest.mark.parametrize("screen", ["bf16", "tf32"])
def test_screened_full_pass_equals_the_float32_argmax(sphere, screen, recheck_k, monkeypatch):
    """The reduced-precision screening (bf16 really rounds on a CPU; tf32 there is the float32 product)
    gives the exact argmax: rows within its rounding bound are decided exactly among their RECHECK_K screened
    best, or (more candidates in the window) by the float32 pass."""
    monkeypatch.setattr(assign, "RECHECK_K", recheck_k)
    rng = np.random.default_rng(5)
    f = np.concatenate([sphere, sphere[:50]])  # duplicate rows: exact ties
    feats = torch.from_numpy(np.ascontiguousarray(f))
    c = f[rng.choice(len(sphere), 90, replace=False)].astype(np.float64)
    c[7] = c[6]
    asg = Assigner(feats, 90, block=700, prune=False, screen=screen, max_steps=12)
    for step in range(12):
        c64 = torch.from_numpy(c / np.linalg.norm(c, axis=1, keepdims=True))
        asg.set_params(c64)
        rows = None if step % 2 else torch.from_numpy(np.sort(rng.choice(len(f), 1200, replace=False)))
        got_p, got_a = (torch.cat(t) for t in zip(*[(p, a) for _, p, a in asg.iterate(rows)]))
        sims = f.astype(np.float64) @ c64.numpy().T
        sel = np.arange(len(f)) if rows is None else rows.numpy()
        np.testing.assert_array_equal(got_p.numpy(), sims.argmax(axis=1)[sel])
        np.testing.assert_allclose(got_a.numpy(), sims[sel, got_p.numpy()], atol=1e-5)
        c += 0.01 * rng.standard_normal(c.shape) / math.sqrt(c.shape[1])
        c[7] = c[6]
    assert asg.totals["screen_rechecked"] > 0  # the bound did send rows to the exact pass
    assert asg.totals["screen_full"] < asg.totals["screen_rechecked"]  # most decided among the candidates
    if recheck_k == 3:
        assert asg.totals["screen_full"] > 0  # and some by the float32 pass
    if screen == "bf16":
        assert asg.totals["screen_rechecked"] < asg.totals["refreshed"]  # and decided the others itself


def test_screened_selection_equals_naive_reference(digits):
    fast, _ = _same_run(digits, 40, iters=30, seed=3, prune=False, screen="bf16")
    assert 0 < fast["assign_stats"]["screen_rechecked"] < fast["assign_stats"]["refreshed"]


def test_assigner_output_independent_of_caller_threads_and_restores_them():
    """The pruning's bookkeeping runs on one thread (fast on a shared machine); a multi-threaded caller
    gets the same assignments and similarities, bit for bit, and its thread count back."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 32)).astype(np.float32)  # unclustered: many refinements and refreshes
    feats = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))
    c0 = feats[rng.choice(3000, 40, replace=False)].double().numpy()
    moves = [0.02 * rng.standard_normal(c0.shape) for _ in range(8)]

    def run(threads):
        torch.set_num_threads(threads)
        asg = Assigner(feats, 40, candidates=8, block=1024, max_steps=10)
        c, out = c0.copy(), []
        for mv in moves:
            asg.set_params(torch.from_numpy(c / np.linalg.norm(c, axis=1, keepdims=True)))
            for _, p, a in asg.iterate(None):
                out.append((p.clone(), a.clone()))
            assert torch.get_num_threads() == threads
            c += mv
        return out, asg.totals

    one, tot = run(1)
    two, _ = run(2)
    assert tot["certified"] > 0 and tot["refreshed"] > 3000  # every path of the pruning was exercised
    for (p1, a1), (p2, a2) in zip(one, two, strict=True):
        assert torch.equal(p1, p2) and torch.equal(a1, a2)


def test_parameter_dots_are_per_pair_exact_and_independent_of_blocking_and_threads(sphere):
    """The pruning's exact similarities (one SDDMM on a CPU): each value depends only on its row and parameter
    (not on the block, on which other pairs are asked, or on the thread count), within float32 rounding of
    the float64 dot. 10k pairs: the product's multi-threaded branch runs too."""
    feats = torch.from_numpy(np.ascontiguousarray(np.concatenate([sphere] * 4)))  # 10,000 x 48
    n, b = feats.shape[0], 50
    asg = Assigner(feats, b, block=n, max_steps=2)
    c64 = torch.nn.functional.normalize(feats[:b].double() + 0.1, dim=1)
    asg.set_params(c64)
    g = torch.Generator().manual_seed(0)
    params = torch.randint(0, b, (n,), generator=g)
    whole = asg._dot_params(feats, params)
    torch.set_num_threads(1)
    try:
        assert torch.equal(asg._dot_params(feats, params), whole)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(asg._dot_params(feats[3000:4100], params[3000:4100]), whole[3000:4100])
    # several pairs per row, given as ascending row indices into a block
    rows = torch.sort(torch.randint(0, 4000, (9000,), generator=g)).values
    pk = torch.randint(0, b, (9000,), generator=g)
    by_rows = asg._dot_params(feats[:4000], pk, rows=rows)
    want = (feats[rows].double() * c64[pk]).sum(dim=1)
    assert torch.equal(by_rows[rows == rows[0]][:1], asg._dot_params(feats[rows[:1]], pk[:1]))
    assert float((by_rows.double() - want).abs().max()) < asg.eps_base / 2
    assert float((whole.double() - (feats.double() * c64[params]).sum(dim=1)).abs().max()) < asg.eps_base / 2


# ---------------------------------------------------------------------------- properties
@pytest.mark.parametrize("tau", [0.04, 0.5])
def test_official_repulsion_in_symmetric_blocks_equals_the_direct_formula(tau):
    """Every block split (one block, blocks that do not divide B, B x B in float32) gives the direct
    ``log R_j = logsumexp_k <c_j, c_k>/tau`` and ``(Q c)_j = softmax_k(<c_j, c_k>/tau) c``, diagonal included."""
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(203, 24, generator=g, dtype=torch.float64), dim=1)
    c[7] = -c[3]  # an antipodal pair: the smallest exponential there is
    sims = c @ c.T / tau
    log_r, qc = torch.logsumexp(sims, dim=1), torch.softmax(sims, dim=1) @ c
    for block in (0, 3, 7, 64, 203, 500):
        got_r, got_qc = obj.official_repulsion(c, tau, dtype=torch.float64, block=block)
        torch.testing.assert_close(got_r, log_r, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_qc, qc, rtol=1e-12, atol=1e-12)
    got_r, got_qc = obj.official_repulsion(c, tau, dtype=torch.float32, block=64)
    assert got_r.dtype == got_qc.dtype == torch.float64
    torch.testing.assert_close(got_r, log_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_qc, qc, rtol=1e-5, atol=1e-5)


def test_official_parameter_winning_nothing_gets_zero_gradient(digits):
    """Reference autograd on the released loss: a parameter that wins no sample has exactly zero gradient."""
    f = torch.from_numpy(digits).double()
    theta = torch.nn.Parameter(f[[0, 1, 2, 3]].clone())
    with torch.no_grad():
        theta[3] = -theta[0]  # far from every (non-negative) digit: wins nothing
    c = torch.nn.functional.normalize(theta, dim=1)
    a, pk = (f @ c.T / 0.07).max(dim=1)
    assert not (pk == 3).any()
    log_r = torch.logsumexp(c.detach() @ c.T / 0.07, dim=0)
    torch.nn.functional.softplus(log_r[pk] - a).mean().backward()
    assert torch.all(theta.grad[3] == 0) and theta.grad[:3].abs().sum() > 0


def test_official_idle_parameter_stays_put_in_fast_path():
    """Duplicate init rows: the higher-index twin loses every tie, so its gradient is exactly zero and Adam
    leaves it exactly where it was, while its lower-index twin moves."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((60, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    x = np.concatenate([base, base[:1]])  # row 60 duplicates row 0
    init = None
    for seed in range(200):  # find a seed whose random init contains both twins
        rows = torch.randperm(61, generator=torch.Generator().manual_seed(seed))[:20].numpy()
        if 0 in rows and 60 in rows:
            init = seed
            break
    assert init is not None
    res = _fast(x, 20, iters=1, seed=init)
    pos0, pos60 = int(np.flatnonzero(res["init_rows"] == 0)[0]), int(np.flatnonzero(res["init_rows"] == 60)[0])
    twin = max(pos0, pos60)  # the higher index loses the ties
    x0 = torch.nn.functional.normalize(torch.from_numpy(x[0]).double(), dim=0).numpy()
    np.testing.assert_array_equal(res["theta"][twin].numpy(), x0)
    assert not np.allclose(res["theta"][min(pos0, pos60)].numpy(), x0, atol=1e-5)


def test_duplicates_beyond_budget_still_give_budget_unique_ids():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((12, 8)).astype(np.float32)
    x = np.repeat(base, 10, axis=0)  # 12 distinct rows, 120 samples; B=50 > 12
    for init in ("random", "fps"):
        sel = ActiveFT(iters=15, init=init, progress=False).select(x, 50, seed=0)
        assert len(sel.ids) == 50 and len(np.unique(sel.ids)) == 50
        assert set(sel.ids.tolist()) <= set(range(120))


def test_deterministic_and_seed_dependent(digits):
    a = ActiveFT(iters=20, progress=False).select(digits, 30, seed=7)
    b = ActiveFT(iters=20, progress=False).select(FeatureStore.from_array(digits), 30, seed=7)
    c = ActiveFT(iters=20, progress=False).select(digits, 30, seed=8)
    assert np.array_equal(a.ids, b.ids) and a.info["loss_curve"] == b.info["loss_curve"]
    assert not np.array_equal(a.ids, c.ids)


def test_selection_fields_and_registry(digits):
    sel = registry.get("activeft", objective="paper", iters=10, progress=False).select(digits, 25, seed=0)
    assert sel.method == "activeft" and sel.budget == 25 and sel.seed == 0 and sel.seconds > 0
    assert len(sel.info["loss_curve"]) == 10 and all(math.isfinite(v) for v in sel.info["loss_curve"])
    assert math.isfinite(sel.info["final_loss"]) and sel.info["iterations"] == 10
    assert sel.config["objective"] == "paper" and sel.config["temperature"] == 0.07
    json.dumps(sel.to_json())  # JSON-serialisable
    cls = registry.selector_class("activeft")
    assert cls.label_free and cls.description and "\n" not in cls.description


def test_optimisation_beats_random_init_on_emd(sphere):
    sel = ActiveFT(iters=60, lr=5e-3, progress=False).select(sphere, 40, seed=0)
    rows0 = np.asarray(sel.info["init_ids"])
    assert selection_emd(sphere, sel.ids) < selection_emd(sphere, rows0)
    assert sel.info["loss_curve"][-1] < sel.info["loss_curve"][0]


def test_iters_zero_returns_the_random_init(digits):
    sel = ActiveFT(iters=0, progress=False).select(digits, 30, seed=3)
    assert np.array_equal(sel.ids, np.asarray(sel.info["init_ids"]))


def test_unnormalised_rows_are_normalised_with_warning(digits, caplog):
    raw = load_digits().data.astype(np.float32)  # norms ~ 50
    store = FeatureStore(raw.copy(), np.arange(len(raw)))  # bypasses the store's own check
    with caplog.at_level("WARNING"):
        a = ActiveFT(iters=10, progress=False).select(store, 20, seed=0)
    assert any("not L2-normalised" in r.getMessage() for r in caplog.records)
    b = ActiveFT(iters=10, progress=False).select(digits, 20, seed=0)
    assert np.array_equal(a.ids, b.ids)


def test_progress_bar_runs(digits, capsys):
    ActiveFT(iters=5, progress=True).select(digits, 10, seed=0)
    assert "loss" in capsys.readouterr().err


# ---------------------------------------------------------------------------- bad input
def _one_line(exc):
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("budget,match", [(0, "positive"), (-3, "positive"), (2000, "larger than the pool"),
                                          (2.5, "integer")])
def test_bad_budget(digits, budget, match):
    with pytest.raises(BadInputError) as exc:
        ActiveFT(iters=2, progress=False).select(digits, budget, seed=0)
    assert match in _one_line(exc)


def test_bad_features():
    sel = ActiveFT(iters=2, progress=False)
    good = np.eye(6, 4, dtype=np.float32) + 0.1
    with pytest.raises(BadInputError) as exc:
        sel.select(np.zeros((0, 4), np.float32), 1, seed=0)
    assert "empty" in _one_line(exc)
    bad = good.copy()
    bad[3, 1] = np.nan
    with pytest.raises(BadInputError) as exc:
        sel.select(FeatureStore(bad, np.arange(6)), 2, seed=0)
    assert "NaN/Inf" in _one_line(exc) and "row 3" in str(exc.value)
    bad = good.copy()
    bad[2] = np.inf
    with pytest.raises(BadInputError, match=r"NaN/Inf \(first at row 2\)"):
        sel.select(FeatureStore(bad, np.arange(6)), 2, seed=0)
    bad = good.copy()
    bad[4] = 0
    with pytest.raises(BadInputError) as exc:
        sel.select(FeatureStore(bad, np.arange(6)), 2, seed=0)
    assert "zero-norm" in _one_line(exc)
    with pytest.raises(BadInputError) as exc:
        sel.select(FeatureStore(good, np.arange(5)), 2, seed=0)
    assert "ids" in _one_line(exc)
    with pytest.raises(BadInputError) as exc:
        sel.select(np.ones(5, np.float32), 2, seed=0)
    assert "2-D" in _one_line(exc)


def test_bad_names_and_options():
    with pytest.raises(BadInputError) as exc:
        ActiveFT(objective="eq11")
    assert "official" in _one_line(exc) and "paper" in str(exc.value)
    with pytest.raises(BadInputError) as exc:
        ActiveFT(regularizer="l2")
    assert "infonce" in _one_line(exc)
    with pytest.raises(UnknownNameError) as exc:
        registry.get("activeftt")
    assert "activeft" in _one_line(exc)
    with pytest.raises(BadInputError) as exc:
        ActiveFT(temprature=0.1)
    assert "temperature" in _one_line(exc)
    for kw in ({"temperature": 0}, {"iters": -1}, {"lr": float("nan")}, {"update_assign": "maybe"},
               {"init": "kmeans"}, {"subset": 1.5}):
        with pytest.raises(BadInputError) as exc:
            ActiveFT(**kw)
        _one_line(exc)
    assert ActiveFT(no_update=True).options.update_assign is False
    assert ActiveFT(no_update="false").options.update_assign is True
    assert ActiveFT(update_assign="false", iters="30").options.iters == 30
    with pytest.raises(BadInputError) as exc:
        ActiveFT(no_update="maybe")
    assert "no_update" in _one_line(exc)
    old = ActiveFT(tau=0.2, T=7, M=100, K=4, lambda_=0.5).options  # the released code's / paper's names
    assert (old.temperature, old.iters, old.subset, old.candidates, old.balance) == (0.2, 7, 100, 4, 0.5)


def test_options_defaults_and_record(digits):
    """Options are a typed dataclass; device follows the project's rule (auto); the record re-creates the selector."""
    opts = ActiveFT().options
    assert isinstance(opts, Options) and opts.device == "auto" and opts.iters == 300 and opts.temperature == 0.07
    sel = ActiveFT(iters=3, progress=False, device="cpu").select(digits, 10, seed=0)
    assert sel.config == as_dict(ActiveFT(iters=3, progress=False, device="cpu").options)
    assert ActiveFT(**sel.config).options == ActiveFT(iters=3, progress=False, device="cpu").options
    assert sel.info["device"] == "cpu" and sel.info["block_size"] > 0 and sel.info["bb_dtype"] == "float64"


def test_select_cli_writes_selection(digits, tmp_path):
    from bench_suite.cli import select as select_cli

    np.save(tmp_path / "x.npy", digits)
    out = tmp_path / "sel.json"
    select_cli.main(["--features", str(tmp_path / "x.npy"), "--budget", "20", "--method", "activeft",
                     "--objective", "paper", "--set", "iters=15", "progress=false", "--seed", "2", "--out", str(out)])
    d = json.loads(out.read_text())
    assert len(d["ids"]) == 20 and len(set(d["ids"])) == 20 and d["config"]["objective"] == "paper"
    assert len(d["info"]["loss_curve"]) == 15
    with pytest.raises(SystemExit) as exc:
        select_cli.main(["--features", str(tmp_path / "x.npy"), "--budget", "20", "--method", "activeft",
                         "--objective", "eq11", "--out", str(tmp_path / "bad.json")])
    assert exc.value.code == 2 and not (tmp_path / "bad.json").exists()


def test_benchmark_quick_run(tmp_path):
    from bench_suite.bench import selector as bench

    out = bench.main(["--device", "cpu", "--n", "800", "--dim", "32", "--classes", "8", "--budgets", "20,40",
                      "--iters", "8", "--naive-iters", "4", "--paths", "auto,full,pruned", "--threads", "1",
                      "--json", str(tmp_path / "b.json")])
    assert set(out["budgets"]) == {"20", "40"}
    for res in out["budgets"].values():
        assert set(res["runs"]) == {"auto", "full", "pruned", "naive"}
        assert res["runs"]["pruned"]["pruned"] and not res["runs"]["full"]["pruned"]
        assert res["curve_max_rel"] < 1e-4 and res["ids_in_common"] == 1.0 and res["brute_pass_fp32_s"] > 0
        assert res["runs"]["naive"]["extrapolated"] and not res["runs"]["auto"]["extrapolated"]
    assert json.loads((tmp_path / "b.json").read_text())["budgets"]["20"]["runs"]["auto"]["iters"] == 8


def test_benchmark_table3_mode_runs_the_select_cli(tmp_path):
    """--table3 times the real select CLI (subprocesses) for ActiveFT and K-Means on a blobs pool."""
    from bench_suite.bench import selector as bench

    out = bench.main(["--device", "cpu", "--pool", "blobs", "--n", "600", "--dim", "16", "--classes", "6",
                      "--table3", "--ratios", "0.05", "--json", str(tmp_path / "t3.json")])
    row = out["table3"]["ratios"]["0.05"]
    assert row["activeft_budget"] == row["kmeans_budget"] == 30 and row["activeft"] > 0 and row["kmeans"] > 0


def test_plain_adam_is_torch_adam_bit_for_bit():
    """The loop's functional Adam (no torch.optim.Optimizer: its first use imports torch._dynamo) takes the
    same steps as torch.optim.Adam(foreach=False), exactly."""
    from bench_suite.activeft.optimize import PlainAdam

    g = torch.Generator().manual_seed(0)
    start = torch.randn(7, 5, dtype=torch.float64, generator=g)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours, ref = PlainAdam(a, 1e-3), torch.optim.Adam([b], lr=1e-3, foreach=False)
    for _ in range(25):
        grad = torch.randn(7, 5, dtype=torch.float64, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert torch.equal(a.detach(), b.detach()) and not torch.equal(a.detach(), start)


def test_a_selection_does_not_import_dynamo():
    """A selection process's start-up: neither the loop nor its imports pull in torch._dynamo (2.7 s)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from bench_suite.methods import run_selection; "
            "from bench_suite.store import FeatureStore; "
            "x = np.random.default_rng(0).normal(size=(300, 16)).astype('float32'); "
            "run_selection(FeatureStore.from_array(x, normalize=True), 'activeft', 10, 0, {'iters': 5}); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
