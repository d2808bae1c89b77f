"""``bench_suite/run.py --launcher slurm``: a table as three stages of SLURM jobs (plain sbatch scripts).

    stage 1  features   one multi-node job, one task per GPU (srun), SLURM variables -> torch.distributed:
                        the shards and every feature store the table needs (skipped when all are extracted)
    stage 2  cells      a job array, one array task per cell that is not cached yet (selection + evaluation),
                        ``afterok`` on stage 1; at most ``--array-parallel`` at once
    stage 3  report     ``afterany`` on stage 2: ``run.py --slurm-collect`` writes the report from the cached
                        cells, computing nothing; a cell that is missing shows as failed with its array
                        task's state (sacct, else scontrol) and log, and is left out of the means

Everything a submission writes goes under ``WORK/slurm/tableN/<date-time>/``: the three scripts, ``plan.json``
(the cells of the array, by task index), ``submit.sh`` (the sbatch commands that were run, with the job ids)
and ``logs/``; ``WORK/slurm/tableN/submissions.json`` lists the submissions. Running the same command again
waits for a submission still in the queue, else resubmits the cells that are still missing (failed,
cancelled, timed out), else (everything cached) writes the report at once. Array tasks and stage 1 are
``--requeue``-able and get ``--signal=B:USR1@<lead>``: the batch script forwards the warning to Python, where
a finetune writes a checkpoint at the next optimiser step (``bench_suite.finetune.checkpoint``), and requeues
itself; the requeued task resumes from that checkpoint. Why plain sbatch scripts and not submitit: SLURM.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from bench_suite import atomic
from bench_suite.errors import BadInputError, MissingDataError
from launchers.slurm import jobs
from launchers.slurm.plan import cell_id, plan_table, stores_of
from launchers.slurm.scripts import write_scripts

log = logging.getLogger("bench_suite.slurm")
ROOT = Path(__file__).resolve().parents[2]
POLL_S = float(os.environ.get("BENCH_SUITE_SLURM_POLL_S", "10"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """run.py's ``--launcher`` and the SLURM flags."""
    g = p.add_argument_group("SLURM (--launcher slurm; see SLURM.md)")
    g.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: run here (under accelerate launch for several processes); slurm: submit stage 1 "
                        "(features), a job array of the missing cells, and the report, then wait for them")
    g.add_argument("--partition", help="sbatch --partition")
    g.add_argument("--account", help="sbatch --account")
    g.add_argument("--qos", help="sbatch --qos")
    g.add_argument("--time", default="24:00:00", help="sbatch --time of each job (a cell: its selection and "
                   "finetune; jobs requeue with a checkpoint when it runs out); default 24:00:00")
    g.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node; stage 1 runs one task per GPU, each array task takes one (0: CPU only)")
    g.add_argument("--nodes", type=int, default=1, help="nodes of stage 1 (feature extraction)")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per task (default 8 with GPUs, else 1); OMP_NUM_THREADS follows it")
    g.add_argument("--mem", help="sbatch --mem of each job (default: the cluster's DefMemPerCPU)")
    g.add_argument("--array-parallel", type=int, default=0,
                   help="at most this many cells run at once (sbatch --array=...%%J; 0: no limit)")
    g.add_argument("--signal-lead", type=int, default=120,
                   help="seconds before the time limit that SLURM sends SIGUSR1 (checkpoint, then requeue)")
    g.add_argument("--no-wait", action="store_true",
                   help="print the job ids and return; the same command later waits, collects, resubmits")
    g.add_argument("--slurm-collect", action="store_true", help=argparse.SUPPRESS)  # stage 3 (the report)


def check_arguments(args) -> None:
    for name in ("nodes", "array_parallel", "gpus_per_node", "signal_lead"):
        value = getattr(args, name)
        if value < (1 if name == "nodes" else 0):
            raise BadInputError(f"--{name.replace('_', '-')} must be >= {1 if name == 'nodes' else 0}, got {value}")
    if getattr(args, "fresh", False):
        raise BadInputError("--fresh does not go with --launcher slurm: the array holds the cells that are not "
                            "cached; to recompute a table, give it another --work (or delete WORK/cells)")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise BadInputError(f"--cpus-per-task must be >= 1, got {args.cpus_per_task}")


# --------------------------------------------------------------------------- submissions on disk
def table_dir(work: Path, table: str) -> Path:
    return Path(work) / "slurm" / f"table{table}"


def submissions(work: Path, table: str) -> list[dict]:
    path = table_dir(work, table) / "submissions.json"
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise BadInputError(f"{path} is damaged ({exc}); delete it (the cell cache is not affected)") from exc


def _record(work: Path, table: str, entry: dict) -> None:
    subs = submissions(work, table) + [entry]
    atomic.write_json(table_dir(work, table) / "submissions.json", subs)


def _job_ids(sub: dict) -> list[str]:
    return [j for j in sub["jobs"].values() if j]


# --------------------------------------------------------------------------- the launcher (run.py)
def launch(args, profile, tables, sources: dict) -> int | None:
    """Submit (or find in the queue) every table first, then wait for them (unless ``--no-wait``) and collect.
    Returns the exit status, or None when every cell of every table is cached: run.py then writes the
    reports here, as a local run would."""
    check_arguments(args)
    jobs.need("sbatch")
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    found = {t.name: _submit_or_find(args, profile, t.name, work, out, sources) for t in tables}
    if all(sub is None for sub in found.values()):
        return None
    if args.no_wait:
        say(f"`{_same_command()}` again waits for the jobs, then collects and resubmits what failed")
        return 0
    code = max(_wait_and_report(sub, out, name) for name, sub in found.items() if sub is not None)
    if code == 0 and len(found) > 1:  # --table all: every cell cached now; run.py writes every report + index
        say("every table is complete: writing the reports and the results index here")
        return None
    return code


def _submit_or_find(args, profile, table: str, work: Path, out: Path, sources: dict) -> dict | None:
    """The table's submission that is still in the queue, else a new one of its missing cells; None when
    every cell is cached."""
    subs = submissions(work, table)
    if subs:
        active = jobs.queued(_job_ids(subs[-1]))
        if active:
            say(f"table {table}: submission {subs[-1]['dir']} is still in the queue "
                f"({_summary(active)}); not submitting again")
            return subs[-1]
    plan = plan_table(profile, table, work, sources)
    if not plan.to_compute and not plan.missing_features:
        say(f"table {table}: all {len(plan.cells)} cells are cached; writing the report here")
        return None
    return _submit(args, profile, plan, work, out, sources)


def _submit(args, profile, plan, work: Path, out: Path, sources: dict) -> dict:
    table = plan.table
    folder = table_dir(work, table) / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while folder.exists():
        n += 1
        folder = folder.with_name(f"{folder.name.split('.')[0]}.{n}")
    (folder / "logs").mkdir(parents=True)
    todo = plan.to_compute
    profile_arg = args.profile if not Path(args.profile).suffix else str(Path(args.profile).resolve())
    spec = {"table": table, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "repo": str(ROOT),
            "python": sys.executable, "profile": profile_arg, "seeds": args.seeds, "work": str(work),
            "out": str(out), "sources": {k: str(Path(v).resolve()) for k, v in sources.items()},
            "missing_features": plan.missing_features,
            "cells": [{"id": c["id"], "cell": c["cell"], "encoder": c["encoder"]} for c in todo]}
    atomic.write_json(folder / "plan.json", spec)
    scripts = write_scripts(folder, spec, args)
    ids = {"features": None, "cells": None, "report": None}
    lines = ["#!/usr/bin/env bash", "# the sbatch commands this submission ran (job ids as they were)", "set -e"]

    def submit(stage: str, *options: str) -> str:
        job = jobs.sbatch(scripts[stage], *options)
        lines.append(f"sbatch {' '.join(shlex.quote(o) for o in options)} {shlex.quote(str(scripts[stage]))}"
                     f"   # -> job {job}")
        return job

    try:
        if plan.missing_features:
            ids["features"] = submit("features")
        if todo:
            dep = [f"--dependency=afterok:{ids['features']}", "--kill-on-invalid-dep=yes"] if ids["features"] else []
            ids["cells"] = submit("cells", *dep)
        ids["report"] = submit("report", f"--dependency=afterany:{ids['cells'] or ids['features']}")
    except BadInputError:
        jobs.cancel([j for j in ids.values() if j])
        raise
    atomic.write_text(folder / "submit.sh", "\n".join(lines) + "\n")
    entry = {"dir": str(folder), "created": spec["created"], "jobs": ids, "cells": [c["id"] for c in todo]}
    _record(work, table, entry)
    stage1 = f"stage 1 features job {ids['features']} ({', '.join(plan.missing_features)}), " if ids["features"] \
        else "stage 1 not needed (features cached), "
    stage2 = f"stage 2 array job {ids['cells']} ({len(todo)} cells of {len(plan.cells)}; " \
             f"{len(plan.cells) - len(todo)} cached), " if ids["cells"] else ""
    say(f"table {table}: {stage1}{stage2}stage 3 report job {ids['report']}; scripts and logs in {folder}")
    print(f"jobs: features={ids['features'] or '-'} cells={ids['cells'] or '-'} report={ids['report']}", flush=True)
    return entry


def _wait_and_report(sub: dict, out: Path, table: str) -> int:
    """Wait until the submission's jobs have left the queue, then say how it went: 0 when the report is
    written and no cell failed, 1 otherwise (each failure on its own line with its state and log)."""
    ids = _job_ids(sub)
    last = None
    while True:
        active = jobs.queued(ids)
        if not active:
            break
        now = _summary(active)
        if now != last:
            say(f"table {table}: waiting for jobs {', '.join(ids)}: {now}")
            last = now
        time.sleep(POLL_S)
    report_job = sub["jobs"]["report"]
    state = jobs.states([report_job])[report_job]
    js = Path(out) / f"table{table}.json"
    if state["state"] != "COMPLETED" or not js.exists() or js.stat().st_mtime < _created_ts(sub):
        log_path = Path(sub["dir"]) / "logs" / f"report-{report_job}.out"
        say(f"table {table}: the report job {report_job} ended {state['state']}: see {log_path}")
        return 1
    data = json.loads(js.read_text())
    failed = [c for c in _cells(data) if c.get("failed")]
    for c in failed:
        f = c["failed"]
        say(f"table {table}: FAILED {describe(c)}: {f['state']} (job {f['job']}), log {f['log']}")
    say(f"table {table}: wrote {Path(out) / f'table{table}.md'}" + (
        f"; {len(failed)} cell(s) failed and are left out of the means: the same command resubmits them"
        if failed else ""))
    return 1 if failed else 0


def _created_ts(sub: dict) -> float:
    try:
        return time.mktime(time.strptime(sub["created"][:19], "%Y-%m-%dT%H:%M:%S")) - 1
    except (ValueError, KeyError):
        return 0.0


def _summary(active: dict) -> str:
    counts: dict = {}
    for state in active.values():
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))


def _same_command() -> str:
    argv = [a for a in sys.argv[1:] if a != "--no-wait"]
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name if sys.argv else "run.py", *argv])


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(cell: dict) -> str:
    return f"{cell['dataset']} {cell['ratio']:g} {cell.get('variant') or cell['method']} seed {cell['seed']}"


def _cells(out: dict) -> list[dict]:
    return list(out.get("cells", [])) + [c for part in out.get("parts", []) for c in part["cells"]]


# --------------------------------------------------------------------------- stage 3: the report
def collect_into(ctx, table: str, sources: dict) -> None:
    """Make ``ctx`` a collect-only context (stage 3): every feature store must exist (else one line naming
    stage 1's log), and a cell that is not cached becomes a failed record instead of being computed."""
    work = Path(ctx.work)
    subs = submissions(work, table)
    _, missing = stores_of(ctx.profile, table, work, sources)
    if missing:
        where = ""
        feats = [s for s in subs if s["jobs"].get("features")]
        if feats:
            job = feats[-1]["jobs"]["features"]
            st = jobs.states([job])[job]
            where = f"; stage 1 (job {job}) ended {st['state']}: see {Path(feats[-1]['dir']) / 'logs'}"
        raise MissingDataError(f"table {table}: features not extracted ({', '.join(missing)}){where}")
    ctx.missing_cell = FailureLookup(subs)


class FailureLookup:
    """``fn(cell, encoder) -> fields`` for a cell that is missing after its array task ended: the task's
    state, its job id and log, from the latest submission that had the cell."""

    def __init__(self, subs: list[dict]):
        self.subs = subs
        self._states: dict = {}

    def __call__(self, cell: dict, encoder) -> dict:
        cid = cell_id(cell, encoder)
        for sub in reversed(self.subs):
            if cid in sub.get("cells", []) and sub["jobs"].get("cells"):
                task = f"{sub['jobs']['cells']}_{sub['cells'].index(cid)}"
                if task not in self._states:
                    tasks = [f"{sub['jobs']['cells']}_{i}" for i in range(len(sub["cells"]))]
                    self._states.update(jobs.states(tasks))
                st = self._states[task]
                state = st["state"]
                if state == "COMPLETED":
                    state = "COMPLETED without a result"  # e.g. its result was deleted since
                return {"failed": {"state": state, "job": task, "exit_code": st.get("exit_code", ""),
                                   "nodes": st.get("nodes", ""), "state_from": st.get("source", ""),
                                   "log": str(Path(sub["dir"]) / "logs" / f"cell-{task}.out")}}
        return {"failed": {"state": "NOT SUBMITTED", "job": "-", "log": "-",
                           "state_from": "no submission of this table had this cell"}}


def markdown_with_failures(table, profile, prov: dict, out: dict) -> str:
    """The table's markdown; with failed cells (a SLURM run: the grid leaves them out of its means and marks
    them), a provenance line and a section listing each with its SLURM state and log."""
    failed = [c for c in _cells(out) if c.get("failed")]
    if not failed:
        return table.markdown(profile, prov, out)
    total = len(_cells(out))
    prov = {**prov, "failed_cells": f"{len(failed)} of {total} cells FAILED and are left out of every mean "
            "(see 'Failed cells' at the end); rerunning the same --launcher slurm command resubmits them"}
    lines = [table.markdown(profile, prov, out), "",
             "## Failed cells (left out of the means above)\n",
             "In the tables above, \"(k failed)\" marks a mean over fewer seeds than the setting says, and "
             "\"failed\" a column where every seed failed. Rerun the same `--launcher slurm` command: it resubmits "
             "exactly these cells.\n",
             "| cell | SLURM state | job (array task) | exit code | log |", "|---|---|---|---|---|"]
    for c in failed:
        f = c["failed"]
        lines.append(f"| {describe(c)} | {f['state']} | {f['job']} | {f.get('exit_code', '')} | `{f['log']}` |")
    return "\n".join(lines) + "\n"
