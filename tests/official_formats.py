"""Tiny copies of the paper's datasets in their official on-disk formats (real files, random pixels): the
CIFAR python-version tarballs, an ImageNet ImageFolder tree, ADEChallengeData2016. Used by the converter
tests and the paper profile's end-to-end run."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np


def write_cifar(path: Path, fine: bool, n_per_batch: int = 6) -> dict:
    """cifar-10-python.tar.gz (5 train batches + test_batch of ``n_per_batch`` each) or cifar-100-python.tar.gz
    (train and test of ``n_per_batch`` each); returns the pickled members."""
    rng = np.random.default_rng(0)
    top = "cifar-100-python" if fine else "cifar-10-python"
    members = {}
    if fine:
        for split in ("train", "test"):
            members[split] = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                              b"fine_labels": list(rng.integers(0, 100, n_per_batch))}
        members["meta"] = {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}
    else:
        for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            members[b] = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                          b"labels": list(rng.integers(0, 10, n_per_batch))}
        members["batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return members


def write_imagenet(root: Path, classes=("n01", "n02"), n_train: int = 3, n_val: int = 3, size=(20, 24)) -> Path:
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.JPEG")
    return root


def write_ade20k(root: Path, n_train: int = 5, n_val: int = 2, size=(24, 32)) -> Path:
    """A tiny ADEChallengeData2016 tree in the official layout (real JPEG/PNG files, class-index annotations:
    image i is all class i, with one unlabelled (0) and one class-150 pixel)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n, 0, -1):  # written in reverse: ids must follow the sorted file names
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / split / f"{stem}.jpg")
            ann = np.full(size, min(i, 150), dtype=np.uint8)
            ann[0, 0], ann[0, 1] = 0, 150
            Image.fromarray(ann).save(root / "annotations" / split / f"{stem}.png")
    return root
