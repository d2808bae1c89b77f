"""``python -m bench_suite.bench.selector``: the ActiveFT selector next to the naive loop, on a CPU or a GPU.

For each budget, in one process and on one device: the project's path as the selector runs it (``auto``:
the full product or the certified pruning, ``optimize.resolve_prune``), optionally each path forced
(``--paths auto,full,pruned,static,graph``), the naive loop (the released code's approach: the whole N x B matrix plus
autograd, float32, direct exponentials; ``reference.reference_select``) and one brute N x B pass (matmul +
argmax, the floor of any exact method that does a full pass per iteration). It prints wall seconds, the
ratios between them, peak memory, the final loss, the Eq. 16 EMD of the selection and the share of ids the
project's path has in common with the naive loop. Runs shorter than ``--iters`` are extrapolated linearly
(per-iteration time x T + snapping time) and marked ``*``; the EMD and id comparison is then made with the
project's path at the naive run's T.

    python -m bench_suite.bench.selector --device cuda --budgets 1000,2500,5000       # issue 10's GPU goal
    python -m bench_suite.bench.selector --device cuda --n 1281167 --classes 1000 --budgets 12812 --no-naive
    python -m bench_suite.bench.selector --device cuda --n 1281167 --classes 1000 --budgets 12812 \\
        --subset 100000 --no-naive                                                   # the paper's M
    python -m bench_suite.bench.selector --n 50000 --budgets 1000 --naive-iters 10    # CPU
    python -m bench_suite.bench.selector --pool blobs --budgets 1000                  # another pool shape
    python -m bench_suite.bench.selector --pool store --store work_dirs/features/<store> --budgets 100
    python -m bench_suite.bench.selector --table3 --device cuda                       # the select CLI, end to end

Pools: ``clustered`` (``pools.clustered_sphere``: anisotropic clusters, DINO-like similarities), ``blobs``
(scikit-learn's ``make_blobs``, normalised: what a new user tries first), ``random`` (i.i.d. Gaussian rows
normalised: no structure for the pruning), ``store`` (a real feature store, ``--store DIR``).

``--table3`` times ``python -m bench_suite.cli.select`` end to end (process start-up, store load, selection,
JSON) for ActiveFT and K-Means at 2 / 5 / 10% of the pool, as the paper's Table 3 does on CIFAR-100.

No timing is asserted anywhere; the numbers depend on the machine and on what else runs on it (the load
average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_suite import atomic
from bench_suite.activeft import ActiveFT, optimize
from bench_suite.activeft.reference import reference_select
from bench_suite.bench.memory import PeakMemory
from bench_suite.bench.pools import clustered_sphere
from bench_suite.metrics import selection_emd
from bench_suite.runtime import Runtime, resolve_device

# each path's options (over --screen): auto is what the selector runs by default; full, the full float32 product in
# the eager loop (the GPU default before the CUDA graph); static / graph, the full product in the fixed-shape loop,
# uncaptured / replayed as a CUDA graph; graph-fp32, the graph without the reduced-precision screen; graph-nokernel,
# the graph with the screen's product written out and its top-2 taken by torch (not the Triton kernel, fused_top2)
PATHS = {"auto": {}, "full": {"prune": False, "loop": "eager", "screen": "fp32"}, "pruned": {"prune": True},
         "static": {"prune": False, "loop": "static"}, "graph": {"prune": False, "loop": "graph"},
         "graph-fp32": {"prune": False, "loop": "graph", "screen": "fp32"},
         "graph-nokernel": {"prune": False, "loop": "graph", "top2_kernel": "off"}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _DeviceMemory:
    """Peak device memory above what was allocated at entry (CUDA), else the process's resident set."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.rss = PeakMemory().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.above_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        else:
            self.rss.__exit__(*exc)
            self.above_mib = self.rss.above_kib / 1024


def run_project(pool: torch.Tensor, budget: int, iters: int, seed: int, *, prune=None, snap: bool = True,
                **cfg_kw) -> dict:
    """The selector's loop (``optimize``) on ``pool`` (already on its device), as the registry runs it."""
    cfg = ActiveFT(iters=iters, progress=False, prune=prune, **cfg_kw).options
    n = int(pool.shape[0])
    with _DeviceMemory(pool.device) as mem:
        sync(pool.device)
        w0 = time.perf_counter()
        res = optimize(pool, slice(0, n), n, budget, cfg, seed=seed, dist=Runtime(), snap_result=snap)
        sync(pool.device)
        wall = time.perf_counter() - w0
    return {"wall": wall, "iters": iters, "per_iter": res["seconds_optimize"] / max(iters, 1),
            "snap_s": res["seconds_snap"], "losses": res["losses"], "final_loss": res["final_loss"],
            "rows": res["rows"], "peak_above_mib": mem.above_mib, "pruned": res["pruned"],
            "assign_stats": res["assign_stats"], "breakdown": res["seconds_breakdown"], "loop": res["loop"],
            "screen": res["screen"], "top2_kernel": res["top2_kernel"],
            "top2_kernel_fallback": res["top2_kernel_fallback"],
            "loop_fallback": res["loop_fallback"],
            "init_rows": res["init_rows"]}


def run_naive(feats: np.ndarray, budget: int, iters: int, seed: int, device: torch.device, **kw) -> dict:
    with _DeviceMemory(device) as mem:
        w0 = time.perf_counter()
        res = reference_select(feats, budget, seed=seed, iters=iters, literal=True, dtype=torch.float32,
                               device=device, **kw)
        sync(device)
        wall = time.perf_counter() - w0
    return {"wall": wall, "iters": iters, "per_iter": res["seconds_optimize"] / max(iters, 1),
            "snap_s": max(0.0, wall - res["seconds_optimize"]), "losses": res["losses"],
            "final_loss": res["final_loss"], "rows": res["rows"], "peak_above_mib": mem.above_mib}


def brute_pass(pool: torch.Tensor, budget: int, seed: int, dtype=torch.float32, repeats: int = 3) -> float:
    """Seconds of one N x B pass (matmul + argmax over the pool, in blocks of <= 1 GiB of scores)."""
    g = torch.Generator().manual_seed(seed)
    c = pool[torch.randperm(pool.shape[0], generator=g)[:budget].to(pool.device)].to(dtype)
    f = pool.to(dtype)
    block = max(1024, (2 ** 30) // (4 * budget))
    best = float("inf")
    for _ in range(repeats):
        sync(pool.device)
        t0 = time.perf_counter()
        for s in range(0, f.shape[0], block):
            (f[s:s + block] @ c.T).argmax(dim=1)
        sync(pool.device)
        best = min(best, time.perf_counter() - t0)
    return best


def total_at(run: dict, iters: int) -> tuple[float, bool]:
    """Seconds for all T iterations plus snapping (extrapolated from a shorter run: flag True)."""
    if run["iters"] == iters:
        return run["wall"], False
    return run["per_iter"] * iters + run["snap_s"], True


def make_pool(args) -> tuple[np.ndarray, str]:
    """The benchmark's pool (float32, unit rows) and a one-line description."""
    if args.pool == "store":
        from bench_suite.store import FeatureStore

        if not args.store:
            raise SystemExit("error: --pool store needs --store DIR (a feature store)")
        store = FeatureStore.open(args.store)
        feats = np.ascontiguousarray(np.asarray(store.features, dtype=np.float32))
        return feats, f"store {args.store} ({feats.shape[0]:,} x {feats.shape[1]})"
    if args.pool == "random":
        feats = np.random.default_rng(args.seed).standard_normal((args.n, args.dim)).astype(np.float32)
    elif args.pool == "blobs":
        from sklearn.datasets import make_blobs

        feats = make_blobs(args.n, args.dim, centers=args.classes, random_state=args.seed)[0].astype(np.float32)
    else:
        feats, _ = clustered_sphere(args.n, args.dim, args.classes, seed=args.seed)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats, f"{args.pool} N={args.n:,} d={args.dim} classes={args.classes} seed={args.seed}"


def _ids_in_common(a, b) -> float:
    return len(np.intersect1d(a, b)) / max(len(b), 1)


def bench_budget(feats: np.ndarray, pool: torch.Tensor, budget: int, args, con) -> dict:
    """Every run for one budget; prints its table and ratios; returns the numbers."""
    from rich.table import Table

    kw = {"objective": args.objective, "subset": args.subset, "screen": args.screen}
    snap = not args.no_snap
    runs: dict[str, dict] = {}
    # warm-up (lazy initialisation: CUDA context and library handles, first-use allocations), not timed
    run_project(pool, budget, 2, args.seed, snap=False, **kw)
    if not args.no_naive:
        run_naive(feats[: min(len(feats), 4 * budget)], budget, 1, args.seed, pool.device)
    for name in args.paths.split(","):
        runs[name] = run_project(pool, budget, args.iters, args.seed, snap=snap, **{**kw, **PATHS[name]})
    brute = brute_pass(pool, budget, args.seed)
    extra = {"brute_pass_fp32_s": brute}
    if pool.device.type == "cuda":
        extra["brute_pass_bf16_s"] = brute_pass(pool, budget, args.seed, torch.bfloat16)
    equal_t = None
    if not args.no_naive:
        nt = min(args.naive_iters, args.iters)
        runs["naive"] = run_naive(feats, budget, nt, args.seed, pool.device, objective=args.objective,
                                  subset=args.subset)
        first = next(iter(runs))  # the first of --paths
        equal_t = runs[first] if nt == args.iters else \
            run_project(pool, budget, nt, args.seed, snap=snap, **{**kw, **PATHS[first]})
    if not args.no_emd and snap:
        for run in runs.values():
            run["emd"] = selection_emd(feats, run["rows"])
        if equal_t is not None and "emd" not in equal_t:
            equal_t["emd"] = selection_emd(feats, equal_t["rows"])
        extra["emd_random"] = selection_emd(feats, runs[next(iter(runs))]["init_rows"])

    table = Table(title=f"ActiveFT, B={budget} T={args.iters} M={args.subset or 'all'} on {pool.device}")
    for col in ("run", "iters run", "wall s", "s / iter", f"total s at T={args.iters}", "peak MiB above pool",
                "final loss", "EMD"):
        table.add_column(col, justify="right")
    for name, run in runs.items():
        tot, extrap = total_at(run, args.iters)
        label = name
        if name in PATHS:
            how = "pruned" if run["pruned"] else "full " + run["screen"] + (" kernel" if run["top2_kernel"] else "")
            label = f"{name} ({how}, {run['loop']})"
        table.add_row(label, str(run["iters"]), f"{run['wall']:.2f}", f"{run['per_iter']:.4f}",
                      f"{tot:.2f}{' *' if extrap else ''}", f"{run['peak_above_mib']:.0f}",
                      f"{run['final_loss']:.6f}", f"{run['emd']:.5f}" if "emd" in run else "-")
    con.print(table)
    first = next(iter(runs))
    proj_total, _ = total_at(runs[first], args.iters)
    lines = [f"one N x B pass: {brute:.4f} s fp32"
             + (f", {extra['brute_pass_bf16_s']:.4f} s bf16" if "brute_pass_bf16_s" in extra else "")
             + f"; T passes {brute * args.iters:.2f} s; {first} / (T passes) = {proj_total / (brute * args.iters):.2f}"]
    for name, run in runs.items():
        if name != first:
            tot, extrap = total_at(run, args.iters)
            lines.append(f"{name} / {first} = {tot / proj_total:.2f} (time at T={args.iters}"
                         f"{', extrapolated' if extrap else ''})")
    if equal_t is not None:
        nv = runs["naive"]
        msg = f"at T={nv['iters']}: final loss {equal_t['final_loss']:.6f} vs naive {nv['final_loss']:.6f}"
        if "emd" in nv:
            msg += (f"; EMD {equal_t['emd']:.5f} vs naive {nv['emd']:.5f} "
                    f"({(equal_t['emd'] - nv['emd']) / nv['emd']:+.3%})")
            extra["emd_rel_diff"] = (equal_t["emd"] - nv["emd"]) / nv["emd"]
        if snap:
            extra["ids_in_common"] = _ids_in_common(equal_t["rows"], nv["rows"])
            msg += f"; ids in common {extra['ids_in_common']:.1%}"
        lines.append(msg)
    if "emd_random" in extra:
        lines.append(f"EMD of the random initial rows: {extra['emd_random']:.5f}")
    lines += [f"{name}: {run['loop_fallback']}" for name, run in runs.items() if run.get("loop_fallback")]
    lines += [f"{name}: top-2 kernel off: {run['top2_kernel_fallback']}" for name, run in runs.items()
              if run.get("top2_kernel_fallback")]
    for line in lines:
        con.print(line)
    out = {"budget": budget, **extra, "runs": {}}
    for name, run in runs.items():
        tot, extrap = total_at(run, args.iters)
        out["runs"][name] = {k: v for k, v in run.items() if k not in ("rows", "losses", "init_rows")}
        out["runs"][name].update(total_at_T=tot, extrapolated=extrap, first_losses=run["losses"][:5])
    if equal_t is not None:
        k = len(runs["naive"]["losses"])
        out["curve_max_rel"] = max((abs(a - b) / max(abs(b), 1e-12)
                                    for a, b in zip(equal_t["losses"][:k], runs["naive"]["losses"])), default=0.0)
    return out


def table3(feats: np.ndarray, args, con) -> dict:
    """``python -m bench_suite.cli.select`` end to end, ActiveFT vs K-Means, at 2 / 5 / 10% of the pool."""
    from rich.table import Table

    from bench_suite.store import FeatureStore

    out = {"ratios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = FeatureStore.from_array(feats).save(Path(tmp) / "pool")
        table = Table(title=f"select CLI end to end, N={len(feats):,} (wall s, process start included)")
        for col in ("ratio", "budget", "activeft s", "kmeans s", "kmeans / activeft"):
            table.add_column(col, justify="right")
        for ratio in [float(r) for r in args.ratios.split(",")]:
            row = {}
            for method in ("activeft", "kmeans"):
                cmd = [sys.executable, "-m", "bench_suite.cli.select", "--features", str(store_dir), "--ratio",
                       str(ratio), "--method", method, "--seed", str(args.seed), "--out", f"{tmp}/{method}.json"]
                if method == "activeft":
                    cmd += ["--set", f"device={args.device}", "progress=false"]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                row[method] = time.perf_counter() - t0
                row[f"{method}_budget"] = len(json.loads(Path(f"{tmp}/{method}.json").read_text())["ids"])
            table.add_row(f"{ratio:.0%}", str(row["activeft_budget"]), f"{row['activeft']:.1f}",
                          f"{row['kmeans']:.1f}", f"{row['kmeans'] / row['activeft']:.2f}")
            out["ratios"][str(ratio)] = row
    con.print(table)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench_suite.bench.selector", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one) | cpu | cuda | cuda:N")
    p.add_argument("--pool", default="clustered", choices=("clustered", "blobs", "random", "store"))
    p.add_argument("--store", help="a feature store folder (with --pool store)")
    p.add_argument("--n", type=int, default=50_000, help="pool size N (CIFAR-100: 50,000; ImageNet: 1,281,167)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--budgets", default="1000", help="comma-separated B values, e.g. 1000,2500,5000")
    p.add_argument("--iters", type=int, default=300, help="T")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", default="official", choices=("official", "paper"))
    p.add_argument("--subset", type=int, default=0, help="M random samples per iteration (0 = all)")
    p.add_argument("--paths", default="auto", help=f"the project's paths to run: {','.join(PATHS)}")
    p.add_argument("--screen", default="auto", choices=("auto", "fp32", "tf32", "bf16"),
                   help="the full pass's screening precision (the selector's option screen)")
    p.add_argument("--naive-iters", type=int, default=20,
                   help="iterations of the naive loop (extrapolated to T when fewer)")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--no-emd", action="store_true", help="skip the Eq. 16 EMD (an N x B pass per run)")
    p.add_argument("--no-snap", action="store_true", help="time the optimisation loop only (no selection)")
    p.add_argument("--table3", action="store_true", help="time the select CLI for ActiveFT and K-Means instead")
    p.add_argument("--ratios", default="0.02,0.05,0.1", help="with --table3: the budgets as pool fractions")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from rich.console import Console

    con = Console(width=160)
    for name in args.paths.split(","):
        if name not in PATHS:
            raise SystemExit(f"error: --paths: unknown path {name!r} ({', '.join(PATHS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    feats, what = make_pool(args)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    con.print(f"pool: {what} ({feats.nbytes / 2 ** 20:.0f} MiB, ready in {time.perf_counter() - t0:.1f}s); "
              f"T={args.iters} objective={args.objective} M={args.subset or 'all'}; device {device} ({gpu}); "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load0[0]:.2f}")
    out = {"args": vars(args), "device": str(device), "device_name": gpu, "torch": torch.__version__,
           "load_average_start": load0, "budgets": {}}
    if args.table3:
        out["table3"] = table3(feats, args, con)
    else:
        pool = torch.from_numpy(feats).to(device)
        for budget in [int(b) for b in args.budgets.split(",")]:
            out["budgets"][str(budget)] = bench_budget(feats, pool, budget, args, con)
    out["load_average_end"] = os.getloadavg()
    if args.json:
        atomic.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
