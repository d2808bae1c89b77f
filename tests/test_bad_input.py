"""Bad input gets exit status 2, one line naming the problem and the fix, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench_suite.cli import select as select_cli
from bench_suite.data.shards import write_shards
from bench_suite.errors import CorruptDataError
from bench_suite.finetune.samples import load_samples
from bench_suite.runtime import Runtime
from bench_suite.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 8)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    np.save(d / "good.npy", f)
    np.save(d / "notes.npy", np.array([{"a": 1}], dtype=object))
    g = f.copy()
    g[3, 2] = np.nan
    np.save(d / "nan.npy", g)
    z = f.copy()
    z[4] = 0
    np.save(d / "zero.npy", z)
    np.save(d / "int.npy", (f * 10).astype(np.int64))
    np.save(d / "one_d.npy", f[:, 0])
    np.save(d / "labels_short.npy", np.zeros(10, np.int64))
    return d


CASES = [
    (["--features", "missing_dir", "--budget", "5"], "feature store not found: missing_dir"),
    (["--features", "notes.npy", "--budget", "5"], "notes.npy is not a numeric .npy array"),
    (["--features", "nan.npy", "--budget", "5", "--method", "kmeans"], "features contain NaN/Inf (first at row 3)"),
    (["--features", "zero.npy", "--budget", "5"], "features contain 1 zero-norm rows (first at row 4)"),
    (["--features", "int.npy", "--budget", "5"], "features must be floating point (N x d float32), got int64"),
    (["--features", "one_d.npy", "--budget", "5"], "features must be 2-D (N x d), got shape (50,)"),
    (["--features", "good.npy", "--budget", "0"], "budget must be positive, got 0"),
    (["--features", "good.npy", "--budget", "51"], "budget 51 is larger than the pool (50 samples)"),
    (["--features", "good.npy", "--ratio", "2"], "ratio must be in (0, 1], got 2.0"),
    (["--features", "good.npy", "--budget", "5", "--method", "magic"],
     "unknown selection method 'magic'; known: activeft, alfamix, bilaf"),
    (["--features", "good.npy", "--budget", "5", "--set", "nope=1"], "activeft: unknown option(s) nope; known: balance"),
    (["--features", "good.npy", "--budget", "5", "--set", "iters=abc"],
     "activeft: option iters must be an integer, got 'abc'"),
    (["--features", "good.npy", "--budget", "5", "--set", "iters"], "--set expects key=value, got 'iters'"),
    (["--features", "good.npy", "--budget", "5", "--method", "coreset"],
     "method 'coreset' is an active-learning method and needs labels for its oracle (--labels)"),
    (["--features", "good.npy", "--budget", "5", "--method", "coreset", "--labels", "labels_short.npy"],
     "labels labels_short.npy have shape (10,), the store has 50 rows"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[c[1][:40] for c in CASES])
def test_select_cli_rejects(inputs, args, message, cli_error):
    assert message in cli_error(select_cli.main, [*args, "--out", "out.json"], cwd=inputs)
    assert not (inputs / "out.json").exists()


def test_select_cli_entry_point_exits_2_with_one_line(inputs):
    """The real ``python -m`` entry point of one case above (the others run its main in-process)."""
    args, message = CASES[0]
    res = subprocess.run([sys.executable, "-m", "bench_suite.cli.select", *args, "--out", "out.json"], cwd=inputs,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith("error: ") and message in res.stderr and res.stderr.count("\n") == 1
    assert not (inputs / "out.json").exists()


def test_a_store_whose_content_does_not_match_its_checksum_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    f = rng.normal(size=(30, 4)).astype(np.float32)
    FeatureStore.from_array(f, normalize=True).save(tmp_path / "s")
    FeatureStore.open(tmp_path / "s")  # intact
    feats = np.load(tmp_path / "s" / "features.npy")
    feats[[0, 1]] = feats[[1, 0]]  # still unit rows, but not what was saved
    np.save(tmp_path / "s" / "features.npy", feats)
    with pytest.raises(CorruptDataError, match="does not match the checksum in meta.json"):
        FeatureStore.open(tmp_path / "s")


def test_finetuning_refuses_a_truncated_shard(tmp_path):
    shards = tmp_path / "shards"
    write_shards("digits", "test", shards, shard_size=250)
    tar = shards / json.loads((shards / "manifest.json").read_text())["shards"][0]["name"]
    with tarfile.open(tar) as tf:  # cut the tar at a member boundary: a valid tar with fewer samples
        members = tf.getmembers()
        cut = members[len(members) // 2].offset
    tar.write_bytes(tar.read_bytes()[:cut])
    with pytest.raises(CorruptDataError, match="does not match its sha256 in the manifest"):
        load_samples(shards, Runtime(), ids=None, share=False, need_masks=False)
