"""FeatureStore: validation of bad input, atomic save, memmap slices."""

import json
import os

import numpy as np
import pytest

from bench_suite.errors import BadInputError, MissingDataError
from bench_suite.store import FeatureStore


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_roundtrip_and_slices(tmp_path):
    feats = unit(50, 8)
    store = FeatureStore.from_array(feats, ids=np.arange(50) * 2 + 7, labels=np.arange(50) % 3, meta={"x": 1})
    store.save(tmp_path / "s")
    back = FeatureStore.open(tmp_path / "s")
    assert np.array_equal(np.asarray(back.features), feats) and back.meta["x"] == 1
    assert back.meta["checksum"] == store.checksum()
    part = FeatureStore.open(tmp_path / "s", rows=slice(10, 20))
    assert len(part) == 10 and part.row_offset == 10 and part.total_rows == 50
    assert np.array_equal(part.ids, np.arange(10, 20) * 2 + 7)
    assert back.rows_of_ids([27, 7]).tolist() == [10, 0]
    with pytest.raises(BadInputError, match="not in the feature store"):
        back.rows_of_ids([8])


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.__setitem__((3, 1), np.nan), "NaN/Inf"),
    (lambda f: f.__setitem__(4, 0.0), "zero-norm"),
])
def test_bad_rows_rejected(mutate, message):
    feats = unit(20, 4)
    mutate(feats)
    with pytest.raises(BadInputError, match=message):
        FeatureStore.from_array(feats)


def test_unnormalised_rows(caplog):
    feats = unit(20, 4) * 3
    with pytest.raises(BadInputError, match="not L2-normalised"):
        FeatureStore.from_array(feats)
    store = FeatureStore.from_array(feats, normalize=True)
    assert np.allclose(np.linalg.norm(store.features, axis=1), 1, atol=1e-6)


def test_shapes_and_missing(tmp_path):
    with pytest.raises(BadInputError, match="2-D"):
        FeatureStore.from_array(np.zeros(5, np.float32))
    with pytest.raises(BadInputError, match="empty"):
        FeatureStore.from_array(np.zeros((0, 3), np.float32))
    with pytest.raises(BadInputError, match="ids have shape"):
        FeatureStore.from_array(unit(5, 3), ids=np.arange(4))
    with pytest.raises(MissingDataError, match="not found"):
        FeatureStore.open(tmp_path / "nope")


def test_npy_input_is_normalised_with_warning(tmp_path):
    np.save(tmp_path / "f.npy", unit(10, 3) * 2)
    store = FeatureStore.open(tmp_path / "f.npy")
    assert np.allclose(np.linalg.norm(store.features, axis=1), 1, atol=1e-6)


def test_a_dead_writers_temporaries_are_swept_by_the_next_write(tmp_path):
    """A writer killed mid-write leaves ``.<name>.tmp.<pid>.<host>.*``; the next write of that path removes it
    when its process is gone, and never touches a live writer's."""
    import socket
    import subprocess

    from bench_suite import atomic

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    target = tmp_path / "report.json"
    dead_file = tmp_path / f".report.json.tmp.{dead.pid}.{host}.abc123.tmp"
    dead_dir = tmp_path / f".report.json.tmp.{dead.pid}.{host}.def456"
    live_file = tmp_path / f".report.json.tmp.{os.getpid()}.{host}.ghi789.tmp"
    other_host = tmp_path / f".report.json.tmp.{dead.pid}.elsewhere.jkl012.tmp"
    dead_file.write_text("half")
    dead_dir.mkdir()
    live_file.write_text("in progress")
    other_host.write_text("another node's")
    atomic.write_json(target, {"ok": 1})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert not dead_file.exists() and not dead_dir.exists()
    assert live_file.exists() and other_host.exists()


def test_streaming_write_is_byte_identical_to_save(tmp_path, monkeypatch):
    """``write_streaming`` (feature extraction's writer, block by block) writes the files ``save`` writes,
    with the same checksum; the checksum read in small blocks equals the one-shot one."""
    from bench_suite import store as store_mod

    feats, ids, labels = unit(37, 5, seed=3), np.arange(37) * 3, np.arange(37) % 4
    FeatureStore(feats, ids, labels, {"x": 1}).save(tmp_path / "saved")
    blocks = (feats[i:i + 8] for i in range(0, 37, 8))
    FeatureStore.write_streaming(tmp_path / "streamed", blocks, 37, 5, ids, labels, {"x": 1})
    for name in ("features.npy", "ids.npy", "labels.npy", "meta.json"):
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name
    monkeypatch.setattr(store_mod, "BLOCK_BYTES", 3 * 5 * 4)  # 3 rows a block
    assert FeatureStore.open(tmp_path / "streamed").checksum() == json.loads(
        (tmp_path / "saved" / "meta.json").read_text())["checksum"]


def test_shard_folder_survives_moving_the_work_folder(tmp_path):
    """The store records its shard folder relative to itself too: after the work folder moves, ``meta["shards"]``
    points at the moved shards; a store that records only an absolute path (made before) opens as it was."""
    import shutil

    from bench_suite.store import shards_meta

    work = tmp_path / "work"
    (work / "shards" / "pool").mkdir(parents=True)
    FeatureStore.from_array(unit(4, 3), meta=shards_meta(work / "shards" / "pool", work / "features" / "s")).save(
        work / "features" / "s")
    assert FeatureStore.open(work / "features" / "s").meta["shards"] == str((work / "shards" / "pool").resolve())
    shutil.move(work, tmp_path / "moved")
    meta = FeatureStore.open(tmp_path / "moved" / "features" / "s").meta
    assert meta["shards"] == str((tmp_path / "moved" / "shards" / "pool").resolve())
    FeatureStore.from_array(unit(4, 3), meta={"shards": "/old/place"}).save(tmp_path / "old")
    assert FeatureStore.open(tmp_path / "old").meta["shards"] == "/old/place"
