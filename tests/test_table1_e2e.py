"""End to end on real data: shards -> real encoder features -> selectors -> probe -> results/table1.md."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench_suite import run as run_py
from bench_suite.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]

PROFILE = {
    "name": "tiny-test",
    "scaled_down": True,
    "description": "test profile: scikit-learn digits, EfficientNet-Lite0 at 64 px, 2 seeds",
    "encoder": {"name": "efficientnet_lite0", "image_size": 64, "pooling": "gap"},
    "extraction": {"batch_size": 128},
    "seeds": [0, 1],
    "datasets": {"digits": {"label": "Digits", "role": "a tiny easy pool",
                            "pool": {"split": "train"}, "test": {"split": "test"}}},
    "recipes": {"linear_probe": {"kind": "linear_probe", "C": 10.0, "max_iter": 500}},
    "methods": {"activeft": {"iters": 50}},
    "tables": {"1": {"recipe": "linear_probe", "methods": ["random", "fds", "kmeans", "activeft"],
                     "cells": {"digits": [0.01, 0.03]}}},
}


def run_table(tmp_path, *extra, profile=PROFILE):
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump(profile))
    cmd = [sys.executable, "bench_suite/run.py", "--table", "1", "--profile", str(prof), "--out", str(tmp_path / "results"),
           "--work", str(tmp_path / "work"), "--quiet", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def plan_table(tmp_path, capsys, *extra, profile=PROFILE):
    """``run.py --check`` or ``--dry-run`` in this process: (exit code, stdout). They compute nothing; as a
    subprocess each spent ~6 s importing."""
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump(profile))
    code = run_py.main(["--table", "1", "--profile", str(prof), "--out", str(tmp_path / "results"), "--work",
                        str(tmp_path / "work"), "--quiet", *extra])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One full one-process run of PROFILE; the tests below compare against it (each full run costs ~20 s)."""
    tmp = tmp_path_factory.mktemp("reference")
    res = run_table(tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp


def copy_run(src: Path, dst: Path) -> None:
    for part in ("work", "results"):
        shutil.copytree(src / part, dst / part)


@pytest.mark.slow
def test_table1_end_to_end(tmp_path, reference):
    copy_run(reference, tmp_path)
    md = (tmp_path / "results" / "table1.md").read_text()
    data = json.loads((tmp_path / "results" / "table1.json").read_text())
    cells = data["cells"]
    assert len(cells) == 4 * 2 * 2
    for c in cells:
        assert c["budget"] == int(c["ratio"] * 1297 + 1e-9) and 0 <= c["top1"] <= 100  # floor (released code)
        assert c["n_train"] == c["budget"] and c["selection_seconds"] >= 0
    # provenance and honesty
    for needle in ("git revision", "hardware", "versions", "seeds", "not the paper's setting", "efficientnet_lite0",
                   "ActiveFT", "K-Means", "For reference: the paper's Table 1"):
        assert needle in md, needle
    # the pretrained features are informative: a 39-label probe beats chance (10%) by far
    big = [c["top1"] for c in cells if c["ratio"] == 0.03]
    assert min(big) > 50
    # determinism: different seeds differ for random, the same seed reproduces (rerun from cache and fresh)
    rnd = {c["seed"]: c["ids_sha"] for c in cells if c["method"] == "random" and c["ratio"] == 0.03}
    assert rnd[0] != rnd[1]
    res2 = run_table(tmp_path)  # rerun from the cache: the same cells, nothing computed
    assert res2.returncode == 0
    assert json.loads((tmp_path / "results" / "table1.json").read_text())["cells"] == cells
    assert _computed(tmp_path / "results") == (0, 16)
    # a fresh run of the same commit on the same machine gives identical numbers: test_fresh_recomputes...


@pytest.mark.parametrize("args, message", [
    (["--table", "9"], "unknown table '9'"),
    (["--profile", "nope"], "unknown profile 'nope'"),
])
def test_bad_arguments(tmp_path, args, message, cli_error):
    line = cli_error(run_py.main, [*args, "--out", tmp_path / "r", "--work", tmp_path / "w"])
    assert message in line
    assert not (tmp_path / "r").exists()


def test_unknown_method_in_profile(tmp_path):  # through the real entry point (bench_suite/run.py as a script)
    prof = json.loads(json.dumps(PROFILE))
    prof["tables"]["1"]["methods"] = ["random", "magic"]
    res = run_table(tmp_path, profile=prof)
    assert res.returncode == 2 and "unknown selection method 'magic'" in res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def _computed(results: Path, table: str = "1") -> tuple[int, int]:
    """(cells this run computed, cells in the table) from the report's provenance."""
    wall = json.loads((results / f"table{table}.json").read_text())["provenance"]["wall_time"]
    total, computed, cached, skipped = map(int, re.search(
        r"of (\d+) cells, (\d+) computed, (\d+) from the cache \(--work\), (\d+) skipped", wall).groups())
    assert computed + cached + skipped == total, wall
    return computed, total


def _numbers(results: Path) -> list[dict]:
    keep = ("dataset", "ratio", "method", "seed", "budget", "top1", "emd", "ids_sha")
    return [{k: c[k] for k in keep} for c in json.loads((results / "table1.json").read_text())["cells"]]


@pytest.mark.slow
def test_fresh_recomputes_and_a_changed_recipe_is_not_served_stale(tmp_path, reference, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = plan_table(empty, capsys, "--check")  # before anything exists: nothing cached, nothing written
    assert code == 0 and "cells: 16 in the table; 0 cached, 16 to compute" in out
    assert "shards not written yet" in out and not (empty / "work").exists()
    copy_run(reference, tmp_path)
    code, out = plan_table(tmp_path, capsys, "--check")
    assert "cells: 16 in the table; 16 cached, 0 to compute" in out and "intact" in out
    first = _numbers(tmp_path / "results")
    prov = json.loads((tmp_path / "results" / "table1.json").read_text())["provenance"]
    assert _computed(tmp_path / "results") == (16, 16) and "cell_revisions" in prov
    assert "cell revisions" in (tmp_path / "results" / "table1.md").read_text()
    res = run_table(tmp_path, "--fresh")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _computed(tmp_path / "results") == (16, 16)
    assert _numbers(tmp_path / "results") == first  # same commit, same machine: identical numbers
    prof = json.loads(json.dumps(PROFILE))
    prof["recipes"]["linear_probe"]["C"] = 0.01  # only the probe's regularisation changes
    code, out = plan_table(tmp_path, capsys, "--dry-run", profile=prof)  # every cell to compute, with estimates
    assert code == 0 and "16 in the table; 0 cached, 16 to compute" in out, out
    assert "digits 0.01: Random 0/2 ~" in out and "~?" not in out
    assert "estimated time for the cells to compute: " in out and not (tmp_path / "results2").exists()
    assert run_table(tmp_path, profile=prof).returncode == 0
    assert _computed(tmp_path / "results") == (16, 16)  # nothing served from the cache
    changed = _numbers(tmp_path / "results")
    assert [c["ids_sha"] for c in changed] == [c["ids_sha"] for c in first]  # same selections...
    assert [c["top1"] for c in changed] != [c["top1"] for c in first]  # ...other accuracies


@pytest.mark.slow
def test_two_runs_sharing_a_work_folder_compute_each_cell_once(tmp_path, reference):
    """Both runs write the same shard folders and cells; the features come from the reference run (the
    extraction takes the same lock as the shards, and would double this test's time on 2 cores)."""
    shutil.copytree(reference / "work" / "features", tmp_path / "work" / "features")
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    procs = []
    for name in ("a", "b"):
        cmd = [sys.executable, "bench_suite/run.py", "--table", "1", "--profile", str(prof), "--out",
               str(tmp_path / name), "--work", str(tmp_path / "work"), "--quiet"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}))
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    a, b = _computed(tmp_path / "a"), _computed(tmp_path / "b")
    assert a[1] == b[1] == 16 and a[0] + b[0] == 16  # every cell computed exactly once between the two
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b")
    assert not list((tmp_path / "work" / "cells").rglob("*.lock"))


@pytest.mark.slow
def test_two_processes_give_the_one_process_report(tmp_path, reference):
    """``accelerate launch --multi_gpu --num_processes 2 bench_suite/run.py``: both ranks walk the grid and claim
    cells, rank 0 writes the shards behind a barrier, counts gathered; the numbers equal the one-process run's.
    Then ``--fresh`` on the same work folder: each cell recomputed exactly once over the two ranks (a rank takes
    the other's fresh results as this launch's, not as stale ones)."""
    one = reference
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(free_port()), "bench_suite/run.py", "--table", "1", "--profile", str(prof), "--out",
           str(tmp_path / "two" / "results"), "--work", str(tmp_path / "two" / "work"), "--quiet"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert _computed(tmp_path / "two" / "results") == (16, 16)  # every cell once, counted over both ranks
    assert json.loads((tmp_path / "two" / "results" / "table1.json").read_text())["provenance"]["processes"] == 2
    assert _numbers(tmp_path / "two" / "results") == _numbers(one / "results")
    res = subprocess.run([*cmd, "--fresh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert _computed(tmp_path / "two" / "results") == (16, 16)
    assert _numbers(tmp_path / "two" / "results") == _numbers(one / "results")
    assert not any((tmp_path / "two" / "work" / ".fresh").iterdir())  # the launch's markers are removed


@pytest.mark.slow
def test_table_all_shares_cells_and_writes_an_index(tmp_path, reference):
    """``--table all`` runs every table of the profile (here 1 and 7), shares their common cells (ActiveFT at
    T = 50 is Table 1's ActiveFT), and writes results/README.md with each table's headline."""
    copy_run(reference, tmp_path)
    prof = json.loads(json.dumps(PROFILE))
    prof["tables"]["7"] = {"recipe": "linear_probe", "cells": {"digits": [0.01, 0.03]},
                           "methods": [{"label": "T = 0", "method": "activeft", "config": {"iters": 0}},
                                       {"label": "T = 50", "method": "activeft", "config": {"iters": 50}}]}
    res = run_table(tmp_path, "--table", "all", profile=prof)
    assert res.returncode == 0, res.stderr[-3000:]
    results = tmp_path / "results"
    assert _computed(results, "1") == (0, 16) and _computed(results, "7") == (4, 8)  # T = 50 is Table 1's ActiveFT
    index = (results / "README.md").read_text()
    assert "[1. classification](table1.md)" in index and "[7. iterations](table7.md)" in index
    cells = json.loads((results / "table1.json").read_text())["cells"]
    labels = {"random": "Random", "fds": "FDS", "kmeans": "K-Means", "activeft": "ActiveFT"}
    winners = set()
    for ratio in (0.01, 0.03):  # each column's best mean, recomputed from the cells
        total = {m: sum(c["top1"] for c in cells if c["method"] == m and c["ratio"] == ratio) for m in labels}
        winners.add(labels[max(total, key=total.get)])
    named = re.search(r"\| (\S+) best in (\d) of 2 columns \(top1\)", index.splitlines()[-2])
    assert named and named.group(1) in winners, (index, winners)  # the headline follows the numbers
    assert re.search(r"T = (0|50) best in \d of 2 columns \(top1\)", index.splitlines()[-1])
