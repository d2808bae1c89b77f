"""Torch's CPU threads under ``accelerate launch``: it exports OMP_NUM_THREADS=1, which halved a laptop."""

import os
import subprocess
import sys

import pytest
import torch

from bench_suite.runtime import use_the_cpu_cores
from launching import run_launch


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_rule(monkeypatch, restore_threads):
    if torch.cuda.is_available():
        pytest.skip("the rule applies on machines without a GPU")
    monkeypatch.delenv("BENCH_SUITE_THREADS", raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch exports
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    torch.set_num_threads(1)
    assert use_the_cpu_cores() == torch.get_num_threads() == max(1, os.cpu_count())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10 ** 4))  # more local processes than cores: one each
    assert use_the_cpu_cores() == torch.get_num_threads() == 1
    monkeypatch.setenv("BENCH_SUITE_THREADS", "0")  # leave torch's setting
    torch.set_num_threads(1)
    assert use_the_cpu_cores() == 0 and torch.get_num_threads() == 1
    monkeypatch.delenv("BENCH_SUITE_THREADS")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # not under accelerate: OMP_NUM_THREADS is the user's
    assert use_the_cpu_cores() == 0 and torch.get_num_threads() == 1


def test_accelerate_launch_gets_the_cores(tmp_path):
    """The real launcher: the shipped config's two processes share the machine's cores, a one-process launch
    gets them all, BENCH_SUITE_THREADS wins."""
    if torch.cuda.is_available():
        pytest.skip("the rule applies on machines without a GPU")
    script = tmp_path / "threads.py"
    script.write_text("import torch\nfrom bench_suite.runtime import exit_process, make_accelerator\n"
                      "make_accelerator()\nprint('THREADS', torch.get_num_threads())\n"
                      "exit_process(0)\n")  # as our CLIs end: a plain exit after gloo can abort (runtime.exit_process)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate.yaml"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("BENCH_SUITE_THREADS", "OMP_NUM_THREADS")}
    out = run_launch(lambda port: [*accelerate, "--main_process_port", str(port), str(script)], cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split().count(f"{max(1, os.cpu_count() // 2)}") == 2, out.stdout  # two processes
    one = [*accelerate, "--num_processes", "1", str(script)]
    out = subprocess.run(one, cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"THREADS {os.cpu_count()}" in out.stdout
    env["BENCH_SUITE_THREADS"] = "1"
    out = subprocess.run(one, cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "THREADS 1" in out.stdout


def test_each_pytest_xdist_worker_runs_torch_on_one_thread():
    """Two workers on 2 cores (pyproject addopts): one thread each. The controller's import of conftest.py
    once leaked OMP_NUM_THREADS=2 into every worker: 4 busy threads on 2 cores, the suite 20 minutes."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("runs under pytest-xdist workers (the README's test command)")
    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
