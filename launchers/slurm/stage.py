"""The work of stages 1 and 2 of a SLURM submission (stage 3 is ``run.py --slurm-collect``).

    python -m launchers.slurm.stage features --plan PLAN.json      # under srun, one task per GPU
    python -m launchers.slurm.stage cell --plan PLAN.json --task I  # one array task: cell I of the plan

``features``: each task joins the process group from the SLURM variables (``SLURM_PROCID`` /
``SLURM_NTASKS`` / ``SLURM_LOCALID`` -> RANK / WORLD_SIZE / LOCAL_RANK; MASTER_ADDR and MASTER_PORT from the
batch script), rank 0 writes the shards, every rank extracts its part of each feature store the table needs.
``cell``: one process; the cell goes through the same cached, locked path as a local run (its feature stores opened as stage 1 left them)
(``tables.cells.run_cells``), so its result lands in the same cache file and a finetune resumes from its
checkpoint after a requeue.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path

from bench_suite import locks, report
from bench_suite import runtime as bdist
from bench_suite.cli import main_guard, setup_logging
from bench_suite.digest import json_digest
from bench_suite.errors import BadInputError
from bench_suite.profiles import EncoderRef, load_profile
from bench_suite.store import FeatureStore
from bench_suite.tables.cells import CELL_VERSION, cell_key, run_cells
from bench_suite.tables.common import Context, prepare_split
from launchers.slurm.plan import encoders_of, feature_dir

log = logging.getLogger("bench_suite.slurm.stage")


def _load(plan_path: Path) -> tuple[dict, object, dict]:
    spec = json.loads(Path(plan_path).read_text())
    profile = load_profile(spec["profile"])
    if spec.get("seeds"):
        profile = dataclasses.replace(profile, seeds=[int(s) for s in str(spec["seeds"]).split(",")])
    return spec, profile, {k: Path(v) for k, v in spec["sources"].items()}


def features(plan_path: Path) -> int:
    spec, profile, sources = _load(plan_path)
    bdist._map_slurm_env()  # noqa: SLF001 - the one place that turns SLURM variables into a torch rendezvous
    acc = bdist.make_accelerator()
    ctx = Context(profile, Path(spec["work"]), Path(spec["out"]), acc, sources, quiet=False,
                  revision=report.git_revision())
    t0 = time.perf_counter()
    for enc in encoders_of(profile, spec["table"]):
        for d in profile.table(spec["table"]).cells:
            for part in ("pool", "test"):
                store = prepare_split(ctx, d, part, encoder=enc)
                if ctx.rank == 0:
                    log.info("features %s %s %s: %d x %d", d, part, enc.name, len(store), store.features.shape[1])
    if ctx.rank == 0:
        log.info("stage 1 done in %.0f s on %d process(es)", time.perf_counter() - t0, ctx.world)
    return bdist.exit_process(0)


def cell(plan_path: Path, task: int) -> int:
    spec, profile, sources = _load(plan_path)
    if not 0 <= task < len(spec["cells"]):
        raise BadInputError(f"--task {task}: {plan_path} has cells 0..{len(spec['cells']) - 1}")
    entry = spec["cells"][task]
    c, enc = entry["cell"], EncoderRef(**entry["encoder"])
    acc = bdist.make_accelerator()
    ctx = Context(profile, Path(spec["work"]), Path(spec["out"]), acc, sources, quiet=False,
                  revision=report.git_revision())
    log.info("cell %d of %d: %s %g %s seed %d (%s, recipe %s)", task, len(spec["cells"]), c["dataset"], c["ratio"],
             c.get("variant") or c["method"], c["seed"], enc.name, c["recipe"])
    t0 = time.perf_counter()
    stores = {c["dataset"]: _stores(ctx, c["dataset"], enc)}
    _take_over_own_lock(ctx, c, stores[c["dataset"]])
    result = run_cells(ctx, [c], stores, encoder=enc)[0]
    metric = next((m for m in ("top1", "miou") if m in result), None)
    log.info("cell done in %.0f s: %s", time.perf_counter() - t0,
             result.get("skipped") or (f"{metric} {result[metric]:.2f}" if metric else "no metric"))
    return bdist.exit_process(0)  # a multi-process cell ends without the gloo-at-exit abort


def _stores(ctx, dataset: str, enc: EncoderRef):
    """The cell's pool and test feature stores. Stage 1 of this submission extracted them (or they were there
    when it was submitted): open them as they are, without ``prepare_split``'s check, which builds the
    encoder to recompute the fingerprint while holding the store's lock, so hundreds of array tasks starting
    together would queue on it for seconds each. A store not there yet goes through ``prepare_split``."""
    dirs = [feature_dir(ctx.profile, ctx.work, ctx.sources, dataset, part, enc) for part in ("pool", "test")]
    if all((d / "features.npy").exists() and (d / "meta.json").exists() for d in dirs):
        return tuple(FeatureStore.open(d) for d in dirs)
    return prepare_split(ctx, dataset, "pool", encoder=enc), prepare_split(ctx, dataset, "test", encoder=enc)


def _take_over_own_lock(ctx, c: dict, stores) -> None:
    """A requeued task whose earlier run died without releasing the cell's lock (node failure, SIGKILL), on
    another node: that lock is its own, but ``bench_suite.locks`` can only tell a dead owner on the same host
    (elsewhere it waits ``STALE_S``, 6 h). A restarted array task (``SLURM_RESTART_COUNT`` > 0) takes over a
    lock held from another host; the result is still written once (atomically) and checked under the lock."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return
    key = cell_key(ctx, c, *stores)
    lock = ctx.work / "cells" / f"v{CELL_VERSION}" / f"{json_digest(key)}.lock"
    who = locks.owner(lock)
    if who and who.get("host") != socket.gethostname():
        log.warning("restart %s of this task: taking over the cell lock its earlier run held on %s (%s)",
                    os.environ["SLURM_RESTART_COUNT"], who.get("host"), lock)
        locks.release(lock)


@main_guard
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launchers.slurm.stage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("features", "cell"))
    p.add_argument("--plan", required=True, type=Path, help="the submission's plan.json")
    p.add_argument("--task", type=int, help="cell: the array task index")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if args.stage == "features":
        return features(args.plan)
    if args.task is None:
        raise BadInputError("cell needs --task (the array task index, $SLURM_ARRAY_TASK_ID)")
    return cell(args.plan, args.task)


if __name__ == "__main__":
    raise SystemExit(main())
