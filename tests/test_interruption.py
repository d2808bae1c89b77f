"""SIGKILL at a random moment in each stage of a table run, then rerun: the rerun resumes from the last
completed unit and its report equals the report of an uninterrupted run.

Each test is a real ``bench_suite/run.py`` subprocess killed with SIGKILL from outside (its whole process
group). The moment is drawn at random (the draw is printed, so a failure can be replayed with
``KILL_SEED=...``) inside the stage, which the test recognises from what the run writes to its work folder:

- shard writing: the temporary shard folder holds a random number of finished tar files;
- feature extraction: the extraction's parts folder exists (the encoder is running);
- selection: a cell's lock is held and no finetuning checkpoint exists yet;
- finetuning: after its first checkpoint;
- report writing: report writes are too short to hit from outside, so the child is started through a small
  wrapper that SIGKILLs its own process in the middle of one of the report's writes, chosen at random
  (half the bytes written, or all written but not yet renamed).

If a kill lands after the stage has already finished, the attempt is repeated with an earlier moment, so a
test never passes without having interrupted its stage.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench_suite.tables.cells import CELL_VERSION

ROOT = Path(__file__).resolve().parents[1]
KILL_SEED = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(1 << 30)))

PROFILE = {
    "name": "interruption-test",
    "scaled_down": True,
    "description": "test profile: scikit-learn digits, EfficientNet-Lite0 at 64 px, a finetune recipe",
    "encoder": {"name": "efficientnet_lite0", "image_size": 64, "pooling": "gap"},
    "extraction": {"batch_size": 64},
    "seeds": [0],
    "datasets": {"digits": {"label": "Digits", "role": "a tiny easy pool",
                            "pool": {"split": "train", "limit": 600, "shard_size": 50},
                            "test": {"split": "test", "limit": 200, "shard_size": 100}}},
    # the real encoder, partly frozen (the last block trains: checkpoints hold only the trainable tensors)
    "recipes": {"tiny_ft": {"kind": "finetune", "optimizer": "sgd", "lr": 0.003, "momentum": 0.9,
                            "weight_decay": 0.0001, "batch_size": 16, "micro_batch_size": 16, "epochs": 4,
                            "schedule": "cosine", "trainable_blocks": 1, "image_size": 64, "eval_every": 0,
                            "best_or_last": "last", "checkpoint_every": 1}},
    "methods": {"activeft": {"iters": 200}},
    "tables": {"1": {"recipe": "tiny_ft", "methods": ["random", "activeft"], "cells": {"digits": [0.03]}}},
}


def command(tmp_path: Path) -> list[str]:
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    return ["bench_suite/run.py", "--table", "1", "--profile", str(prof), "--out", str(tmp_path / "results"),
            "--work", str(tmp_path / "work"), "--quiet"]


def env(extra_path: Path | None = None) -> dict:
    path = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def finish(tmp_path: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *command(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env())
    assert res.returncode == 0, res.stderr[-3000:]
    return res


RUN_SPECIFIC = ("seconds", "path", "revision", "selection_info", "resumed_from_epoch", "epochs_this_run")


def strip(obj):
    """``obj`` without what legitimately differs between runs: timings, paths of the work folder, the
    revision, and whether a finetune resumed."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not any(w in k for w in RUN_SPECIFIC)}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def comparable(results: Path) -> tuple:
    """The report's cells and its markdown tables, without what legitimately differs between runs."""
    cells = strip(json.loads((results / "table1.json").read_text())["cells"])
    sections = (results / "table1.md").read_text().split("\n## ")[1:]  # the provenance header is run-specific
    return cells, [s for s in sections if "time" not in s.splitlines()[0]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run; the other tests copy the stages they do not interrupt from its work folder."""
    tmp = tmp_path_factory.mktemp("reference")
    finish(tmp)
    return tmp


def seed_work(src: Path, dst: Path, *parts: str) -> None:
    for part in parts:
        shutil.copytree(src / "work" / part, dst / "work" / part)


def kill_when(tmp_path: Path, ready, finished, delay_s: float, rng: random.Random, what: str, reset):
    """Start a run, wait until ``ready()`` says the stage is under way, wait a random part of ``delay_s`` and
    SIGKILL the run's process group. While ``finished()`` says the kill came after the stage, ``reset()``
    removes the stage's output and the attempt is repeated with a shorter delay."""
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, *command(tmp_path)], cwd=ROOT, env=env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not (ready() or finished()):
            assert proc.poll() is None, f"the run ended before {what} began: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"{what} never began"
            time.sleep(0.002)
        wait = rng.uniform(0, delay_s / (2 ** attempt))
        time.sleep(wait)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"KILL_SEED={KILL_SEED}: killed {wait:.3f} s into {what} (attempt {attempt + 1})")
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
        if not finished():
            return
        reset()
    pytest.fail(f"{what} finished before every kill (KILL_SEED={KILL_SEED})")


def pool_shards(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "work" / "shards").glob("digits-pool-*"))


def test_kill_while_writing_shards(tmp_path, reference):
    """The later stages are the reference's: shard folders are named by their content's checksum, so the
    rerun's shards are the reference's exactly when its folder names are (and its features then match)."""
    rng = random.Random(KILL_SEED)
    seed_work(reference, tmp_path, "features", "cells", "finetune")
    n_tars = rng.randint(1, 11)  # of 12 pool shards

    def ready():  # the temporary folder of the pool's shards holds n_tars finished tars
        tmps = list((tmp_path / "work" / "shards").glob(".digits-pool-*.tmp.*"))
        return any(len(list(t.glob("*.tar"))) > n_tars for t in tmps)

    def finished():
        return any((d / "manifest.json").exists() for d in pool_shards(tmp_path))

    kill_when(tmp_path, ready, finished, 0.05, rng, "shard writing",
              reset=lambda: shutil.rmtree(tmp_path / "work" / "shards"))
    assert not any(d.is_dir() and d.name.startswith("digits-pool") for d in (tmp_path / "work" / "shards").iterdir()), \
        "a half-written shard folder has its final name"
    finish(tmp_path)
    assert comparable(tmp_path / "results") == comparable(reference / "results")
    assert [p.name for p in pool_shards(tmp_path)] == [p.name for p in pool_shards(reference)]
    assert not list((tmp_path / "work" / "shards").glob(".digits-pool-*.tmp.*")), "the killed run's temporary folder is left"


def test_kill_during_feature_extraction(tmp_path, reference):
    rng = random.Random(KILL_SEED + 1)
    seed_work(reference, tmp_path, "shards", "cells", "finetune")  # the store is compared byte for byte below
    features = tmp_path / "work" / "features"

    def ready():
        return any(features.glob(".digits-pool-*.parts-*"))

    def finished():
        return any((d / "meta.json").exists() for d in features.glob("digits-pool-*"))

    kill_when(tmp_path, ready, finished, 1.0, rng, "feature extraction", reset=lambda: shutil.rmtree(features))
    finish(tmp_path)
    assert comparable(tmp_path / "results") == comparable(reference / "results")
    ref_store = next((reference / "work" / "features").glob("digits-pool-*"))
    store = next(features.glob("digits-pool-*"))
    for name in ("features.npy", "ids.npy", "labels.npy"):
        if (ref_store / name).exists():
            assert (store / name).read_bytes() == (ref_store / name).read_bytes(), name


def forget_cells(tmp_path: Path) -> None:
    for part in ("cells", "finetune"):
        shutil.rmtree(tmp_path / "work" / part, ignore_errors=True)


def cell_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "work" / "cells").rglob("*.json"))


def test_kill_during_a_selection_resumes_the_table_part_way(tmp_path, reference):
    rng = random.Random(KILL_SEED + 2)
    seed_work(reference, tmp_path, "shards", "features")
    ref_cells = {json.loads(p.read_text())["method"]: p.name for p in cell_files(reference)}
    activeft_cell = tmp_path / "work" / "cells" / f"v{CELL_VERSION}" / ref_cells["activeft"]

    def checkpoints() -> int:  # finetunings started: a checkpoint, or the metrics a finished one keeps
        return len({p.parent for p in (tmp_path / "work" / "finetune").rglob("*")
                    if p.name in ("checkpoint.pt", "metrics.json")})

    def ready():  # the ActiveFT cell is claimed and its finetuning has not started (one per done cell)
        return activeft_cell.with_suffix(".lock").exists() and checkpoints() == len(cell_files(tmp_path))

    def finished():  # its result is written, or its finetuning has written a checkpoint
        claimed = activeft_cell.with_suffix(".lock").exists()
        return activeft_cell.exists() or (claimed and checkpoints() > len(cell_files(tmp_path)))

    kill_when(tmp_path, ready, finished, 0.5, rng, "ActiveFT's selection", reset=lambda: forget_cells(tmp_path))
    done_before = len(cell_files(tmp_path))
    res = finish(tmp_path)
    assert comparable(tmp_path / "results") == comparable(reference / "results")
    computed = json.loads((tmp_path / "results" / "table1.json").read_text())["provenance"]["wall_time"]
    assert f"of 2 cells, {2 - done_before} computed, {done_before} from the cache" in computed, (computed, res.stderr[-1000:])


def test_kill_during_a_finetune_resumes_from_its_checkpoint(tmp_path, reference):
    rng = random.Random(KILL_SEED + 3)
    seed_work(reference, tmp_path, "shards", "features")
    finetune = tmp_path / "work" / "finetune"

    def ready():
        return any(finetune.rglob("checkpoint.pt"))

    def finished():
        return any(finetune.rglob("metrics.json"))

    kill_when(tmp_path, ready, finished, 0.6, rng, "the first cell's finetuning", reset=lambda: forget_cells(tmp_path))
    ckpt = next(finetune.rglob("checkpoint.pt"))
    import torch

    epoch = int(torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"])
    assert 1 <= epoch < 4
    finish(tmp_path)
    metrics = json.loads((ckpt.parent / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == epoch and metrics["epochs_this_run"] == 4 - epoch
    assert comparable(tmp_path / "results") == comparable(reference / "results")


KILL_IN_REPORT = '''
import os, random, runpy, signal, sys
from pathlib import Path
from bench_suite import atomic

rng = random.Random(int(os.environ["KILL_SEED"]))
target = rng.choice(["table1.json", "table1.md"])
moment = rng.choice(["half written", "written, not renamed"])
real = atomic.write_text

def write_text(path, text):
    if Path(path).name != target:
        return real(path, text)
    with atomic.atomic_path(path) as tmp:
        tmp.write_text(text if moment != "half written" else text[: len(text) // 2])
        print(f"SIGKILL in report writing: {target}, {moment}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

atomic.write_text = write_text
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_kill_while_writing_the_report(tmp_path, reference):
    seed_work(reference, tmp_path, "shards", "features", "cells", "finetune")
    wrapper = tmp_path / "kill_in_report.py"
    wrapper.write_text(KILL_IN_REPORT)
    res = subprocess.run([sys.executable, str(wrapper), *command(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**env(), "KILL_SEED": str(KILL_SEED)})
    print(f"KILL_SEED={KILL_SEED}")
    assert res.returncode == -signal.SIGKILL and "SIGKILL in report writing" in res.stderr, res.stderr[-2000:]
    results = tmp_path / "results"
    for name in ("table1.json", "table1.md"):  # either absent or complete: never half a report
        if (results / name).exists():
            ref = (reference / "results" / name).read_text()
            text = (results / name).read_text()
            assert name != "table1.json" or json.loads(text)["cells"]
            assert len(text) > 0.9 * len(ref)
    finish(tmp_path)
    assert comparable(results) == comparable(reference / "results")
