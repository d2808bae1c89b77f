import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """The scikit-learn digits train split as real WebDataset shards (3 shards)."""
    from bench_suite.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits") / "train"
    write_shards("digits", "train", out, shard_size=500)
    return out


@pytest.fixture(scope="session")
def digits_test_shards(tmp_path_factory):
    from bench_suite.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits") / "test"
    write_shards("digits", "test", out, shard_size=500)
    return out
