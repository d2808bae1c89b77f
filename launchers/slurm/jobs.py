"""The SLURM commands the launcher uses, and job states read back from the cluster.

``sbatch --parsable`` submits; ``squeue`` says what is still queued or running; a finished job's state comes
from ``sacct`` when the cluster keeps accounting, else from ``scontrol show job`` (which knows a finished
job for ``MinJobAge`` seconds, 300 by default). A state nobody knows any more reads ``UNKNOWN``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

from bench_suite.errors import BadInputError, MissingDataError

log = logging.getLogger(__name__)

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}


def need(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise MissingDataError(f"--launcher slurm needs the SLURM command {command!r} on PATH (run this on a "
                               "login node of the cluster; see SLURM.md)")
    return path


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    need(argv[0])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise BadInputError(f"{' '.join(argv[:2])} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return res


def sbatch(script, *options: str) -> str:
    """Submit ``script`` with extra command-line ``options``; returns the job id."""
    res = _run(["sbatch", "--parsable", *options, str(script)])
    job = res.stdout.strip().split(";")[0]
    if not job.isdigit():
        raise BadInputError(f"sbatch {script}: unexpected answer {res.stdout.strip()!r}")
    return job


def queued(job_ids: list[str]) -> dict[str, str]:
    """Jobs (and array tasks, ``JOB_TASK``) among ``job_ids`` that squeue still lists, with their state."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    res = _run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(ids)], check=False)
    out = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def _expand_tasks(spec: str) -> list[str]:
    """``1,3-5%2`` -> ['1', '3', '4', '5'] (scontrol's ArrayTaskId of pending tasks)."""
    out = []
    for part in spec.split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            step = 1
            if ":" in hi:
                hi, step = hi.split(":")
            out += [str(i) for i in range(int(lo), int(hi) + 1, int(step))]
        elif part:
            out.append(part)
    return out


def _from_sacct(job_ids: list[str]) -> dict[str, dict] | None:
    if shutil.which("sacct") is None:
        return None
    res = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State,ExitCode,NodeList,Elapsed", "-j",
                          ",".join(job_ids)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or not res.stdout.strip():
        return None  # no accounting on this cluster ("accounting storage is disabled")
    out: dict[str, dict] = {}
    for line in res.stdout.splitlines():  # -D: every requeued run of a job; the last line is the latest
        parts = line.split("|")
        if len(parts) < 5:
            continue
        jid, state, code, nodes, elapsed = parts[:5]
        m = re.fullmatch(r"(\d+)_\[(.+)\]", jid)  # pending array tasks, e.g. 12_[3-5]
        for j in ([f"{m.group(1)}_{t}" for t in _expand_tasks(m.group(2))] if m else [jid]):
            out[j] = {"state": state.split()[0], "exit_code": code, "nodes": nodes, "elapsed": elapsed,
                      "source": "sacct"}
    return out


def _from_scontrol(job_ids: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for job in sorted({j.split("_")[0] for j in job_ids}):
        res = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=120)
        for line in res.stdout.splitlines():
            f = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobState" not in f:
                continue
            info = {"state": f["JobState"], "exit_code": f.get("ExitCode", ""), "nodes": f.get("NodeList", ""),
                    "elapsed": f.get("RunTime", ""), "reason": f.get("Reason", ""),
                    "restarts": f.get("Restarts", "0"), "source": "scontrol"}
            if f.get("ArrayJobId") and f.get("ArrayTaskId"):
                for t in _expand_tasks(f["ArrayTaskId"]):
                    out[f"{f['ArrayJobId']}_{t}"] = info
            else:
                out[f.get("JobId", job)] = info
    return out


def states(job_ids: list[str]) -> dict[str, dict]:
    """State of each job or array task (``JOB`` or ``JOB_TASK``): ``{state, exit_code, nodes, elapsed, source}``;
    a job neither sacct nor scontrol knows is ``UNKNOWN``."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    known = _from_sacct(ids) or {}
    missing = [j for j in ids if j not in known]
    if missing and shutil.which("scontrol"):
        known.update({k: v for k, v in _from_scontrol(missing).items() if k not in known})
    return {j: known.get(j, {"state": "UNKNOWN", "source": "none (not in sacct, scontrol has forgotten it)"})
            for j in ids}


def cancel(job_ids: list[str]) -> None:
    ids = [j for j in job_ids if j]
    if ids:
        _run(["scancel", *ids], check=False)
