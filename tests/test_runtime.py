"""The Runtime on real gloo process groups: rank-0-only work reaches every rank, a failure on rank 0 stops every
rank instead of hanging, a lost rank is an error within the collective timeout, and the device rule."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from bench_suite import runtime
from bench_suite.errors import BadInputError
from bench_suite.methods import registry
from bench_suite.store import FeatureStore


def _init(rank, world, port):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                             timeout=runtime.collective_timeout())
    return runtime.current()


def _rank0_work(rank, world, port, out_dir):
    rt = _init(rank, world, port)
    res = {}
    rng = np.random.default_rng(0)
    store = FeatureStore.from_array(rng.normal(size=(200, 8)).astype(np.float32), normalize=True)
    res["kmeans"] = registry.get("kmeans", device="cpu").select(store, 10, seed=3, dist=rt).ids.tolist()

    def boom():
        raise ZeroDivisionError("not a BenchError")

    try:
        rt.on_main(boom)
        res["boom"] = None
    except Exception as exc:  # noqa: BLE001
        res["boom"] = f"{type(exc).__name__}: {exc}"
    Path(out_dir, f"{rank}.json").write_text(json.dumps(res))
    runtime.exit_process(0)


def test_rank0_only_work_reaches_every_rank_and_its_failure_stops_them(tmp_path):
    mp.spawn(_rank0_work, args=(2, runtime.free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    one = registry.get("kmeans", device="cpu").select(
        FeatureStore.from_array(np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32), normalize=True),
        10, seed=3)
    assert r0["kmeans"] == r1["kmeans"] == one.ids.tolist()
    assert r0["boom"] == "ZeroDivisionError: not a BenchError"
    assert r1["boom"] == "RankFailedError: rank 0 failed: ZeroDivisionError: not a BenchError"


def _lost_rank(rank, world, port, out_dir):
    rt = _init(rank, world, port)
    if rank == 1:
        os._exit(0)  # lost: never joins the next collective
    t0 = time.monotonic()
    try:
        rt.all_gather_object("hello")
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001
        outcome = type(exc).__name__
    Path(out_dir, "0.json").write_text(json.dumps({"outcome": outcome, "seconds": time.monotonic() - t0}))
    os._exit(0)


def test_a_lost_rank_is_an_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_SUITE_COLLECTIVE_TIMEOUT", "10")
    ctx = mp.get_context("spawn")
    port = runtime.free_port()
    procs = [ctx.Process(target=_lost_rank, args=(r, 2, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert not p.is_alive(), "a rank hung"
    res = json.loads((tmp_path / "0.json").read_text())
    assert res["outcome"] != "returned" and res["seconds"] < 60


def test_device_rule():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else
                                              torch.device("cpu"))
    with pytest.raises(BadInputError, match="is not a torch device"):
        runtime.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="torch sees no CUDA GPU"):
            runtime.resolve_device("cuda:0", what="kmeans: option device")


@pytest.mark.parametrize("nodelist,host", [("n[1-2]", "n1"), ("n[1-2],m3", "n1"), ("gpu[007,009-010]", "gpu007"),
                                           ("node12", "node12"), ("a1,b2", "a1"), ("x[3]", "x3")])
def test_rendezvous_host_from_a_slurm_node_list(nodelist, host):
    """MASTER_ADDR for a bare srun: the first host of SLURM_JOB_NODELIST, brackets expanded."""
    from bench_suite.runtime import first_host

    assert first_host(nodelist) == host
