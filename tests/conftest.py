import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Two pytest-xdist workers share the 2 cores (pyproject addopts: -n 2): one thread each; alone (-n 0), two.
# A worker sets it outright: it inherits the environment of the controller, whose own import of this file
# has already set OMP_NUM_THREADS=2 (with setdefault, every worker ran torch on 2 threads: 4 on 2 cores, and
# the in-process runs took up to 3.7x their time alone).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    # ... and the runs the tests launch (accelerate launch would otherwise give each one every core: runtime.py)
    os.environ.setdefault("BENCH_SUITE_THREADS", "1")
    if "torch" in sys.modules:  # imported by a plugin before this file: the variable came too late
        sys.modules["torch"].set_num_threads(1)
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")

# The longest test files first (pyproject addopts: --dist loadfile --no-loadscope-reorder hands out whole files in
# this order), so the two workers start on them and the many short files fill the end. In xdist's default order
# (most tests first) the files of a few long tests came last and one worker ran them alone for ~7 minutes.
# Order of the minutes per file on one worker, measured with --durations=0 (a loaded 2-core machine, Dec 2026).
LONGEST_FIRST = [
    "test_interruption.py",  # six table runs, each killed and resumed in one stage
    "test_table1_e2e.py",
    "test_tables_grid.py",
    "test_finetune_real.py",
    "test_registries.py",  # every selector's contract, VAAL / TA-VAAL / ALFA-Mix / LearnLoss included
    "test_slurm.py",
    "test_paper_e2e.py",
    "test_baselines_al.py",
    "test_finetune.py",
    "test_baselines_labelfree.py",
    "test_finetune_mmseg.py",
]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small-tensor tests (faster there, and immune to a busy machine); the
    count is restored after the module. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_torch_thread_per_worker():
    """Under xdist, put torch back on one thread after any test that changed it (an in-process table run sets
    the process's share of the cores, 2 here): the next tests of that worker would run 4 threads on 2 cores."""
    yield
    torch = sys.modules.get("torch")
    if os.environ.get("PYTEST_XDIST_WORKER") and torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """The scikit-learn digits train split as real WebDataset shards (3 shards)."""
    from bench_suite.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits") / "train"
    write_shards("digits", "train", out, shard_size=500)
    return out


@pytest.fixture(scope="session")
def digits_store(digits_shards):
    """The digits train shards as a FeatureStore: the 64 pixel values per image, L2-normalised, with labels."""
    import numpy as np

    from bench_suite.data.shards import read_all
    from bench_suite.store import FeatureStore

    ids, images, labels = read_all(digits_shards)
    feats = images.reshape(len(ids), -1).astype(np.float32)
    return FeatureStore.from_array(feats, ids=ids, labels=labels,
                                   meta={"shards": str(digits_shards), "num_classes": 10}, normalize=True)


@pytest.fixture(scope="session")
def digits_test_shards(tmp_path_factory):
    from bench_suite.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits") / "test"
    write_shards("digits", "test", out, shard_size=500)
    return out


@pytest.fixture(scope="session")
def digits_pixel_store(digits_shards):
    """The digits train split as a FeatureStore of its 64 pixel values per image (L2-normalised), with the
    shard folder in its meta (the VAE methods read the images from there)."""
    import numpy as np

    from bench_suite.data.shards import read_all
    from bench_suite.store import FeatureStore

    ids, images, labels, *_ = read_all(digits_shards)
    feats = images.reshape(len(images), -1).astype(np.float32)
    return FeatureStore.from_array(feats, ids=ids, labels=labels, normalize=True,
                                   meta={"shards": str(digits_shards), "num_classes": 10})


@pytest.fixture
def cli_error(capsys, monkeypatch):
    """Call a command line's ``main`` in this process (the same ``main_guard`` that ``python -m`` runs; one
    subprocess case per command line covers the real entry point) and expect exit status 2 with one
    ``error: ...`` line on stderr, which it returns. In-process because each subprocess costs ~4-9 s of imports."""

    def call(main, argv, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2, err[-2000:]
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    return call
