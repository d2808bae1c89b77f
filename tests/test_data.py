"""Datasets and shards: real files in the real on-disk formats, written and read back."""

import numpy as np
import pytest

from bench_suite.data import shards as ws
from bench_suite.data.registry import get_dataset
from bench_suite.errors import CorruptDataError, MissingDataError, UnknownNameError
from official_formats import write_ade20k, write_cifar, write_imagenet


def test_digits_shards_roundtrip(digits_shards):
    manifest = ws.load_manifest(digits_shards)
    assert manifest["count"] == 1297 and len(manifest["shards"]) == 3
    assert sum(manifest["label_counts"]) == 1297
    ids, imgs, labels = ws.read_all(digits_shards)
    raw = get_dataset("digits").load("train")
    assert np.array_equal(ids, np.arange(1297))
    assert np.array_equal(imgs, raw.images) and np.array_equal(labels, raw.labels)


def test_subset_keeps_global_ids(tmp_path):
    m = ws.write_shards("digits", "train", tmp_path / "s", limit=100, subset_seed=3, shard_size=40)
    ids, imgs, labels = ws.read_all(tmp_path / "s")
    raw = get_dataset("digits").load("train")
    assert m["count"] == 100 and len(m["shards"]) == 3
    assert np.array_equal(ids, ws.subset_indices(1297, 100, 3))
    assert np.array_equal(imgs, raw.images[ids]) and np.array_equal(labels, raw.labels[ids])
    # a different subset seed picks different samples
    assert not np.array_equal(ids, ws.subset_indices(1297, 100, 4))


def test_rank_shards_round_robin(digits_shards):
    m = ws.load_manifest(digits_shards)
    r0, r1 = ws.rank_shards(m, 0, 2), ws.rank_shards(m, 1, 2)
    assert r0 == ["shard-000000.tar", "shard-000002.tar"] and r1 == ["shard-000001.tar"]
    assert ws.rank_shards(m, 3, 4) == []  # more ranks than shards: an idle rank, no error


def test_more_workers_than_shards(digits_shards):
    got = [b[0] for b in ws.iter_samples(digits_shards, ["shard-000001.tar"], num_workers=2, batch_size=64)]
    ids = np.sort(np.concatenate(got))
    assert np.array_equal(ids, np.arange(500, 1000))


def test_corrupt_shard_is_detected(tmp_path):
    ws.write_shards("digits", "test", tmp_path / "s", shard_size=200)
    shard = tmp_path / "s" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000:2600] = b"\x00" * 600
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="sha256"):
        ws.verify_shards(tmp_path / "s")
    shard.write_bytes(bytes(data[:3000]))  # truncated mid-member
    with pytest.raises(CorruptDataError, match=r"(reading shards in .* failed|sample 000000200 has no png/jpg image)"):
        list(ws.iter_samples(tmp_path / "s", ["shard-000001.tar"]))


def test_missing_inputs_have_clear_errors(tmp_path):
    with pytest.raises(MissingDataError, match="manifest.json"):
        ws.load_manifest(tmp_path)
    with pytest.raises(UnknownNameError, match="known: .*fashion_mnist"):
        get_dataset("nope")
    with pytest.raises(MissingDataError, match="--source"):
        get_dataset("cifar10").load("train")
    with pytest.raises(MissingDataError, match="apt-get install dataset-fashion-mnist"):
        get_dataset("fashion_mnist").load("train", tmp_path)


@pytest.mark.parametrize("fine", [False, True])
def test_cifar_tarball_fixture(tmp_path, fine):
    members = write_cifar(tmp_path / "c.tar.gz", fine)
    name = "cifar100" if fine else "cifar10"
    out = tmp_path / "shards"
    m = ws.write_shards(name, "train", out, source=tmp_path / "c.tar.gz", shard_size=7)
    ids, imgs, labels = ws.read_all(out)
    first = members["train" if fine else "data_batch_1"]
    assert imgs.shape[1:] == (32, 32, 3)
    # CIFAR rows are channel-major: R plane, G plane, B plane
    assert np.array_equal(imgs[0], first[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert labels[0] == first[b"fine_labels" if fine else b"labels"][0]
    assert m["count"] == (6 if fine else 30) and m["num_classes"] == (100 if fine else 10)


def test_imagefolder_fixture(tmp_path):
    write_imagenet(tmp_path, classes=("n01", "n02"), n_train=3, n_val=3)
    m = ws.write_shards("imagenet", "train", tmp_path / "s", source=tmp_path, shard_size=4)
    ids, imgs, labels = ws.read_all(tmp_path / "s")
    assert m["classes"] == ["n01", "n02"] and m["count"] == 6
    assert imgs.shape == (6, 20, 24, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_offline_datasets_installed(name):
    raw = get_dataset(name).load("test")
    assert raw.images.shape == (10000, 28, 28) and raw.images.dtype == np.uint8
    counts = np.bincount(raw.labels)
    assert len(counts) == 10 and counts.sum() == 10000 and counts.min() > 800


def test_ade20k_shards_follow_mmseg_conventions(tmp_path):
    from bench_suite.data.shards import read_all, write_shards
    from bench_suite.errors import MissingDataError

    src = write_ade20k(tmp_path / "ADEChallengeData2016")
    manifest = write_shards("ade20k", "train", tmp_path / "shards", source=tmp_path, shard_size=2)
    assert manifest["count"] == 5 and manifest["num_classes"] == 150 and manifest["task"] == "seg"
    ids, images, labels, masks = read_all(tmp_path / "shards")
    assert ids.tolist() == [0, 1, 2, 3, 4] and (labels == 0).all() and images[0].shape == (24, 32, 3)
    # id i = the i-th file name in sorted order (ADE_train_00000001 -> id 0, whose annotation is all 1s)
    for i in range(5):
        assert masks[i][5, 5] == i  # class i + 1 -> i (reduce_zero_label)
        assert masks[i][0, 0] == 255 and masks[i][0, 1] == 149  # 0 ("other") -> ignore; 150 -> 149
    val = write_shards("ade20k", "test", tmp_path / "val", source=src)
    assert val["count"] == 2
    (src / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    with pytest.raises(MissingDataError, match="annotation"):
        write_shards("ade20k", "train", tmp_path / "bad", source=src)
    with pytest.raises(MissingDataError, match="--source"):
        write_shards("ade20k", "train", tmp_path / "none")
