"""ActiveFT on a pool split across 2 real gloo processes selects exactly what one process selects."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits

from bench_suite import runtime as bdist
from bench_suite.activeft import ActiveFT, static_loop
from bench_suite.errors import BenchError
from bench_suite.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [
    {"budget": 50, "seed": 0, "iters": 80},  # official (default)
    {"budget": 50, "seed": 1, "iters": 60, "objective": "paper"},
    {"budget": 40, "seed": 2, "iters": 40, "subset": 600, "init": "fps"},
    {"budget": 30, "seed": 3, "iters": 20, "regularizer": "infonce"},
    {"budget": 30, "seed": 5, "iters": 30, "no_update": True, "lr": 5e-3},  # Table 5a "No-Update"
    # the fixed-shape loop (a GPU's CUDA graph, uncaptured); the workers force its capacities to overflow, so
    # ranks redo iterations together (the flag rides on the all_reduce)
    {"budget": 40, "seed": 6, "iters": 30, "loop": "static", "prune": False, "screen": "bf16"},
]


def _run_configs(store, d):
    out = []
    for cfg in CONFIGS:
        cfg = dict(cfg)
        budget, seed = cfg.pop("budget"), cfg.pop("seed")
        sel = ActiveFT(progress=False, **cfg).select(store, budget, seed=seed, dist=d)
        out.append({"ids": sel.ids.tolist(), "loss": sel.info["loss_curve"], "final": sel.info["final_loss"],
                    "world": sel.info["world"], "loop": sel.info["loop"], "redone": sel.info["loop_redone"]})
    return out


def _worker(rank, world, port, store_dir, bad_dir, out_dir):
    torch.set_num_threads(1)
    static_loop.MIN_CAP, static_loop.CAP_FACTOR = 1, 0.5
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        d = bdist.current()
        store = FeatureStore.open(store_dir)  # memmap: the selector reads only this rank's rows
        res = {"runs": _run_configs(store, d)}
        try:  # a NaN in rank 1's rows: every rank must raise the same error (no hang)
            ActiveFT(iters=3, progress=False).select(FeatureStore.open(bad_dir, validate=False), 10, seed=0, dist=d)
            res["bad"] = None
        except BenchError as exc:
            res["bad"] = str(exc)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(res))
    except BaseException:
        tdist.destroy_process_group()
        raise
    bdist.exit_process(0)  # what the CLIs do: no gloo thread left to abort at interpreter exit


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    x = load_digits().data.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    root = tmp_path_factory.mktemp("dstore")
    FeatureStore.from_array(x, meta={"dataset": "digits"}).save(root / "good")
    bad = x.copy()
    bad[1500, 3] = np.nan
    np.save(root / "bad.npy", bad)
    (root / "bad").mkdir()
    np.save(root / "bad" / "features.npy", bad)
    np.save(root / "bad" / "ids.npy", np.arange(len(bad)))
    return root


def test_two_gloo_ranks_equal_one_process(digits_store, tmp_path):
    torch.set_num_threads(1)
    one = _run_configs(FeatureStore.open(digits_store / "good"), bdist.Runtime())
    port = bdist.free_port()
    mp.spawn(_worker, args=(2, port, str(digits_store / "good"), str(digits_store / "bad"), str(tmp_path)),
             nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for cfg, a in zip(CONFIGS, one):
        for rk in ranks:
            b = rk["runs"][CONFIGS.index(cfg)]
            assert b["world"] == 2 and a["world"] == 1
            assert b["ids"] == a["ids"], f"ids differ for {cfg}"
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, atol=0)
            assert b["final"] == pytest.approx(a["final"], rel=1e-5)
            assert b["loop"] == a["loop"] == cfg.get("loop", "eager")
            if "loop" in cfg:
                assert b["redone"] > 0  # the forced overflows were redone on both ranks
    assert ranks[0]["bad"] and ranks[0]["bad"] == ranks[1]["bad"] and "NaN" in ranks[0]["bad"]
    assert "row 1500" in ranks[0]["bad"]


def test_select_cli_under_torchrun(digits_store, tmp_path):
    """``torchrun --nproc_per_node 2 -m bench_suite.cli.select``: rank 0 writes the file; same ids as 1 process."""
    torchrun = Path(sys.executable).with_name("torchrun")
    args = ["-m", "bench_suite.cli.select", "--features", str(digits_store / "good"), "--budget", "25",
            "--method", "activeft", "--set", "iters=30", "progress=false", "--seed", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(bdist.free_port()), *args,
           "--out", str(tmp_path / "two.json")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res1 = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert res1.returncode == 0, res1.stderr[-3000:]
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert two["info"]["world"] == 2 and one["info"]["world"] == 1
    assert two["ids"] == one["ids"]
    np.testing.assert_allclose(two["info"]["loss_curve"], one["info"]["loss_curve"], rtol=1e-5)
