"""``python -m bench_suite.bench.activeft_speed``: the ActiveFT fast path next to the naive reference.

Builds a seeded, CIFAR-100-sized pool of clustered unit features (``bench_suite.bench.pools``), runs the
pruned selector (``fast``), optionally the same loop without pruning (``blocked``: exact analytic gradients,
the full N x B argmax every iteration) and the naive reference (``naive``: the released code's approach,
the whole N x B matrix plus autograd, float32, direct exponentials), all in this process, and prints wall
and CPU seconds, peak memory (resident-set high-water mark above the pool already in memory), final loss
and the Eq. 16 EMD of the selection. Runs shorter than ``--iters`` are extrapolated linearly
(per-iteration time x T + snapping time) and marked ``*``.

    python -m bench_suite.bench.activeft_speed                       # N=50,000 d=384 B=1000 T=300
    python -m bench_suite.bench.activeft_speed --n 5000 --budget 100 --iters 50 --naive-iters 50   # quick
    python -m bench_suite.bench.activeft_speed --pool random --n 5000 --dim 64 --budget 50 --iters 100 \\
        --blocked-iters 100 --naive-iters 100       # unclustered: the pruning certifies little, B/K small
    python -m bench_suite.bench.activeft_speed --n 1281167 --budget 12812 --classes 1000 --iters 3 \\
        --subset 100000 --no-naive --no-emd --no-snap               # ImageNet size, loop only

No timing is asserted anywhere; the numbers depend on the machine (and on what else runs on it: the load
average is printed).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from bench_suite import atomic
from bench_suite.activeft import ActiveFT, optimize
from bench_suite.activeft.reference import reference_select
from bench_suite.bench.pools import clustered_sphere
from bench_suite.metrics import selection_emd
from bench_suite.runtime import Runtime


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Resident-set high-water mark of this process during a block (Linux: reset via clear_refs)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak_kib = _status_kib("VmHWM")
        self.above_kib = max(0, self.peak_kib - self.base)

    def as_dict(self) -> dict:
        return {"peak_rss_mib": round(self.peak_kib / 1024, 1), "peak_above_start_mib": round(self.above_kib / 1024, 1),
                "peak_exact": self.resettable}


def run_fast(feats: np.ndarray, budget: int, iters: int, seed: int, *, snap: bool = True, **cfg_kw) -> dict:
    cfg = ActiveFT(iters=iters, progress=False, **cfg_kw).options  # coerced and checked
    t = torch.from_numpy(feats)
    n = len(feats)
    with PeakMemory() as mem:
        w0, c0 = time.perf_counter(), time.process_time()
        res = optimize(t, slice(0, n), n, budget, cfg, seed=seed, dist=Runtime(), snap_result=snap)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    per_iter = res["seconds_optimize"] / max(iters, 1)
    return {"wall": wall, "cpu": cpu, "iters": iters, "per_iter": per_iter, "snap_s": res["seconds_snap"],
            "losses": res["losses"], "final_loss": res["final_loss"], "rows": res["rows"], **mem.as_dict(),
            "assign_stats": res["assign_stats"], "breakdown": res["seconds_breakdown"],
            "iter_seconds": res["seconds_per_iter"], "init_rows": res["init_rows"]}


def run_naive(feats: np.ndarray, budget: int, iters: int, seed: int, **kw) -> dict:
    with PeakMemory() as mem:
        w0, c0 = time.perf_counter(), time.process_time()
        res = reference_select(feats, budget, seed=seed, iters=iters, literal=True, dtype=torch.float32, **kw)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    snap_s = res["seconds"] - res["seconds_optimize"]
    return {"wall": wall, "cpu": cpu, "iters": iters, "per_iter": res["seconds_optimize"] / max(iters, 1),
            "snap_s": snap_s, "losses": res["losses"], "final_loss": res["final_loss"], "rows": res["rows"],
            **mem.as_dict()}


def _total(run: dict, iters: int) -> tuple[float, bool]:
    if run["iters"] == iters:
        return run["wall"], False
    return run["per_iter"] * iters + run["snap_s"], True


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench_suite.bench.activeft_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000, help="pool size N (CIFAR-100: 50,000; ImageNet: 1,281,167)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--budget", type=int, default=1000, help="B")
    p.add_argument("--iters", type=int, default=300, help="T")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--pool", default="clustered", choices=("clustered", "random"),
                   help="clustered unit features, or i.i.d. Gaussian rows normalised (no structure to prune on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", default="official", choices=("official", "paper"))
    p.add_argument("--subset", type=int, default=0, help="M random samples per iteration (0 = all)")
    p.add_argument("--candidates", type=int, default=16, help="K candidates per sample for the pruning")
    p.add_argument("--naive-iters", type=int, default=20,
                   help="iterations of the naive reference (extrapolated to T when fewer)")
    p.add_argument("--blocked-iters", type=int, default=0,
                   help="iterations of the unpruned analytic loop (0 = skip; extrapolated to T)")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--no-emd", action="store_true", help="skip the Eq. 16 EMD (an N x B pass per run)")
    p.add_argument("--no-snap", action="store_true", help="time the optimisation loop only (no selection)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if args.pool == "random":
        feats = np.random.default_rng(args.seed).standard_normal((args.n, args.dim)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    else:
        feats, _ = clustered_sphere(args.n, args.dim, args.classes, seed=args.seed)
    con.print(f"pool: {args.pool} N={args.n:,} d={args.dim} classes={args.classes} seed={args.seed} "
              f"({feats.nbytes / 2**20:.0f} MiB, built in {time.perf_counter() - t0:.1f}s); B={args.budget} "
              f"T={args.iters} objective={args.objective} M={args.subset or 'all'}; torch threads "
              f"{torch.get_num_threads()}; load average {load0[0]:.2f}")
    kw = {"objective": args.objective, "subset": args.subset}
    snap = not args.no_snap
    runs: dict[str, dict] = {}
    runs["fast"] = run_fast(feats, args.budget, args.iters, args.seed, snap=snap, candidates=args.candidates, **kw)
    con.print(f"fast done: {runs['fast']['wall']:.1f}s; time split {runs['fast']['breakdown']}; "
              f"assignments {runs['fast']['assign_stats']}")
    its = runs["fast"]["iter_seconds"]
    if its:
        con.print("fast seconds per iteration: " + (", ".join(f"{v:.2f}" for v in its) if len(its) <= 12 else
                  f"first {its[0]:.2f}, median {float(np.median(its)):.3f}, last {its[-1]:.3f}"))
    if args.blocked_iters:
        runs["blocked"] = run_fast(feats, args.budget, args.blocked_iters, args.seed, snap=snap, prune=False, **kw)
    equal_t = None
    if not args.no_naive:
        nt = min(args.naive_iters, args.iters)
        runs["naive"] = run_naive(feats, args.budget, nt, args.seed, objective=args.objective, subset=args.subset)
        if nt != args.iters:
            # the fast path at the naive run's T, for the loss/EMD comparison at equal iterations
            equal_t = run_fast(feats, args.budget, nt, args.seed, snap=snap, candidates=args.candidates, **kw)
        else:
            equal_t = runs["fast"]
    if not args.no_emd and snap:
        for run in [*runs.values(), *([equal_t] if equal_t is not None and equal_t is not runs["fast"] else [])]:
            run["emd"] = selection_emd(feats, run["rows"])
        runs["fast"]["emd_init"] = selection_emd(feats, runs["fast"]["init_rows"])
        con.print(f"EMD of the random initial selection (iteration 0): {runs['fast']['emd_init']:.5f}")

    table = Table(title=f"ActiveFT selection, N={args.n:,} d={args.dim} B={args.budget} T={args.iters}")
    for col in ("run", "iters run", "wall s", "CPU s", "s / iter", f"total s at T={args.iters}", "peak MiB",
                "final loss", "EMD"):
        table.add_column(col, justify="right")
    for name, run in runs.items():
        tot, extrap = _total(run, args.iters)
        table.add_row(name, str(run["iters"]), f"{run['wall']:.1f}", f"{run['cpu']:.1f}", f"{run['per_iter']:.3f}",
                      f"{tot:.1f}{' *' if extrap else ''}",
                      f"{run['peak_above_start_mib']:.0f} (rss {run['peak_rss_mib']:.0f})",
                      f"{run['final_loss']:.6f}", f"{run['emd']:.5f}" if "emd" in run else "-")
    con.print(table)
    out = {"args": vars(args), "load_average_start": load0, "load_average_end": os.getloadavg(), "runs": {}}
    fast_total, _ = _total(runs["fast"], args.iters)
    for name, run in runs.items():
        if name == "fast":
            continue
        tot, extrap = _total(run, args.iters)
        con.print(f"speed-up of fast over {name}: {tot / fast_total:.1f}x wall"
                  f"{' (extrapolated from ' + str(run['iters']) + ' iterations)' if extrap else ''}; "
                  f"per iteration {run['per_iter'] / runs['fast']['per_iter']:.1f}x")
    if "naive" in runs:
        nv, eq = runs["naive"], equal_t
        k = len(nv["losses"])
        curve = max((_rel(a, b) for a, b in zip(runs["fast"]["losses"][:k], nv["losses"])), default=0.0)
        msg = (f"loss curves over the first {k} iterations agree to {curve:.2e} relative; at T={nv['iters']}: "
               f"final loss fast {eq['final_loss']:.6f} vs naive {nv['final_loss']:.6f} "
               f"({_rel(eq['final_loss'], nv['final_loss']):.2e} rel)")
        if "emd" in nv and "emd" in eq:
            msg += f", EMD fast {eq['emd']:.5f} vs naive {nv['emd']:.5f} ({_rel(eq['emd'], nv['emd']):.2e} rel)"
        if snap:
            same = len(np.intersect1d(eq["rows"], nv["rows"])) / len(nv["rows"])
            msg += f", selected ids identical: {same:.1%}"
        con.print(msg)
        out["curve_max_rel"] = curve
    for name, run in runs.items():
        tot, extrap = _total(run, args.iters)
        out["runs"][name] = {k: v for k, v in run.items() if k not in ("rows", "losses", "init_rows")}
        out["runs"][name].update(total_at_T=tot, extrapolated=extrap, first_losses=run["losses"][:5])
    if equal_t is not None and equal_t is not runs["fast"]:
        out["fast_at_naive_T"] = {k: v for k, v in equal_t.items() if k not in ("rows", "losses", "init_rows")}
    if args.json:
        atomic.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
