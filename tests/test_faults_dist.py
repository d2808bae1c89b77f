"""Distributed faults with real processes and gloo: a rank killed mid-selection or mid-extraction makes the
others exit non-zero with one line naming it (never a hang), a rerun completes, and uneven shard counts per
rank still give every sample exactly once.

The ranks are started as plain processes with the env:// variables that torchrun and srun set (RANK,
WORLD_SIZE, MASTER_ADDR, ...), so no launcher agent kills the survivors for us: they must notice by themselves.
"""

import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as tdist

from bench_suite import heartbeat
from bench_suite.data.shards import write_shards
from bench_suite.runtime import free_port
from bench_suite.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30  # BENCH_SUITE_COLLECTIVE_TIMEOUT for these runs: the bound on how long a survivor may wait


def start_ranks(args: list[str], world: int = 2, port: int | None = None) -> tuple[list[subprocess.Popen], int]:
    port = port or free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "BENCH_SUITE_COLLECTIVE_TIMEOUT": str(TIMEOUT_S)}
        procs.append(subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs, port


def wait_all(procs, timeout=300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def wait_until_joined(port: int, rank: int, procs) -> None:
    """Until ``rank`` has joined the process group (its heartbeat is in the rendezvous store)."""
    deadline = time.monotonic() + 120
    store = None
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        try:
            store = store or tdist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=2))
            if store.check([heartbeat.KEY.format(rank)]):
                return
        except (RuntimeError, TimeoutError):
            pass
        time.sleep(0.05)
    pytest.fail(f"rank {rank} never joined")


def assert_survivor_names(results, lost: int, since: float) -> None:
    code, err = results[0]
    assert time.monotonic() - since < TIMEOUT_S + 30, "the surviving rank took longer than the collective timeout"
    assert code == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and f"rank {lost} stopped (killed or crashed)" in lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("pool") / "store"
    FeatureStore.from_array(rng.normal(size=(20000, 64)).astype(np.float32), normalize=True).save(path)
    return path


def test_a_rank_killed_mid_selection_stops_the_others_with_its_number(pool, tmp_path):
    out = tmp_path / "sel.json"
    args = ["bench_suite.cli.select", "--features", str(pool), "--budget", "50", "--method", "activeft",
            "--set", "iters=150", "progress=false", "--seed", "1", "--out", str(out)]
    procs, port = start_ranks(args)
    wait_until_joined(port, 1, procs)
    time.sleep(random.uniform(0.3, 1.5))
    assert procs[0].poll() is None, "the selection finished before the kill"
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    results = wait_all(procs)
    assert_survivor_names(results, lost=1, since=killed_at)
    assert results[1][0] == -signal.SIGKILL
    assert not out.exists(), "a selection was written by a run that lost a rank"
    rerun = wait_all(start_ranks(args)[0])  # the same command afterwards completes
    assert [r[0] for r in rerun] == [0, 0], rerun[0][1][-3000:]
    assert out.exists()


def test_a_rank_killed_mid_extraction_stops_the_others_and_a_rerun_completes(digits_shards, tmp_path):
    out = tmp_path / "features"
    args = ["bench_suite.cli.features", "--shards", str(digits_shards), "--encoder", "efficientnet_lite0",
            "--image-size", "64", "--batch-size", "32", "--out", str(out)]
    procs, _ = start_ranks(args)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".features.parts-*")):  # the ranks are extracting
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.5))
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    results = wait_all(procs)
    assert_survivor_names(results, lost=1, since=killed_at)
    assert not (out / "meta.json").exists(), "a store was written by a run that lost a rank"
    rerun = wait_all(start_ranks(args)[0])
    assert [r[0] for r in rerun] == [0, 0], rerun[0][1][-3000:]
    store = FeatureStore.open(out)
    assert store.meta["processes"] == 2 and np.array_equal(store.ids, np.arange(1297))


def test_one_shard_on_two_ranks_sees_every_sample_once(tmp_path):
    """Rank 1 has no shard at all and still takes part (3 shards on 2 ranks: test_features_dist.py)."""
    shards = tmp_path / "shards"
    manifest = write_shards("digits", "test", shards, shard_size=1000)
    assert len(manifest["shards"]) == 1
    args = ["bench_suite.cli.features", "--shards", str(shards), "--encoder", "efficientnet_lite0", "--image-size",
            "32", "--batch-size", "64", "--out", str(tmp_path / "two")]
    results = wait_all(start_ranks(args)[0])
    assert [r[0] for r in results] == [0, 0], results[0][1][-3000:]
    two = FeatureStore.open(tmp_path / "two")
    assert two.meta["processes"] == 2
    assert np.array_equal(two.ids, np.arange(500)) and len(np.unique(two.ids)) == 500
    assert np.allclose(np.linalg.norm(two.features, axis=1), 1.0, atol=1e-5)
