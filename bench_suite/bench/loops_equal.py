"""``python -m bench_suite.bench.loops_equal [--device cuda]``: the ActiveFT loops select the same on this device.

The selector's GPU default (the fixed-shape iteration replayed as a CUDA graph, bf16 screen: ``static_loop``)
can only run on a GPU, so its agreement with the eager float32 loop is checked there, by this script (the
first step of ``gpu_check.sh``). On one pool and device it runs the eager float32 loop as the reference and
then each other loop, and prints PASS or FAIL per check; the exit status is 1 if any check failed.

* ``static`` (uncaptured) and ``graph`` with the bf16 screen: the same assignments as the reference, so the
  same ids, and losses within ``--rtol`` (the screened loss takes its similarity from a row dot, the reference
  from the product: float32 rounding apart);
* ``graph`` against ``static``: the same code, captured or not (1e-9);
* ``graph`` with capacities forced to overflow (every compaction too small): redone iterations and recaptures;
* ``graph`` with a per-iteration subset (``--subset``);
* ``graph`` with the bf16 screen without the Triton top-2 kernel (``top2_kernel=off``), and with the tf32 screen;
* the bf16 run (``graph`` on a GPU, else ``static``) again: the same losses, parameters and ids bit for bit (the
  per-parameter sums are cuSPARSE's on a GPU: a run-to-run difference there would show).

A graph run must have used the graph (no ``loop_fallback``), and on a GPU a screened run the Triton top-2 kernel
(``fused_top2``; no ``top2_kernel_fallback``). On a CPU only the uncaptured loops run, without the kernel.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from bench_suite.activeft import ActiveFT, optimize, static_loop
from bench_suite.bench.pools import clustered_sphere
from bench_suite.runtime import Runtime, resolve_device


def _run(pool: torch.Tensor, budget: int, iters: int, seed: int, **options) -> dict:
    cfg = ActiveFT(iters=iters, progress=False, prune=False, **options).options
    n = int(pool.shape[0])
    return optimize(pool, slice(0, n), n, budget, cfg, seed=seed, dist=Runtime())


def _compare(name: str, got: dict, ref: dict, rtol: float, *, graph: bool, kernel: bool = False) -> list[str]:
    """The failures of one run against its reference (empty: it passed). ``graph``/``kernel``: the run must have
    used the CUDA graph / the Triton top-2 kernel."""
    bad = []
    if graph and (got["loop"] != "graph" or got["loop_fallback"]):
        bad.append(f"ran {got['loop']} ({got['loop_fallback']})")
    if kernel and not got["top2_kernel"]:
        bad.append(f"ran without the top-2 kernel ({got['top2_kernel_fallback']})")
    if not np.array_equal(got["rows"], ref["rows"]):
        same = len(np.intersect1d(got["rows"], ref["rows"])) / len(ref["rows"])
        bad.append(f"ids differ ({same:.2%} in common)")
    losses = np.asarray(got["losses"] + [got["final_loss"]])
    ref_losses = np.asarray(ref["losses"] + [ref["final_loss"]])
    worst = float(np.max(np.abs(losses - ref_losses) / np.abs(ref_losses)))
    if not worst <= rtol:
        bad.append(f"losses differ by {worst:.2e} relative (allowed {rtol:.0e})")
    print(f"{'FAIL' if bad else 'PASS'} {name}: loop {got['loop']}, screen {got['screen']}, "
          f"top-2 kernel {'on' if got['top2_kernel'] else 'off'}, "
          f"redone {got.get('loop_redone', 0)}, caps {got.get('loop_caps')}, worst loss rel diff {worst:.2e}"
          + (f"; {'; '.join(bad)}" if bad else ""))
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--budget", type=int, default=500)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--subset", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=1e-5, help="losses against the eager float32 reference")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    feats, _ = clustered_sphere(args.n, args.dim, max(2, args.budget // 5), seed=args.seed)
    pool = torch.from_numpy(feats).to(device)
    on_gpu = device.type == "cuda"
    loop = "graph" if on_gpu else "static"
    print(f"pool {args.n} x {args.dim}, B = {args.budget}, T = {args.iters} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if on_gpu else " (no GPU: the uncaptured loops only)"))
    kw = {"iters": args.iters, "seed": args.seed}
    failures = []
    ref = _run(pool, args.budget, loop="eager", screen="fp32", **kw)
    static = _run(pool, args.budget, loop="static", screen="bf16", **kw)
    failures += _compare("static bf16 vs eager fp32", static, ref, args.rtol, graph=False, kernel=on_gpu)
    if on_gpu:
        graph = _run(pool, args.budget, loop="graph", screen="bf16", **kw)
        failures += _compare("graph bf16 vs eager fp32", graph, ref, args.rtol, graph=True, kernel=True)
        failures += _compare("graph bf16 vs static bf16", graph, static, 1e-9, graph=True, kernel=True)
        failures += _compare("graph fp32 vs eager fp32", _run(pool, args.budget, loop="graph", screen="fp32", **kw),
                             ref, args.rtol, graph=True)
        failures += _compare("graph bf16 without the top-2 kernel vs eager fp32",
                             _run(pool, args.budget, loop="graph", screen="bf16", top2_kernel="off", **kw), ref,
                             args.rtol, graph=True)
        failures += _compare("graph tf32 vs eager fp32", _run(pool, args.budget, loop="graph", screen="tf32", **kw),
                             ref, args.rtol, graph=True, kernel=True)
    first = graph if on_gpu else static
    again = _run(pool, args.budget, loop=loop, screen="bf16", **kw)
    failures += _compare(f"{loop} bf16 run twice, bit for bit", again, first, 0.0, graph=on_gpu, kernel=on_gpu)
    if not torch.equal(again["theta"], first["theta"]):
        failures.append("the parameters differ between two identical runs")
        print(f"FAIL {loop} bf16 run twice: the parameters differ (max |d theta| "
              f"{float((again['theta'] - first['theta']).abs().max()):.2e})")
    # every compaction too small: each iteration is redone (and, in a graph, recaptured): 20 iterations will do
    short = {**kw, "iters": min(args.iters, 20)}
    caps = (static_loop.MIN_CAP, static_loop.CAP_FACTOR)
    static_loop.MIN_CAP, static_loop.CAP_FACTOR = 1, 0.5
    try:
        forced = _run(pool, args.budget, loop=loop, screen="bf16", **short)
    finally:
        static_loop.MIN_CAP, static_loop.CAP_FACTOR = caps
    failures += _compare(f"{loop} bf16, capacities overflowing, vs eager fp32", forced,
                         _run(pool, args.budget, loop="eager", screen="fp32", **short), args.rtol, graph=on_gpu,
                         kernel=on_gpu)
    if not forced.get("loop_redone"):
        failures.append("the forced overflows redid no iteration")
        print("FAIL the forced overflows redid no iteration")
    sub_ref = _run(pool, args.budget, loop="eager", screen="fp32", subset=args.subset, **kw)
    failures += _compare(f"{loop} bf16 with M = {args.subset} vs eager fp32",
                         _run(pool, args.budget, loop=loop, screen="bf16", subset=args.subset, **kw), sub_ref,
                         args.rtol, graph=on_gpu, kernel=on_gpu)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
