"""Feature extraction: 1 process without DataLoader workers and 2 real processes (accelerate launch, gloo) with
2 workers each give identical stores; the 3 shards of the digits pool fall 2 + 1 on the two ranks (uneven),
and every sample is seen once."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from bench_suite.store import FeatureStore
from launching import run_launch

ROOT = Path(__file__).resolve().parents[1]
# accelerate's launcher without its CLI front (`accelerate launch` also imports its `estimate` command, and
# with it timm: ~4.5 s more per launch on a CPU core)
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _launch(nproc, shards, out, encoder="efficientnet_lite0", size=32, workers=0):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def cmd(port):
        dist = ["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(port)] if nproc > 1 \
            else ["--num_processes", "1"]
        return [*ACCELERATE, *dist, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "bench_suite.cli.features", "--shards", str(shards), "--encoder", encoder, "--image-size",
                str(size), "--batch-size", "50", "--workers", str(workers), "--out", str(out)]

    res = run_launch(cmd, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_two_processes_equal_one(digits_shards, tmp_path):
    _launch(1, digits_shards, tmp_path / "one")
    res = _launch(2, digits_shards, tmp_path / "two", workers=2)
    one, two = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "two")
    assert two.meta["processes"] == 2 and one.meta["processes"] == 1, res.stderr[-2000:]
    assert two.meta["extraction"]["workers"] == 2 and one.meta["extraction"]["workers"] == 0
    assert len(one) == 1297 and np.array_equal(one.ids, np.arange(1297))
    assert np.array_equal(one.ids, two.ids) and np.array_equal(one.labels, two.labels)
    np.testing.assert_array_equal(np.asarray(one.features), np.asarray(two.features))
    assert np.allclose(np.linalg.norm(one.features, axis=1), 1.0, atol=1e-5)
    assert not list(tmp_path.glob(".*parts*")), "rank parts must be cleaned up"


def test_feature_cache_is_reused_invalidated_and_forced(digits_test_shards, tmp_path):
    """The same shards + encoder + pooling + size reuse the store; another image size or pooling re-extracts
    (the fingerprint differs); ``--force`` re-extracts an up-to-date store (to the same bytes)."""
    from bench_suite.cli import features as features_cli

    out = tmp_path / "f"

    def run(*extra):
        args = ["--shards", str(digits_test_shards), "--encoder", "efficientnet_lite0", "--image-size", "32",
                "--out", str(out), *extra]
        assert features_cli.main(args) == 0
        meta = json.loads((out / "meta.json").read_text())
        return meta["fingerprint"], (out / "meta.json").stat().st_mtime_ns, (out / "features.npy").read_bytes()

    fp, t0, data = run()
    assert run() == (fp, t0, data)  # cached: not rewritten
    fp2, t2, data2 = run("--force")
    assert fp2 == fp and t2 > t0 and data2 == data  # re-extracted, to the same bytes
    fp3, _, data3 = run("--pooling", "gap", "--image-size", "48")
    assert fp3 != fp and data3 != data
    assert FeatureStore.open(out).meta["encoder"]["image_size"] == 48
