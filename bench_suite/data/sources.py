"""Readers for on-disk dataset formats: IDX (MNIST family), CIFAR python pickles, ImageFolder.

Each reader returns ``(images, labels, classes)`` with images as uint8 arrays (N,H,W) or (N,H,W,3), or
for ImageFolder a list of file paths (decoded lazily; ImageNet does not fit in memory).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from bench_suite.errors import CorruptDataError, MissingDataError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG"}


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally .gz): the MNIST/Fashion-MNIST on-disk format."""
    if not path.exists():
        raise MissingDataError(f"IDX file not found: {path}")
    try:
        with _open_maybe_gz(path) as fh:
            data = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise CorruptDataError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(shape)):
            raise CorruptDataError(f"{path}: truncated IDX file ({arr.size} of {int(np.prod(shape))} bytes)")
        return arr.reshape(shape)
    except (OSError, EOFError, struct.error) as exc:
        raise CorruptDataError(f"{path}: cannot read IDX file: {exc}") from exc


def read_idx_split(root: Path, split: str):
    prefix = "train" if split == "train" else "t10k"
    def find(stem):
        for cand in (root / f"{stem}.gz", root / stem):
            if cand.exists():
                return cand
        raise MissingDataError(f"{root}: missing {stem}(.gz)")
    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise CorruptDataError(f"{root}: {len(images)} images but {len(labels)} labels in split {split}")
    return images, labels


def read_cifar(source: Path, split: str, fine: bool):
    """CIFAR-10/100 'python version': the .tar.gz as downloaded, or its extracted folder."""
    if not source.exists():
        raise MissingDataError(f"CIFAR source not found: {source} (give the python-version .tar.gz or its folder)")
    if fine:
        members = ["train"] if split == "train" else ["test"]
        meta_name, label_key, names_key = "meta", b"fine_labels", b"fine_label_names"
    else:
        members = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_name, label_key, names_key = "batches.meta", b"labels", b"label_names"

    def load(blob: bytes):
        return pickle.loads(blob, encoding="bytes")

    blobs = {}
    try:
        if source.is_file():
            with tarfile.open(source, "r:*") as tar:
                for m in tar.getmembers():
                    base = Path(m.name).name
                    if base in members or base == meta_name:
                        blobs[base] = tar.extractfile(m).read()
        else:
            for base in members + [meta_name]:
                hits = list(source.rglob(base))
                if hits:
                    blobs[base] = hits[0].read_bytes()
    except (tarfile.TarError, OSError) as exc:
        raise CorruptDataError(f"{source}: cannot read CIFAR archive: {exc}") from exc
    missing = [b for b in members + [meta_name] if b not in blobs]
    if missing:
        raise MissingDataError(f"{source}: CIFAR files missing: {', '.join(missing)}")
    images, labels = [], []
    for base in members:
        d = load(blobs[base])
        images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    classes = [c.decode() for c in load(blobs[meta_name])[names_key]]
    return np.concatenate(images), np.concatenate(labels), classes


def read_image_folder(root: Path):
    """ImageFolder: root/<class>/<image>; classes sorted by name, files sorted by path."""
    if not root.is_dir():
        raise MissingDataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise MissingDataError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    paths, labels = [], []
    for ci, cname in enumerate(classes):
        for f in sorted((root / cname).rglob("*")):
            if f.suffix in IMAGE_EXTS or f.suffix.lower() in IMAGE_EXTS:
                paths.append(f)
                labels.append(ci)
    if not paths:
        raise MissingDataError(f"{root}: no images found")
    return paths, np.asarray(labels, dtype=np.int64), classes


EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 = upright, 2-8 = mirrored and/or turned


def decode_image(blob_or_path, *, orient: bool = False, reduce_to: int | None = None) -> np.ndarray:
    """uint8 (H,W) gray or (H,W,3) RGB. ``orient``: turn the image upright as its EXIF orientation says (phone
    photos are stored sideways with a tag; a viewer, and so the annotator, shows them upright). Datasets are
    decoded as stored (``orient`` False), as the paper's loaders did; folders of photos are oriented.
    ``reduce_to``: a JPEG is decoded at the smallest of 1/2, 1/4 and 1/8 scale that keeps both sides at least
    this long (PIL's draft mode: libjpeg scales in the DCT domain; other formats are decoded whole)."""
    from PIL import Image, ImageOps

    src = io.BytesIO(blob_or_path) if isinstance(blob_or_path, (bytes, bytearray)) else blob_or_path
    with Image.open(src) as im:
        if reduce_to:
            im.draft(None, (reduce_to, reduce_to))
        if orient and _turned(im):
            im = ImageOps.exif_transpose(im)
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        return np.asarray(im)


def _turned(im) -> bool:
    """Whether an opened image's EXIF orientation asks to mirror or turn it: 2-8, as ``ImageOps.exif_transpose``
    reads it (a malformed value is ignored there, so here too)."""
    return im.getexif().get(EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8)


def is_turned(blob: bytes) -> bool:
    """``_turned`` of an encoded image, from its header (``decode_image(orient=True)`` turns exactly these)."""
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        return _turned(im)
