"""The SLURM launcher against a real slurmctld and two slurmd on this host (``.ci/slurm_setup.sh``; no mocks).

The cluster: slurm-wlm from apt, one controller, nodes n1 and n2 at 127.0.0.1 (2 CPUs each), cons_tres with
CR_Core_Memory, DefMemPerCPU=1024, no accounting database (job states from ``scontrol show job``). The tests
skip, with the script's one-line reason, only where apt cannot install slurm-wlm.

1. a tiny cpu-profile table through ``--launcher slurm`` (stage 1 on 2 nodes, a 2-task array, the report job)
   gives the local run's numbers and report;
2. ``srun`` over 2 nodes runs the distributed ActiveFT selector (``launchers/select.sbatch``: rank and world
   from the SLURM variables) and its ids equal the one-process selection's;
3. an array task killed with scancel is reported as failed (state, log) and left out of the means; the
   same command resubmits it and the table completes with the local numbers;
4. a finetune cell warned with SIGUSR1 (what ``--signal=B:USR1@S`` sends before the time limit) checkpoints
   mid-run and requeues itself, is then requeued from outside (``scontrol requeue``), and resumes from its
   checkpoint each time; its result equals the uninterrupted local one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench_suite import locks
from bench_suite.cli import select as select_cli

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / ".ci" / "slurm_setup.sh"

PROFILE = {
    "name": "slurm-test",
    "scaled_down": True,
    "description": "test profile: digits (600 / 200 images), EfficientNet-Lite0 at 64 px",
    "encoder": {"name": "efficientnet_lite0", "image_size": 64, "pooling": "gap"},
    "extraction": {"batch_size": 100},
    "seeds": [0],
    "datasets": {"digits": {"label": "Digits", "role": "a tiny easy pool",
                            "pool": {"split": "train", "limit": 600, "shard_size": 100},
                            "test": {"split": "test", "limit": 200, "shard_size": 100}}},
    "recipes": {"linear_probe": {"kind": "linear_probe", "C": 10.0, "max_iter": 300},
                # the real encoder, its last block trainable; 3 steps an epoch, a checkpoint each epoch. 24 epochs
                # (about 5 s on a quiet 2-core machine): with 4, a SIGUSR1 that lands a second late stopped the run
                # after epoch 3 and the resumed run finished its last epoch before the test could requeue it
                "tiny_ft": {"kind": "finetune", "optimizer": "sgd", "lr": 0.003, "momentum": 0.9,
                            "weight_decay": 0.0001, "batch_size": 8, "micro_batch_size": 8, "epochs": 24,
                            "schedule": "cosine", "trainable_blocks": 1, "image_size": 64, "eval_every": 0,
                            "best_or_last": "last", "checkpoint_every": 1}},
    "methods": {"activeft": {"iters": 100}},
    "tables": {"1": {"recipe": "linear_probe", "methods": ["random", "activeft"],
                     "cells": {"digits": [0.03]}},
               "6": {"recipe": "tiny_ft", "methods": [{"label": "tau = 0.07", "method": "activeft",
                                                        "config": {"temperature": 0.07}}],
                     "cells": {"digits": [0.04]}}},
}
NUMBERS = ("dataset", "ratio", "method", "seed", "budget", "top1", "emd", "ids_sha")


@pytest.fixture(scope="module")
def cluster():
    """A running slurmctld + slurmd n1, n2 for this module; stopped afterwards."""
    res = subprocess.run(["bash", str(SETUP), "start"], capture_output=True, text=True, timeout=900)
    if res.returncode == 3:
        pytest.skip(res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0, res.stderr[-3000:]
    conf = re.search(r"export SLURM_CONF=(\S+)", res.stdout).group(1)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield {"conf": conf, "two_nodes": "n2" in res.stderr}
    subprocess.run(["bash", str(SETUP), "stop"], capture_output=True, text=True, timeout=120)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_SUITE_SLURM_POLL_S": "0.5", "OMP_NUM_THREADS": "1"}


def run_py(tmp: Path, *extra: str, table: str = "1", timeout: int = 600) -> subprocess.CompletedProcess:
    prof = tmp / "profile.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    cmd = [sys.executable, "bench_suite/run.py", "--table", table, "--profile", str(prof), "--out",
           str(tmp / "results"), "--work", str(tmp / "work"), "--quiet", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env())


def slurm(tmp: Path, *extra: str, table: str = "1", timeout: int = 600) -> subprocess.CompletedProcess:
    return run_py(tmp, "--launcher", "slurm", *extra, table=table, timeout=timeout)


def start_slurm(tmp: Path, table: str) -> tuple[subprocess.Popen, dict]:
    """``run.py --launcher slurm`` in the background (it submits, then waits); returns it and its job ids."""
    prof = tmp / "profile.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    proc = subprocess.Popen([sys.executable, "bench_suite/run.py", "--table", table, "--profile", str(prof), "--out",
                             str(tmp / "results"), "--work", str(tmp / "work"), "--quiet", "--launcher", "slurm"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    subs = tmp / "work" / "slurm" / f"table{table}" / "submissions.json"
    jobs = wait_for(lambda: subs.exists() and json.loads(subs.read_text())[-1]["jobs"], 120, "the submission")
    return proc, jobs


def numbers(results: Path, table: str = "1") -> list[dict]:
    cells = json.loads((results / f"table{table}.json").read_text())["cells"]
    return sorted(({k: c.get(k) for k in NUMBERS} for c in cells), key=lambda c: (c["method"], c["seed"]))


def body(md: str) -> str:
    """A report from its Setting on: without the provenance (command, date, wall time, revisions differ), and
    without the selection wall times."""
    text = md.split("## Setting", 1)[1]
    return re.sub(r"## Selection wall time.*?(?=\n## )", "", text, flags=re.S)


def squeue(job: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", job], capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def wait_for(predicate, timeout: float, what: str, poll: float = 0.3):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_ids(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"(features|cells|report)=(\S+)", stdout))


def run_local(tmp: Path, table: str) -> subprocess.Popen:
    """``run.py --table TABLE`` here, one process, in the background."""
    (tmp / "profile.yaml").write_text(yaml.safe_dump(PROFILE))
    return subprocess.Popen([sys.executable, "bench_suite/run.py", "--table", table, "--profile",
                             str(tmp / "profile.yaml"), "--out", str(tmp / "results"), "--work", str(tmp / "work"),
                             "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())


@pytest.fixture(scope="module")
def through_slurm(cluster, tmp_path_factory):
    """Table 1 through --launcher slurm from an empty work folder (stage 1 on 2 nodes, 2 array tasks, the report),
    and meanwhile the same table run locally from its own empty work folder (one process)."""
    tmp, here = tmp_path_factory.mktemp("slurm"), tmp_path_factory.mktemp("local")
    local = run_local(here, "1")
    t0 = time.perf_counter()
    res = slurm(tmp, "--nodes", "2" if cluster["two_nodes"] else "1")
    seconds = time.perf_counter() - t0
    _, err = local.communicate(timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert local.returncode == 0, err[-3000:]
    return tmp, res, seconds, here


@pytest.fixture(scope="module")
def local(through_slurm):
    """The local run of Table 1."""
    return through_slurm[3]


@pytest.mark.slow
def test_table_through_slurm_equals_the_local_run(through_slurm, local):
    tmp, res, seconds, _ = through_slurm
    ids = job_ids(res.stdout)
    assert set(ids) == {"features", "cells", "report"} and "-" not in ids.values(), res.stdout
    sub = sorted((tmp / "work" / "slurm" / "table1").glob("2*"))[-1]
    for name in ("features.sbatch", "cells.sbatch", "report.sbatch", "plan.json", "submit.sh"):
        assert (sub / name).exists(), name
    cells_sbatch = (sub / "cells.sbatch").read_text()
    assert "#SBATCH --array=0-1" in cells_sbatch and "#SBATCH --requeue" in cells_sbatch
    assert "#SBATCH --signal=B:USR1@120" in cells_sbatch
    assert f"--dependency=afterok:{ids['features']}" in (sub / "submit.sh").read_text()
    logs = sorted(p.name for p in (sub / "logs").iterdir())
    assert logs == sorted([f"features-{ids['features']}.out", f"report-{ids['report']}.out"]
                          + [f"cell-{ids['cells']}_{i}.out" for i in range(2)])
    feat_log = (sub / "logs" / f"features-{ids['features']}.out").read_text()
    assert "stage 1 done" in feat_log and "process(es)" in feat_log
    assert numbers(tmp / "results") == numbers(local / "results")
    assert body((tmp / "results" / "table1.md").read_text()) == body((local / "results" / "table1.md").read_text())
    # the same command again: everything cached, the report is written here and nothing is submitted
    again = slurm(tmp)
    assert again.returncode == 0 and "all 2 cells are cached" in again.stderr and "jobs:" not in again.stdout
    print(f"table through SLURM from empty: {seconds:.1f} s")


@pytest.mark.slow
def test_srun_distributed_selection_equals_one_process(cluster, through_slurm, tmp_path):
    feats = next((through_slurm[0] / "work" / "features").glob("digits-pool-*"))
    nodes = ["--nodes=2", "--ntasks-per-node=1"] if cluster["two_nodes"] else ["--nodes=1", "--ntasks=2"]
    args = ["--features", str(feats), "--ratio", "0.05", "--method", "activeft", "--seed", "3", "--set", "iters=20"]
    sub = subprocess.run(["sbatch", "--wait", "--parsable", *nodes, "--cpus-per-task=1",
                          f"--output={tmp_path}/select-%j.out", "launchers/select.sbatch", *args,
                          "--out", str(tmp_path / "two.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env())
    log = "".join(p.read_text() for p in tmp_path.glob("select-*.out"))
    assert sub.returncode == 0, sub.stderr + log[-3000:]
    select_cli.main([*args, "--out", str(tmp_path / "one.json")])  # one process, in this one (its imports done)
    two, single = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert two["ids"] == single["ids"] and len(two["ids"]) == 30
    assert two["info"]["world"] == 2 and single["info"]["world"] == 1  # the pool really was split over 2 tasks


def _drop_cell(tmp: Path, method: str) -> Path:
    """Delete the cached result of ``method``'s cell (as if it had never finished); return its path."""
    for path in (tmp / "work" / "cells").rglob("*.json"):
        if json.loads(path.read_text())["method"] == method:
            path.unlink()
            return path
    raise AssertionError(method)


@pytest.mark.slow
def test_cancelled_cell_is_reported_failed_then_resubmitted(through_slurm, local, tmp_path):
    shutil.copytree(through_slurm[0] / "work", tmp_path / "work", ignore=shutil.ignore_patterns("slurm"))
    # This process holds the cell's lock, so the array task waits for it while RUNNING and the cancel always finds
    # the cell unfinished (a fast machine once finished it between squeue's RUNNING and the scancel)
    hold = _drop_cell(tmp_path, "random").with_suffix(".lock")
    assert locks.try_lock(hold)
    try:
        proc, ids = start_slurm(tmp_path, "1")  # submits, then waits for the jobs
        task = f"{ids['cells']}_0"
        wait_for(lambda: squeue(task).get(task) == "RUNNING", 60, f"array task {task} to run")
        subprocess.run(["scancel", task], check=True)
        out, err = proc.communicate(timeout=600)
    finally:
        locks.release(hold)
    assert proc.returncode == 1, err[-3000:]
    assert ids["features"] is None and "stage 1 not needed" in err  # features cached: no stage 1
    assert re.search(rf"FAILED digits 0.03 Random seed 0: CANCELLED \(job {task}\), log \S+cell-{task}.out",
                     err), err
    md = (tmp_path / "results" / "table1.md").read_text()
    assert "## Failed cells" in md and f"| digits 0.03 Random seed 0 | CANCELLED | {task} |" in md
    failed = [c for c in json.loads((tmp_path / "results" / "table1.json").read_text())["cells"] if c.get("failed")]
    assert [c["method"] for c in failed] == ["random"] and failed[0]["failed"]["log"].endswith(f"cell-{task}.out")
    assert re.search(r"\| Random \| failed \|", md)  # left out of the means: its only seed failed
    sub = slurm(tmp_path, "--no-wait")  # resubmits the failed cell alone; prints the job ids and returns
    assert sub.returncode == 0 and "(1 cells of 2; 1 cached)" in sub.stderr, sub.stderr[-3000:]
    assert job_ids(sub.stdout)["cells"] != ids["cells"]
    res = slurm(tmp_path)  # a later run collects: waits for that submission (or finds it done), the report
    assert res.returncode == 0, res.stderr[-3000:]
    assert numbers(tmp_path / "results") == numbers(local / "results")
    assert "Failed cells" not in (tmp_path / "results" / "table1.md").read_text()


@pytest.mark.slow
def test_finetune_cell_checkpoints_on_usr1_and_resumes_after_requeue(through_slurm, tmp_path_factory, tmp_path):
    shutil.copytree(through_slurm[0] / "work" / "features", tmp_path / "work" / "features")
    shutil.copytree(through_slurm[0] / "work" / "shards", tmp_path / "work" / "shards")
    # the uninterrupted local run, for comparison, runs meanwhile (the SLURM job spends seconds queued)
    ref = tmp_path_factory.mktemp("local6")
    shutil.copytree(through_slurm[0] / "work" / "features", ref / "work" / "features")
    local = run_local(ref, "6")
    proc, ids = start_slurm(tmp_path, "6")  # submits, then waits for the jobs
    task = f"{ids['cells']}_0"
    ckpt = tmp_path / "work" / "finetune"
    wait_for(lambda: list(ckpt.glob("*/checkpoint.pt")), 240, "the first epoch's checkpoint")
    # what SLURM sends --signal-lead seconds before the time limit: the batch shell forwards it, Python
    # checkpoints at the next optimiser step, the job requeues itself
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True)
    log = next((tmp_path / "work" / "slurm" / "table6").glob("2*/logs")) / f"cell-{task}.out"
    wait_for(lambda: "resumed from" in log.read_text(), 240, "the requeued task to resume")
    first = log.read_text()
    assert "SIGUSR1: the time limit is near" in first and "received SIGUSR1" in first, first[-3000:]
    # then requeued from outside while the resumed run trains (SIGTERM: it checkpoints at the next step, goes)
    wait_for(lambda: log.read_text().count("finetune cls:") >= 2, 120, "the resumed run to train")
    subprocess.run(["scontrol", "requeue", task], check=True)
    out, err = proc.communicate(timeout=600)  # the launcher waited for the task and the report
    assert proc.returncode == 0, err[-3000:] + log.read_text()[-3000:]
    text = log.read_text()
    assert "start 2 (restarts after requeue)" in text and text.count("resumed from") >= 2, text
    assert re.search(r"resumed from \S+checkpoint.pt at epoch \d+", text), text
    cell = json.loads((tmp_path / "results" / "table6.json").read_text())["cells"][0]
    assert cell["resumed_from_epoch"] is not None and cell["epochs_this_run"] < cell["epochs"]
    _, err = local.communicate(timeout=600)
    assert local.returncode == 0, err[-3000:]
    assert numbers(tmp_path / "results", "6") == numbers(ref / "results", "6")
