"""The fixed-shape ActiveFT iteration (``static_loop``: what a GPU replays as one CUDA graph) gives the eager
loop's run bit for bit: the same assignments, losses, parameters and selection, also when its capacities
overflow and iterations are redone, with near-ties among the parameters, screening and per-iteration subsets."""

import importlib
import traceback
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_suite import runtime as bdist
from bench_suite.activeft import ActiveFT, assign, fused_top2, optimize, reference_select, static_loop
from bench_suite.activeft.optimize import resolve_screen
from bench_suite.activeft.static_loop import resolve_loop
from bench_suite.bench.pools import clustered_sphere
from bench_suite.errors import BadInputError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pool():
    x, _ = clustered_sphere(2500, 48, 12, seed=3, rank=8)
    return torch.from_numpy(np.concatenate([x, x[:300]]))  # duplicate rows


@pytest.fixture(scope="module")
def tied_pool():
    """40 distinct rows, each 30 times: the initial parameters repeat, so rows tie exactly between parameters."""
    x, _ = clustered_sphere(40, 32, 5, seed=2)
    return torch.from_numpy(np.tile(x, (30, 1)))


def _run(x, budget, loop, seed=1, **cfg):
    conf = ActiveFT(progress=False, prune=False, loop=loop, **cfg).options
    n = int(x.shape[0])
    return optimize(x, slice(0, n), n, budget, conf, seed=seed, dist=bdist.Runtime())


def _assert_same(eager, static):
    assert eager["losses"] == static["losses"]  # bit for bit
    assert eager["final_loss"] == static["final_loss"]
    assert torch.equal(eager["theta"], static["theta"])
    np.testing.assert_array_equal(eager["rows"], static["rows"])
    assert eager["assign_stats"] == static["assign_stats"]
    assert eager["empty_params"] == static["empty_params"]


CASES = {
    "fp32": {},
    "bf16-screen": {"screen": "bf16"},
    "subset-blocks": {"subset": 1200, "block_size": 700, "screen": "bf16"},
    "bf16-3-candidates": {"screen": "bf16"},  # RECHECK_K = 3: many rows take the full float32 pass
}


@pytest.mark.parametrize("overflow", [False, True], ids=["fits", "overflows"])
@pytest.mark.parametrize("case", list(CASES))
def test_static_loop_equals_the_eager_loop(pool, case, overflow, monkeypatch):
    if case == "bf16-3-candidates":
        monkeypatch.setattr(assign, "RECHECK_K", 3)
    if overflow:  # capacities below what the iterations need: every overflow is redone with exact shapes
        monkeypatch.setattr(static_loop, "MIN_CAP", 1)
        monkeypatch.setattr(static_loop, "CAP_FACTOR", 0.5)
    eager = _run(pool, 70, "eager", iters=25, **CASES[case])
    static = _run(pool, 70, "static", iters=25, **CASES[case])
    assert eager["loop"] == "eager" and static["loop"] == "static" and static["loop_fallback"] is None
    _assert_same(eager, static)
    if case != "fp32":
        assert static["assign_stats"]["screen_rechecked"] > 0
    if case == "bf16-3-candidates":
        assert static["assign_stats"]["screen_full"] > 0
    if overflow and case != "fp32":
        assert static["loop_redone"] > 0  # the redo path ran
    if not overflow:
        assert static["loop_redone"] <= 2  # capacities of twice the first count rarely overflow


@pytest.mark.parametrize("screen,recheck_k", [("fp32", 8), ("bf16", 8), ("bf16", 3)])
def test_static_loop_decides_exact_ties_like_the_eager_loop(tied_pool, screen, recheck_k, monkeypatch):
    """With K = 3 a row tied among more parameters takes the float32 pass, also when it is a block's row 0, the
    row the fixed compactions pad with (the padding must not overwrite its result)."""
    monkeypatch.setattr(assign, "RECHECK_K", recheck_k)
    eager = _run(tied_pool, 60, "eager", iters=12, screen=screen, seed=3)
    static = _run(tied_pool, 60, "static", iters=12, screen=screen, seed=3)
    assert static["loop_caps"]["tie"] > 16  # many rows tied at the first iteration
    _assert_same(eager, static)
    if recheck_k == 3:
        assert static["assign_stats"]["screen_full"] > 0


def test_static_loop_equals_the_naive_reference(pool):
    x = np.ascontiguousarray(pool.numpy()[:2500])  # no duplicate rows: the reference snaps ties its own way
    fast = _run(torch.from_numpy(x), 40, "static", iters=30, seed=2)
    ref = reference_select(x, 40, dtype=torch.float64, iters=30, seed=2)
    np.testing.assert_allclose(fast["losses"], ref["losses"], rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(fast["rows"], ref["rows"])


def test_loop_and_screen_resolution_and_errors():
    opts = ActiveFT().options
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_screen("auto", gpu) == "bf16" and resolve_screen("auto", cpu) == "fp32"
    assert resolve_screen("tf32", gpu) == "tf32" and resolve_screen("bf16", cpu) == "bf16"
    assert resolve_loop("auto", opts, cpu, 1, False) == "eager"
    assert resolve_loop("auto", opts, gpu, 1, False) == "graph"
    assert resolve_loop("auto", opts, gpu, 2, False) == "eager"  # no NCCL inside a graph
    assert resolve_loop("auto", opts, gpu, 1, True) == "eager"  # pruning has dynamic shapes
    assert resolve_loop("static", opts, cpu, 2, False) == "static"
    paper = ActiveFT(objective="paper").options
    assert resolve_loop("auto", paper, gpu, 1, False) == "eager"
    with pytest.raises(BadInputError, match="loop=static needs objective=official"):
        resolve_loop("static", paper, cpu, 1, False)
    with pytest.raises(BadInputError, match="loop=graph needs one process on a CUDA device"):
        resolve_loop("graph", opts, cpu, 1, False)
    with pytest.raises(BadInputError, match="loop=static needs prune=false"):
        resolve_loop("static", opts, cpu, 1, True)
    with pytest.raises(BadInputError, match="loop=graph needs one process"):  # through the selector's options
        _run(torch.nn.functional.normalize(torch.randn(300, 8), dim=1), 10, "graph", iters=2)


def test_fixed_compaction_padding_never_overwrites_a_real_row(monkeypatch):
    """The fixed compactions pad with row 0. Here row 0 is undecided and needs the float32 pass (its best three
    parameters are one vector: its third is inside the window, RECHECK_K = 3), while its padding copies take the
    candidate route; a stand-in candidate route that always answers the last parameter shows which write landed."""
    monkeypatch.setattr(assign, "RECHECK_K", 3)
    gen = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=1)
    c = torch.nn.functional.normalize(torch.randn(10, 16, generator=gen), dim=1).double()
    c[2:5] = f[0].double()
    asg = assign.Assigner(f, 10, prune=False, screen="bf16", block=40)
    asg.set_params(c)
    monkeypatch.setattr(asg, "best_among", lambda fu, ci, fixed=None, real=None: torch.full((fu.shape[0],), 9))
    fixed = static_loop.Compactor({"screen": 32, "full": 8, "tie": 8}, {}, "cpu")
    p, _ = asg._screened(slice(0, 40), f, fixed)
    assert fixed.stats[1] >= 1 and fixed.overflow == 0  # row 0 took the float32 pass; nothing overflowed
    assert int(p[0]) == 2  # the exact answer (lowest index of the tie), not the padding's 9


def test_fixed_compaction_padding_does_not_fill_inner_capacities():
    """Block row 0 ties between two equal parameters; the screened selection pads with copies of it. Capacities
    sized from a dynamic pass (2x its counts) must hold in the fixed pass: the copies are not counted as ties."""
    gen = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(40, 32, generator=gen, dtype=torch.float64), dim=1)
    c[1] = c[0]
    picks = torch.randint(2, 40, (400,), generator=gen)
    f = torch.nn.functional.normalize(c[picks].float() + 0.6 * torch.randn(400, 32, generator=gen), dim=1)
    f[0] = c[0].float()

    def screened(caps, counts):
        asg = assign.Assigner(f, 40, prune=False, screen="bf16", block=4096)
        asg.set_params(c)
        fixed = static_loop.Compactor(caps, counts, "cpu")
        return asg._screened(slice(0, 400), f, fixed)[0], float(fixed.overflow)

    counts = {"tie": 0, "screen": 0, "full": 0}
    p_dynamic, _ = screened(None, counts)
    assert counts["tie"] >= 1 and counts["screen"] > 16
    caps = {k: max(16, 2 * v) for k, v in counts.items()}
    p_fixed, overflow = screened(caps, {})
    assert overflow == 0
    assert torch.equal(p_dynamic, p_fixed)


def test_loops_equal_check_passes_on_the_cpu(capsys):
    """``bench.loops_equal`` (gpu_check's first step): on a CPU, the uncaptured fixed-shape loop with the bf16
    screen, with overflowing capacities and with a subset, selects the eager float32 loop's ids."""
    from bench_suite.bench import loops_equal

    code = loops_equal.main(["--device", "cpu", "--n", "3000", "--dim", "32", "--budget", "60", "--iters", "12",
                             "--subset", "1000"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("PASS") == 4 and "FAIL" not in out


class Replayer:
    """A stand-in for ``static_loop.CudaGraphs`` on a CPU (no CUDA here): "capturing" keeps the iteration's body
    and a replay runs it uncaptured. It runs the loop's graph logic: capture, the replay check, recapture after
    an overflow, and the fallbacks (``fail``: capturing raises; ``after_replay``: called after each replay)."""

    def __init__(self, fail: bool = False, after_replay=None):
        self.fail, self.after_replay, self.captured, self.recovered = fail, after_replay, 0, 0

    def current_stream(self):
        return "caller's stream"

    def warm_up(self, body):
        body()

    def recover(self, stream):
        assert stream == "caller's stream"
        self.recovered += 1

    def capture(self, body):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1

        def replay():
            body()
            if self.after_replay is not None:
                self.after_replay()

        return SimpleNamespace(replay=replay)


def _graph_run(x, budget, graphs, seed=1, **cfg):
    """``optimize`` with the fixed-shape loop in graph mode driven by ``graphs(run)`` (the selector makes it only
    on a GPU, where Adam is capturable; here Adam is the host one, as in loop=static); None: the eager loop.
    The result has the final assignments of every row as ``"p"``."""
    opt_mod = importlib.import_module("bench_suite.activeft.optimize")
    conf = ActiveFT(progress=False, prune=False, loop="static" if graphs else "eager", **cfg).options
    n = int(x.shape[0])
    run = opt_mod._Run(x, slice(0, n), n, budget, conf, seed=seed, dist=bdist.Runtime())
    with opt_mod.full_fp32_matmul():
        if graphs is None:
            run.loop()
        else:
            run.static = static_loop.StaticLoop(run, "graph", graphs=graphs(run))
            run.static.run()
        return {**run.finish(True), "p": run.assigner.p.clone()}


@pytest.mark.parametrize("overflow", [False, True], ids=["fits", "overflows"])
def test_graph_logic_with_a_stand_in_equals_the_eager_loop(pool, overflow, monkeypatch):
    if overflow:
        monkeypatch.setattr(static_loop, "MIN_CAP", 1)
        monkeypatch.setattr(static_loop, "CAP_FACTOR", 0.5)
    # a small subset: many rows are drawn once, so a warm-up or check run that left its assignments would show
    cfg = {"iters": 12, "screen": "bf16", "subset": 300, "lr": 0.05}  # big steps: assignments change each step
    graphs = Replayer()
    got = _graph_run(pool, 70, lambda run: graphs, **cfg)
    assert got["loop"] == "graph" and got["loop_fallback"] is None
    assert got["loop_captures"] == graphs.captured >= 1
    if overflow:  # each overflow was redone and the graph recaptured
        assert got["loop_redone"] > 0 and got["loop_captures"] > 1
    eager = _graph_run(pool, 70, None, **cfg)
    _assert_same(eager, got)
    assert torch.equal(eager["p"], got["p"])  # warm-ups and checks left no trace


def test_graph_capture_failure_falls_back_and_says_why(pool):
    graphs = Replayer(fail=True)
    got = _graph_run(pool, 70, lambda run: graphs, iters=20)
    assert got["loop"] == "static" and graphs.recovered == 1
    assert got["loop_fallback"] == ("CUDA graph capture failed (RuntimeError: operation not permitted when stream "
                                    "is capturing)")
    _assert_same(_run(pool, 70, "eager", iters=20), got)


def test_graph_whose_replay_differs_is_not_used(pool):
    """A replay that does not do what the uncaptured iteration does (here: it also scales theta)."""
    got = _graph_run(pool, 70, lambda run: Replayer(after_replay=lambda: run.theta.data.mul_(1.001)), iters=20)
    assert got["loop"] == "static"
    assert got["loop_fallback"].startswith("the CUDA graph's replay differed from the uncaptured iteration")
    _assert_same(_run(pool, 70, "eager", iters=20), got)


class SyncAudit(TorchDispatchMode):
    """Records the ops that a CUDA stream capture rejects or that wait for the GPU: a value read on the host
    (``item``, ``int()``, ``bool()``, ``if tensor``), a tensor made from host data or copied across devices
    (``torch.tensor(list)``, ``.to(device)``), and ops whose output size depends on the data (``nonzero``, boolean
    indexing, ``masked_select``, ``unique``...). On a GPU each one breaks the capture (the graph falls back to the
    uncaptured loop) or drains the queue; on a CPU nothing complains, hence this audit. Reads that never reach the
    dispatcher on a CPU (``tolist``, ``numpy``, ``cpu``) are caught by ``AuditingReplayer``. ``allowed``: tensors
    whose host reads are the CPU stand-in's own (the host Adam's step counter, which is on the device in a graph)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "unique_dim_consecutive", "is_nonzero", "equal", "bincount", "histc",
               "argwhere", "nonzero_numpy", "allclose", "lift_fresh", "lift_fresh_copy"}

    def __init__(self, allowed=()):
        super().__init__()
        self.allowed = [t.data_ptr() for t in allowed]
        self.found: list[str] = []

    def note(self, what: str) -> None:
        where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()
                 if "/bench_suite/" in f.filename]
        self.found.append(f"{what} at {' < '.join(reversed(where[-3:]))}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        bad = name in self.SYNCING
        if name == "repeat_interleave" and kwargs.get("output_size") is None and func._overloadname == "Tensor":
            bad = True
        if name in ("index", "index_put", "index_put_"):
            bad = any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if name == "_to_copy" and kwargs.get("device") is not None:  # a copy between devices
            bad = True
        if bad and not (args and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.allowed):
            self.note(str(func))
        return func(*args, **kwargs)


class AuditingReplayer(Replayer):
    """A ``Replayer`` whose "capture" runs the body under ``SyncAudit``: what a real capture would run. The tensor
    methods that read a CPU tensor on the host without the dispatcher are wrapped meanwhile, so they are noted too."""

    HOST_READS = ("tolist", "numpy", "cpu", "__array__")

    def __init__(self, run):
        super().__init__()
        self.run, self.found = run, []

    def capture(self, body):
        audit = SyncAudit(allowed=[self.run.opt.step_t])
        saved = {name: getattr(torch.Tensor, name) for name in self.HOST_READS}

        def noting(name):
            def read(t, *args, **kwargs):
                audit.note(f"Tensor.{name}")
                return saved[name](t, *args, **kwargs)
            return read
        try:
            for name in self.HOST_READS:
                setattr(torch.Tensor, name, noting(name))
            with audit:
                graph = super().capture(body)
                body()
        finally:
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)
        self.found += audit.found
        return graph


def _top2_stand_in(f, c, out=None):
    """The Triton kernel's result by torch ops (for the audit of the kernel's path on a CPU)."""
    tv, ti = (f.double() @ c.double().T).topk(2, dim=1)
    if out is None:
        return tv.float(), ti[:, 0].clone()
    out[0].copy_(tv)
    out[1].copy_(ti[:, 0])
    return out


@pytest.mark.parametrize("cfg", [
    {"screen": "bf16", "subset": 1200, "block_size": 700},  # rows rechecked in blocks, a subset drawn each iteration
    {"screen": "fp32"},  # float32 near-ties decided exactly
    {"screen": "bf16", "recheck": 3},  # rows with more candidates than RECHECK_K take the full float32 pass
    # the GPU's default: the top-2 kernel's path (a torch stand-in here), the undecided rows' product in chunks
    {"screen": "bf16", "top2_kernel": "on", "subset": 1200, "chunk_rows": 7},
], ids=["bf16-subset-blocks", "fp32", "bf16-3-candidates", "bf16-kernel-chunks"])
def test_the_captured_iteration_never_waits_for_the_device(pool, tied_pool, cfg, monkeypatch):
    """The iteration a CUDA graph captures reads nothing back on the host and has no data-dependent shapes (the
    loop's point: one launch and one sync per iteration), with every compaction path in use (near-ties, screened
    rows, rechecks, exact ties, the top-2 kernel's chunked recheck); checked on the CPU under a dispatch audit, as CI
    has no GPU."""
    cfg = dict(cfg)
    if cfg.pop("recheck", None):
        monkeypatch.setattr(assign, "RECHECK_K", 3)
    chunk_rows = cfg.pop("chunk_rows", None)
    if chunk_rows:
        monkeypatch.setattr(fused_top2, "why_unavailable", lambda device: None)
        monkeypatch.setattr(fused_top2, "top2", _top2_stand_in)
        monkeypatch.setattr(assign, "RECHECK_BYTES", 2 * 40 * chunk_rows)  # B = 40
    for x in (pool, tied_pool):
        made = []

        def graphs(run):
            made.append(AuditingReplayer(run))
            return made[-1]

        got = _graph_run(x, 40, graphs, iters=12, lr=0.05, **cfg)
        assert got["loop"] == "graph" and made[0].captured >= 1
        assert got["top2_kernel"] == bool(chunk_rows)
        assert made[0].found == [], "\n".join(made[0].found[:20])
