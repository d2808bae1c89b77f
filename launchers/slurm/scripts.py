"""The three batch scripts of a submission, written where users can read them and resubmit them by hand.

Each script holds its own ``#SBATCH`` resources (the array range included); only the dependencies between
the stages are given on sbatch's command line (see the submission's ``submit.sh``), so
``sbatch WORK/slurm/tableN/<date-time>/cells.sbatch`` reruns the array on its own, and
``sbatch --array=3,7 .../cells.sbatch`` reruns two of its cells.

The Python of a job runs in the background of the batch shell, which traps SIGUSR1 (``--signal=B:USR1@S``:
S seconds before the time limit), forwards it to Python (a finetune then writes a checkpoint at the next
optimiser step and exits), waits for it, and requeues the job (``scontrol requeue``); the requeued job
resumes from the checkpoint and from every cached stage output.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

_TRAP = """\
# SIGUSR1 (--signal=B:USR1@{lead}): forward it to Python, which checkpoints and exits, then requeue this job
child=
requeue() {{
  echo "$(date -Is) SIGUSR1: the time limit is near; checkpointing, then requeueing job ${{SLURM_JOB_ID}}"
  [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null
  [ -n "$child" ] && wait "$child"
  scontrol requeue "${{SLURM_JOB_ID}}"
  exit 0
}}
trap requeue USR1
"""

_RUN = """\
{command} &
child=$!
wait "$child"
rc=$?
echo "$(date -Is) exit status $rc"
exit $rc
"""


def _q(value) -> str:
    return shlex.quote(str(value))


def _header(spec: dict, args, stage: str, what: str, log: str, resources: list[str], requeue: bool) -> str:
    lines = ["#!/bin/bash",
             f"# bench_suite, table {spec['table']}, stage {stage}: {what}",
             f"# Written by `run.py --launcher slurm` on {time.strftime('%Y-%m-%d %H:%M:%S')}; resubmit by hand with",
             f"#   sbatch {_q(Path(log).parents[1] / (stage + '.sbatch'))}",
             f"#SBATCH --job-name=bench-t{spec['table']}-{stage}",
             f"#SBATCH --output={log}",
             "#SBATCH --open-mode=append",
             f"#SBATCH --time={args.time}"]
    for flag in ("partition", "account", "qos", "mem"):
        value = getattr(args, flag, None)
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {r}" for r in resources]
    if requeue:
        lines += ["#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{args.signal_lead}"]
    lines += ["",
              f"cd {_q(spec['repo'])}",
              f"export PYTHONPATH={_q(spec['repo'])}${{PYTHONPATH:+:$PYTHONPATH}}",
              "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
              "export BENCH_SUITE_PROGRESS_S=${BENCH_SUITE_PROGRESS_S:-60}",
              'echo "$(date -Is) job ${SLURM_JOB_ID} ${SLURM_ARRAY_JOB_ID:+(array task ${SLURM_ARRAY_JOB_ID}_'
              '${SLURM_ARRAY_TASK_ID}) }on ${SLURM_JOB_NODELIST}, start ${SLURM_RESTART_COUNT:-0} '
              '(restarts after requeue)"', ""]
    if requeue:
        lines.append(_TRAP.format(lead=args.signal_lead))
    return "\n".join(lines) + "\n"


def write_scripts(folder: Path, spec: dict, args) -> dict[str, Path]:
    """features.sbatch, cells.sbatch, report.sbatch in ``folder``; returns their paths by stage."""
    py, plan = _q(spec["python"]), _q(folder / "plan.json")
    gpus = args.gpus_per_node
    cpus = args.cpus_per_task or (8 if gpus else 1)
    logs = folder / "logs"
    out = {}

    per_node = max(1, gpus)
    res1 = [f"--nodes={args.nodes}", f"--ntasks-per-node={per_node}", f"--cpus-per-task={cpus}"]
    if gpus:
        res1.append(f"--gpus-per-node={gpus}")
    text = _header(spec, args, "features", f"shards and features on {args.nodes} node(s) x {per_node} task(s), "
                   "one per GPU (srun; rank and world from the SLURM variables)", str(logs / "features-%j.out"),
                   res1, requeue=True)
    text += ("# the rendezvous: the first node's address, a port from the job id\n"
             'first=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)\n'
             'export MASTER_ADDR=$(scontrol show node "$first" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)\n'
             'export MASTER_ADDR=${MASTER_ADDR:-$first}\n'
             "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n")
    text += _RUN.format(command=f"srun --kill-on-bad-exit=1 {py} -m launchers.slurm.stage features --plan {plan}")
    out["features"] = folder / "features.sbatch"

    n = len(spec["cells"])
    cells = []
    if n:
        array = f"0-{n - 1}" + (f"%{args.array_parallel}" if args.array_parallel else "")
        res2 = [f"--array={array}", "--ntasks=1", f"--cpus-per-task={cpus}"] + (["--gpus=1"] if gpus else [])
        cells = [_header(spec, args, "cells", f"a job array, one task per cell ({n}: plan.json 'cells' by task "
                         "index): selection + evaluation of the cell, cached in the work folder",
                         str(logs / "cell-%A_%a.out"), res2, requeue=True),
                 _RUN.format(command=f"{py} -m launchers.slurm.stage cell --plan {plan} "
                                     '--task "${SLURM_ARRAY_TASK_ID}"')]
    out["cells"] = folder / "cells.sbatch"

    cmd = [py, "bench_suite/run.py", "--table", _q(spec["table"]), "--profile", _q(spec["profile"]),
           "--work", _q(spec["work"]), "--out", _q(spec["out"]), "--quiet", "--slurm-collect"]
    if spec.get("seeds"):
        cmd += ["--seeds", _q(spec["seeds"])]
    for name, path in spec["sources"].items():
        cmd += ["--source", _q(f"{name}={path}")]
    report = _header(spec, args, "report", "the report from the cached cells (computes nothing; a missing cell "
                     "is reported as failed with its SLURM state and log)", str(logs / "report-%j.out"),
                     ["--ntasks=1", "--cpus-per-task=1"], requeue=False)
    report += _RUN.format(command=" ".join(cmd))
    out["report"] = folder / "report.sbatch"

    for stage, body in (("features", text), ("cells", "".join(cells)), ("report", report)):
        if stage == "features" and not spec["missing_features"] or stage == "cells" and not n:
            continue
        out[stage].write_text(body)
        out[stage].chmod(0o755)
    return out
