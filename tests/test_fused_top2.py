"""The Triton top-2 kernel of the screened pass (``activeft.fused_top2``): on a GPU it replaces the materialised bf16
product and its top-2. Here it runs under Triton's interpreter (numpy, in a subprocess: the mode is chosen when
triton is imported), which checks the kernel's logic (tiling, masks, the running top-2 merge) and the selector's
path through it; what a GPU compiles is checked on the pool's rows before use (``self_check``, tested here with
stand-ins) and, on a GPU, by ``bench.loops_equal``."""

import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest
import torch

from bench_suite import runtime
from bench_suite.activeft import ActiveFT, fused_top2, optimize
from bench_suite.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INTERPRETED = textwrap.dedent("""
    import numpy as np, torch
    from bench_suite import runtime
    from bench_suite.activeft import ActiveFT, fused_top2, optimize
    from bench_suite.bench.pools import clustered_sphere

    torch.set_num_threads(1)
    assert fused_top2.interpreted() and fused_top2.why_unavailable(torch.device("cpu")) is None

    # the kernel against the float64 product of the same rounded inputs: partial row, parameter and depth tiles,
    # B = 1, and a repeated parameter (exact ties)
    gen = torch.Generator().manual_seed(0)
    for m, b, d in ((300, 77, 64), (70, 1, 40), (257, 33, 100), (33, 130, 48)):
        f = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
        c = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
        c[b - 1] = c[0]
        for dt in (torch.bfloat16, torch.float32):
            tv, i1 = fused_top2.top2(f.to(dt), c.to(dt))
            ref = f.to(dt).double() @ c.to(dt).double().T
            k = min(2, b)
            rv, ri = ref.topk(k, dim=1)
            assert tv.shape == (m, 2) and i1.dtype == torch.long
            err = float((tv[:, :k].double() - rv).abs().max())
            assert err < 1e-6, (m, b, d, dt, err)
            if b == 1:
                assert torch.isinf(tv[:, 1]).all() and (i1 == 0).all()
            clear = (rv[:, 0] - rv[:, 1]) > 1e-5 if k > 1 else torch.ones(m, dtype=torch.bool)
            assert torch.equal(i1[clear], ri[clear, 0]), (m, b, d, dt)
            assert ref.gather(1, i1[:, None]).squeeze(1).sub(rv[:, 0]).abs().max() < 1e-6  # a best even on ties
        assert fused_top2.self_check(f, b, "bf16") is None and fused_top2.self_check(f, b, "tf32") is None

    # the selection through the kernel: the same run as without it, bit for bit, in both loops and both screens
    x, _ = clustered_sphere(1000, 48, 10, seed=3, rank=8)
    pool = torch.from_numpy(np.concatenate([x, x[:150]]))
    n = int(pool.shape[0])
    def run(**cfg):
        conf = ActiveFT(progress=False, prune=False, iters=10, **cfg).options
        return optimize(pool, slice(0, n), n, 40, conf, seed=1, dist=runtime.Runtime())
    for loop in ("eager", "static"):
        for screen in ("bf16", "tf32"):
            on, off = run(loop=loop, screen=screen, top2_kernel="on"), run(loop=loop, screen=screen, top2_kernel="off")
            assert on["top2_kernel"] and on["top2_kernel_fallback"] is None and not off["top2_kernel"]
            assert on["losses"] == off["losses"] and on["final_loss"] == off["final_loss"], (loop, screen)
            assert torch.equal(on["theta"], off["theta"]), (loop, screen)
            np.testing.assert_array_equal(on["rows"], off["rows"])
            assert on["assign_stats"]["screen_rechecked"] > 0  # the window sent rows to the exact decision
            print(loop, screen, "rechecked with / without the kernel:", on["assign_stats"]["screen_rechecked"],
                  off["assign_stats"]["screen_rechecked"])
    # the undecided rows' written-out product in chunks of 7 rows (at ImageNet size: of 1 GiB)
    from bench_suite.activeft import assign
    assign.RECHECK_BYTES = 2 * 40 * 7
    chunked, off = (run(loop="static", screen="bf16", top2_kernel=k) for k in ("on", "off"))
    assert chunked["losses"] == off["losses"] and torch.equal(chunked["theta"], off["theta"])
    print("INTERPRETED OK")
""")


@pytest.mark.slow
def test_kernel_under_the_interpreter_and_the_selection_through_it():
    """Under ``TRITON_INTERPRET=1``: the kernel's top-2 equals the float64 product's (tile edges, B = 1, exact ties);
    a selection with ``top2_kernel=on`` equals the one without, bit for bit (losses, theta, rows) in the eager and
    the fixed-shape loop, with the bf16 and tf32 screens, also with the undecided rows' product taken in chunks."""
    triton = pytest.importorskip("triton")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8):  # e.g. the GPU machine's 3.6
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound (any kernel, "
                    "with numpy 2.4-2.5; checked with 3.6.0); the compiled kernel is unaffected")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and "INTERPRETED OK" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def _stand_in(monkeypatch, kernel):
    monkeypatch.setattr(fused_top2, "why_unavailable", lambda device: None)
    monkeypatch.setattr(fused_top2, "top2", kernel)


def _exact_top2(f, c, out=None):
    s = f.double() @ c.double().T
    tv, ti = s.topk(2, dim=1)
    return tv.float(), ti[:, 0].clone()


@pytest.fixture(scope="module")
def rows():
    gen = torch.Generator().manual_seed(4)
    return torch.nn.functional.normalize(torch.randn(600, 24, generator=gen), dim=1)


def test_self_check_accepts_a_right_kernel_and_names_a_wrong_overrunning_or_failing_one(rows, monkeypatch):
    _stand_in(monkeypatch, _exact_top2)
    assert fused_top2.self_check(rows, 50, "bf16") is None

    def swapped(f, c, out=None):  # the second best reported as the best on one row
        tv, i1 = _exact_top2(f, c)
        s = f.double() @ c.double().T
        i1[7] = s[7].topk(2).indices[1]
        return tv, i1
    _stand_in(monkeypatch, swapped)
    why = fused_top2.self_check(rows, 50, "bf16")
    assert why is not None and why.startswith("the top-2 kernel disagreed with the float64 product on 1 of 600 rows")

    def shifted(f, c, out=None):  # values off by more than float32 accumulation
        tv, i1 = _exact_top2(f, c)
        return tv + 1e-4, i1
    _stand_in(monkeypatch, shifted)
    assert "disagreed" in fused_top2.self_check(rows, 50, "bf16")

    def overrunning(f, c, out):  # right values, and one row written past the end
        tv, i1 = _exact_top2(f, c)
        out[0].copy_(tv)
        out[1].copy_(i1)
        torch.as_strided(out[0], (f.shape[0] + 1, 2), (2, 1))[-1] = 0.0
        return out
    _stand_in(monkeypatch, overrunning)
    assert fused_top2.self_check(rows, 50, "bf16") == "the top-2 kernel wrote past its rows"

    def failing(f, c, out=None):
        raise RuntimeError("PTX compile error\nmore lines")
    _stand_in(monkeypatch, failing)
    assert fused_top2.self_check(rows, 50, "bf16") == "the top-2 kernel failed: RuntimeError: PTX compile error"


def test_a_kernel_failing_its_self_check_leaves_the_materialised_product_in_charge(rows, monkeypatch):
    """top2_kernel=on with a kernel whose self-check fails: the run says why and selects as without the kernel."""
    def failing(f, c, out=None):
        raise RuntimeError("no GPU compiler")
    _stand_in(monkeypatch, failing)
    conf = ActiveFT(progress=False, prune=False, iters=4, screen="bf16", top2_kernel="on").options
    got = optimize(rows, slice(0, 600), 600, 20, conf, seed=0, dist=runtime.Runtime())
    assert not got["top2_kernel"] and got["top2_kernel_fallback"].endswith("RuntimeError: no GPU compiler")
    conf = ActiveFT(progress=False, prune=False, iters=4, screen="bf16", top2_kernel="off").options
    ref = optimize(rows, slice(0, 600), 600, 20, conf, seed=0, dist=runtime.Runtime())
    assert got["losses"] == ref["losses"] and np.array_equal(got["rows"], ref["rows"])


def test_top2_kernel_option_errors(rows):
    def run(**cfg):
        conf = ActiveFT(progress=False, iters=2, **cfg).options
        return optimize(rows, slice(0, 600), 600, 20, conf, seed=0, dist=runtime.Runtime())
    if not fused_top2.interpreted():
        with pytest.raises(BadInputError, match="top2_kernel=on: .*runs on a CUDA device"):
            run(prune=False, screen="bf16", top2_kernel="on")
    with pytest.raises(BadInputError, match="top2_kernel=on needs screen=bf16 or tf32 and prune=false"):
        run(prune=False, screen="fp32", top2_kernel="on")
    with pytest.raises(BadInputError, match="top2_kernel=on needs"):
        run(prune=True, screen="bf16", top2_kernel="on")
    auto = run(prune=False, screen="bf16")  # auto on a CPU: the materialised product, nothing to report
    assert not auto["top2_kernel"] and auto["top2_kernel_fallback"] is None


def test_top2_benchmark_runs_the_written_out_path_without_a_gpu(capsys):
    from bench_suite.bench import top2

    assert top2.main(["--device", "cpu", "--n", "2000", "--b", "40", "--dim", "32", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "2000 x 32 rows, B = 40, bf16, on cpu" in out and "written out (" in out
    if not fused_top2.interpreted():
        assert "no kernel timings: the Triton kernel runs on a CUDA device" in out


@pytest.mark.parametrize("arch", [90, 80])
def test_kernel_compiles_for_the_gpus_with_tensor_cores_and_no_spills(arch):
    """What a GPU would compile, compiled here ahead of time (Triton's compiler and its ptxas need no GPU), with the
    alignment hints a launch gives (16-byte aligned pointers, strides that are multiples of 16, as for every encoder's
    width): for an H100/H200 (sm_90) and an A100 (sm_80), bf16 and float32 (TF32) inputs at the tiles in use, and a
    depth that is not a multiple of the tile's.
    The PTX multiplies on the tensor cores (wgmma on sm_90, mma on sm_80), loads through the cp.async pipeline, and
    ptxas keeps every value in registers (no spills)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench_suite.activeft.fused_top2_kernel import top2_kernel

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 6, 7)}  # pointers and strides
    for kind, dtype, prec in (("bf16", "bf16", "default"), ("fp32", "fp32", "tf32")):
        bm, bn, bk, warps, stages = fused_top2.TILES[kind]
        for d in (384, 112):  # 112: a last depth step of 48 of the tile's 64 (masked)
            sig = {"f_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "tv_ptr": "*fp32", "i1_ptr": "*i64", "n_rows": "i32",
                   "n_params": "i32", "stride_f": "i32", "stride_c": "i32", "D": "constexpr", "BM": "constexpr",
                   "BN": "constexpr", "BK": "constexpr", "PREC": "constexpr"}
            consts = {"D": d, "BM": bm, "BN": bn, "BK": bk, "PREC": fused_top2.PRECISION[prec]}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")
                compiled = triton.compile(ASTSource(fn=top2_kernel, signature=sig, constexprs=consts, attrs=aligned),
                                          target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": warps, "num_stages": stages})
            ptx = compiled.asm["ptx"]
            assert len(compiled.asm["cubin"]) > 0
            assert ("wgmma.mma_async" if arch == 90 else "mma.sync") in ptx, (kind, d, arch)
            assert "cp.async" in ptx, (kind, d, arch)
            target = next(line.split()[1] for line in ptx.splitlines() if line.startswith(".target"))
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "k.ptx")
                with open(src, "w") as fh:
                    fh.write(ptx)
                info = subprocess.run([ptxas, f"-arch={target}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                                      capture_output=True, text=True, check=True)
            report = info.stdout + info.stderr
            assert "0 bytes spill stores" in report and "spill stores" in report, (kind, d, arch, report)
