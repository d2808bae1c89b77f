"""Regenerate one table of the paper into results/ (markdown + json, with provenance).

    accelerate launch bench_suite/run.py --table 1                 # embedded cpu profile, offline
    accelerate launch bench_suite/run.py --table 1 --profile paper --source cifar10=~/cifar-10-python.tar.gz ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 bench_suite/run.py --table 1

Feature extraction is split across processes; every process walks the table's cells and claims them as it goes.
Every stage is cached under --work, so an interrupted run resumes.
"""

import argparse
import dataclasses
import json
import logging
import os
import time
import uuid
from pathlib import Path


from bench_suite import report
from bench_suite import runtime as bdist
from bench_suite.cli import main_guard, parse_sources, setup_logging
from bench_suite.errors import BadInputError
from bench_suite.profiles import load_profile
from bench_suite.progress import Tracker
from bench_suite.tables.cells import revisions
from bench_suite.tables.common import Context, FreshSet
from bench_suite.tables.preflight import check, check_names, dry_run, plan
from bench_suite.tables.registry import get_table, table_names
from launchers import slurm as slurm_launcher

log = logging.getLogger("bench_suite.run")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_suite/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default="1", help="paper table number: " + ", ".join(
        f"{n} {get_table(n).title}" for n in table_names()) + "; or all (every table the profile has, sharing "
        "their common cells, and results/README.md, an index with each table's headline)")
    p.add_argument("--profile", default="cpu", help="built-in profile name (cpu, paper) or a YAML file")
    p.add_argument("--out", default="results", help="report folder")
    p.add_argument("--work", default=os.environ.get("BENCH_SUITE_WORK", "work_dirs"),
                   help="cache folder for shards, features and finished cells (resumable)")
    p.add_argument("--source", action="append", default=[], metavar="DATASET=PATH",
                   help="local copy of a paper dataset (cifar10, cifar100, imagenet)")
    p.add_argument("--seeds", help="override the profile's seeds, e.g. 0,1,2")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--check", action="store_true",
                   help="validate the profile, the data sources and the caches, count cached cells; run nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid: which cells are cached and which will be computed, with a time estimate "
                        "from the per-cell times earlier runs recorded in --work; run nothing")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run: print the plan as JSON, one object per cell (dataset, ratio, pool size, "
                        "budget, seed, the method's fully resolved options and device, the recipe, cached or not); "
                        "datasets without --source are planned from their official split sizes")
    p.add_argument("--fresh", action="store_true",
                   help="recompute every cell of the table, ignoring the cached ones (shards and features stay cached)")
    p.add_argument("-v", "--verbose", action="store_true")
    slurm_launcher.add_arguments(p)  # --launcher slurm and its flags (launchers/slurm, SLURM.md)
    return p.parse_args(argv)


def make_progress(quiet: bool, rank: int, world: int = 1):
    """The grid's progress (``factory(total) -> advance(cell, result)``), a bar in a terminal and plain lines
    in a log file (``bench_suite.progress``); and ``stop()``. With several ranks, rank 0 shows the whole grid:
    every rank walks it (``cells.run_cells``), and a cell another rank computed counts when rank 0 reads it."""
    trackers = []

    def factory(total):
        if quiet or rank != 0:
            return None
        tracker = Tracker("cells" if world == 1 else f"cells ({world} ranks)", total)
        trackers.append(tracker)

        def advance(cell, result):
            desc = f"{cell['dataset']} {cell['ratio']:g} {cell.get('variant') or cell['method']} s{cell['seed']}"
            metric = next((m for m in ("top1", "miou") if result and m in result), None)
            if metric:  # classification or segmentation (Table 2)
                desc += f" {metric} {result[metric]:.1f}"
            tracker.advance(1, desc)
        return advance

    def stop():
        for tracker in trackers:
            tracker.close()
    return factory, stop


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    profile = load_profile(args.profile)
    if args.table == "all":
        tables = [get_table(n) for n in table_names() if n in profile.tables]
        skipped = [n for n in table_names() if n not in profile.tables]
        if skipped:
            log.info("profile %s has no settings for table(s) %s: not run", profile.name, ", ".join(skipped))
    else:
        tables = [get_table(args.table)]
    if args.seeds:
        try:
            profile = dataclasses.replace(profile, seeds=[int(s) for s in args.seeds.split(",")])
        except ValueError as exc:
            raise BadInputError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from exc
    sources = parse_sources(args.source)
    for table in tables:  # every name of every table first: a typo fails before any work
        check_names(profile, table.name)
    if args.dry_run and args.json:
        print(json.dumps([c for t in tables for c in plan(profile, t.name, Path(args.work), sources)], indent=1))
        return 0
    if args.check or args.dry_run:
        for table in tables:
            for line in (dry_run if args.dry_run else check)(profile, table.name, Path(args.work), sources):
                print(line)
        return 0

    if args.launcher == "slurm" and not args.slurm_collect:  # submit; None: every cell cached, report here
        code = slurm_launcher.launch(args, profile, tables, sources)
        if code is not None:
            raise SystemExit(code)  # 1: a cell or a job failed (each named on stderr)
    acc = bdist.make_accelerator()
    revision = report.git_revision()
    # with --fresh, a cell that two tables share is recomputed once, by one rank
    tag = (bdist.Runtime.of_accelerator(acc).all_gather_object(uuid.uuid4().hex)[0]
           if args.fresh and acc.num_processes > 1 else None)
    fresh_done = FreshSet(Path(args.work), tag)
    index = []
    for table in tables:
        ctx = Context(profile, Path(args.work), Path(args.out), acc, sources, quiet=args.quiet, fresh=args.fresh,
                      revision=revision, fresh_done=fresh_done)
        if args.slurm_collect:  # the SLURM report stage: cached cells only, missing ones reported as failed
            slurm_launcher.collect_into(ctx, table.name, sources)
        index.append(run_table(table, ctx, args, profile))
    if args.table == "all" and acc.is_main_process:
        log.info("wrote %s", report.write_index(args.out, index))
    if tag:
        acc.wait_for_everyone()
        if acc.is_main_process:
            fresh_done.remove_markers()
    return bdist.exit_process(0)  # ends a distributed run without the gloo-at-exit abort


def run_table(table, ctx: Context, args, profile) -> dict:
    """Run one table and (rank 0) write its report; returns its line of the results index."""
    factory, stop = make_progress(args.quiet, ctx.rank, ctx.world)
    t0 = time.perf_counter()
    try:
        out = table.run(ctx, factory)
    finally:
        stop()
    elapsed = time.perf_counter() - t0
    entry = {"name": table.name, "title": table.title, "report": f"table{table.name}.md", "seconds": elapsed,
             "revision": ctx.revision[:12], "profile": profile.name}
    if ctx.rank == 0:
        t_report = time.perf_counter()
        prov = report.provenance(profile, profile.seeds, ctx.world,
                                 {"wall_time": f"{elapsed:.0f} s for this run: of {ctx.cells_total} cells, "
                                  f"{ctx.cells_computed} computed, {ctx.cells_cached} from the cache (--work), "
                                  f"{ctx.cells_skipped} skipped ('-')",
                                  "time_by_stage": report.time_by_stage(elapsed, ctx.timing, cells_of(out)),
                                  "cell_revisions": ", ".join(revisions(cells_of(out))) + " (each cell records "
                                  "the revision it was computed at; --fresh recomputes them all)"})
        md = slurm_launcher.markdown_with_failures(table, profile, prov, out)  # table.markdown, + failed cells
        spent = report.duration(ctx.timing.get("report", 0.0) + time.perf_counter() - t_report)  # plot + markdown
        prov["time_by_stage"] = prov["time_by_stage"].replace(report.REPORT_SECONDS, spent)
        md = md.replace(report.REPORT_SECONDS, spent)
        md_path, js_path = report.write_report(args.out, f"table{table.name}", md,
                                               {"provenance": prov, "profile": profile.to_dict(), **out})
        log.info("wrote %s and %s in %.0f s", md_path, js_path, elapsed)
        groups = [(p.get("label", ""), p["cells"]) for p in out.get("parts", [])] or [("", out.get("cells", []))]
        entry["headline"] = report.headline(groups, *table.headline_metric)
    return entry


def cells_of(out: dict) -> list[dict]:
    """Every cell of a table's output (Table 4 has one grid per encoder)."""
    return list(out.get("cells", [])) + [c for part in out.get("parts", []) for c in part["cells"]]


if __name__ == "__main__":
    main()
