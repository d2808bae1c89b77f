"""FeatureStore: L2-normalised float32 features (memmap), stable global ids, labels kept apart.

On disk a store is one folder: ``features.npy`` (N x d float32), ``ids.npy`` (N int64, the shard order),
``labels.npy`` (N int64, -1 where unknown) and ``meta.json`` (dataset, split, encoder, pooling, dim,
checksum). Selectors that are label-free never look at ``labels``; active-learning methods get labels only
through an oracle. A rank can open just its slice of rows (``rows=``) without reading the rest.

``write_streaming`` writes a store from blocks of rows without ever holding the N x d array (feature
extraction streams it shard by shard); its files are byte-identical to ``save``'s. The checksum is computed
in blocks too, so opening a memmapped store of any size reads it once and never copies it whole.

The shard folder a store came from (``meta["shards"]``, read by the finetuning recipes and the VAE
baselines) is recorded as an absolute path and as ``shards_relative`` (relative to the store folder); on
open, the relative one wins when it exists, so a work folder moved or copied elsewhere keeps working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench_suite import atomic
from bench_suite.errors import BadInputError, CorruptDataError, MissingDataError

log = logging.getLogger(__name__)

NORM_TOL = 1e-3
BLOCK_BYTES = 32 << 20  # rows are read and written in blocks of about this many bytes


@dataclass
class FeatureStore:
    features: np.ndarray  # (N, d) float32, rows L2-normalised
    ids: np.ndarray  # (N,) int64 global sample ids
    labels: np.ndarray | None = None  # (N,) int64 or None
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    row_offset: int = 0  # first row of this slice within the full store
    total_rows: int | None = None  # N of the full store (a slice knows how big the whole is)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if self.total_rows is None:
            self.total_rows = len(self.ids)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_array(cls, features, ids=None, labels=None, meta=None, *, normalize: bool = False) -> "FeatureStore":
        """Wrap an in-memory array; validates it (``normalize=True`` renormalises rows with a warning)."""
        feats = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
        if feats.ndim != 2:
            raise BadInputError(f"features must be a 2-D array (N x d), got shape {feats.shape}")
        n = feats.shape[0]
        ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if ids.shape != (n,):
            raise BadInputError(f"ids have shape {ids.shape} but features have {n} rows")
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (n,):
                raise BadInputError(f"labels have shape {labels.shape} but features have {n} rows")
        store = cls(feats, ids, labels, dict(meta or {}))
        store.validate(normalize=normalize)
        return store

    @classmethod
    def open(cls, path, *, rows: slice | None = None, mmap: bool = True, validate: bool = True) -> "FeatureStore":
        """Open a store folder (or a bare ``.npy`` of features, ids = row index)."""
        path = Path(path)
        if not path.exists():
            raise MissingDataError(f"feature store not found: {path}")
        if path.is_file():
            if path.suffix != ".npy":
                raise BadInputError(f"features file must be a .npy or a store folder: {path}")
            try:
                feats = np.load(path, mmap_mode="r" if mmap else None)
            except (ValueError, OSError) as exc:
                raise BadInputError(f"{path} is not a numeric .npy array ({exc}); --features takes an N x d float "
                                    "array or a feature store folder") from exc
            if feats.ndim != 2:
                raise BadInputError(f"{path}: features must be 2-D (N x d), got shape {feats.shape}")
            if not np.issubdtype(feats.dtype, np.floating):
                raise BadInputError(f"{path}: features must be floating point (N x d float32), got {feats.dtype}")
            n = feats.shape[0]
            sl = rows or slice(0, n)
            store = cls(np.asarray(feats[sl], dtype=np.float32), np.arange(n)[sl], None, {"source": str(path)},
                        path=path, row_offset=sl.start or 0, total_rows=n)
            if validate:
                store.validate(normalize=True)
            return store
        fpath = path / "features.npy"
        if not fpath.exists():
            raise MissingDataError(f"feature store {path} has no features.npy (re-run feature extraction)")
        try:
            meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
            feats = np.load(fpath, mmap_mode="r" if mmap else None)
            ids = np.load(path / "ids.npy", mmap_mode="r")
            labels = np.load(path / "labels.npy", mmap_mode="r") if (path / "labels.npy").exists() else None
        except (ValueError, OSError, json.JSONDecodeError) as exc:
            raise CorruptDataError(f"feature store {path} is damaged: {exc}") from exc
        resolve_shards(meta, path)
        if feats.ndim != 2 or ids.shape != (feats.shape[0],) or feats.dtype != np.float32:
            raise CorruptDataError(f"feature store {path}: features {feats.shape} {feats.dtype} and ids {ids.shape} "
                                   "do not make an N x d float32 store (re-run feature extraction)")
        n = feats.shape[0]
        sl = rows or slice(0, n)
        store = cls(
            np.asarray(feats[sl], dtype=np.float32) if not mmap or rows is not None else feats,
            np.asarray(ids[sl]),
            None if labels is None else np.asarray(labels[sl]),
            meta,
            path=path,
            row_offset=sl.start or 0,
            total_rows=n,
        )
        if validate:
            store.validate(normalize=False)
            if rows is None and meta.get("checksum") and store.checksum() != meta["checksum"]:
                raise CorruptDataError(f"feature store {path}: its content does not match the checksum in meta.json "
                                       "(damaged or edited); re-run feature extraction with --force")
        return store

    def save(self, path) -> Path:
        """Write the store folder atomically (the whole folder appears at once)."""
        path = Path(path)
        meta = dict(self.meta)
        meta.update(n=int(len(self)), dim=int(self.dim), checksum=self.checksum())
        with atomic.atomic_dir(path) as tmp:
            np.save(tmp / "features.npy", np.ascontiguousarray(self.features, dtype=np.float32))
            np.save(tmp / "ids.npy", self.ids.astype(np.int64))
            if self.labels is not None:
                np.save(tmp / "labels.npy", np.asarray(self.labels, dtype=np.int64))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        self.meta, self.path = meta, path
        return path

    @staticmethod
    def write_streaming(path, blocks, n: int, dim: int, ids, labels, meta: dict) -> Path:
        """Write a store folder atomically from ``blocks`` (an iterable of float32 row blocks, in row order,
        ``n`` rows of ``dim`` in all): features.npy is written block by block (never held whole, never
        memory-mapped), with the same bytes ``save`` writes, and the checksum is computed as it goes."""
        path = Path(path)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != (n,):
            raise BadInputError(f"write_streaming: {ids.shape} ids for {n} rows")
        h = hashlib.sha256()
        written = 0
        with atomic.atomic_dir(path) as tmp:
            with open(tmp / "features.npy", "wb") as fh:
                np.lib.format.write_array_header_1_0(
                    fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                         "shape": (int(n), int(dim))})
                for block in blocks:
                    block = np.ascontiguousarray(block, dtype=np.float32)
                    if block.ndim != 2 or block.shape[1] != dim:
                        raise BadInputError(f"write_streaming: a block of shape {block.shape}, expected (k, {dim})")
                    data = block.tobytes()
                    h.update(data)
                    fh.write(data)
                    written += len(block)
            if written != n:
                raise CorruptDataError(f"write_streaming: {written} rows written, {n} expected")
            h.update(ids.tobytes())
            np.save(tmp / "ids.npy", ids)
            if labels is not None:
                np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
            meta = dict(meta)
            meta.update(n=int(n), dim=int(dim), checksum=h.hexdigest()[:16])
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def checksum(self) -> str:
        """sha256 of the features' float32 bytes then the ids' int64 bytes (first 16 hex digits), read in
        blocks: a memmapped store is never copied whole."""
        h = hashlib.sha256()
        rows, src = max(1, BLOCK_BYTES // max(1, 4 * self.dim)), self._rows()
        for start in range(0, len(self), rows):
            h.update(np.ascontiguousarray(src[start:start + rows], dtype=np.float32).tobytes())
        h.update(self.ids.astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def _rows(self):
        """What to read the rows from in blocks: the file itself when the features are a memmap of a whole
        store (plain reads: pages read for a check never pile up in this process's memory), else the array."""
        f = self.features
        if isinstance(f, np.memmap) and getattr(f, "filename", None) and len(f) == self.total_rows:
            return FileRows(f.filename, f.offset, f.shape)
        return f

    def validate(self, *, normalize: bool = False) -> None:
        """Reject empty, non-finite or zero rows; check (or enforce) unit norm."""
        n = len(self)
        if n == 0:
            raise BadInputError("feature store is empty (N = 0)")
        if len(np.unique(self.ids)) != n:
            raise BadInputError("feature store ids are not unique")
        rows = self._rows()
        checked, n_off = check_rows(rows, normalize=normalize, block=max(1, BLOCK_BYTES // max(1, 4 * self.dim)))
        if checked is not rows:
            self.features = checked
        if n_off:
            log.warning("features were not L2-normalised (%d rows); normalising them", n_off)

    def take(self, rows) -> np.ndarray:
        return np.asarray(self.features[rows], dtype=np.float32)

    def rows_of_ids(self, ids) -> np.ndarray:
        """Row positions of the given global ids (error if any id is not in this store)."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        pos = np.searchsorted(self.ids[order], ids)
        pos = np.clip(pos, 0, len(order) - 1)
        found = self.ids[order][pos] == ids
        if not found.all():
            missing = ids[~found][:5].tolist()
            raise BadInputError(f"ids not in the feature store: {missing}{' ...' if (~found).sum() > 5 else ''}")
        return order[pos]


class FileRows:
    """Read-only row blocks of a C-ordered float32 .npy file by plain reads (``rows[a:b]``), never mapped."""

    def __init__(self, filename, offset: int, shape):
        self.filename, self.offset, self.shape = str(filename), int(offset), tuple(shape)
        self.ndim, self.dtype = 2, np.dtype(np.float32)

    @classmethod
    def of_npy(cls, path) -> "FileRows":
        mm = np.load(path, mmap_mode="r")
        if mm.dtype != np.float32 or mm.ndim != 2 or not mm.flags.c_contiguous:
            raise CorruptDataError(f"{path}: not a C-ordered N x d float32 array")
        return cls(path, mm.offset, mm.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl):
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("FileRows takes a contiguous slice of rows")
        start, stop, _ = sl.indices(self.shape[0])
        count = max(0, stop - start) * self.shape[1]
        with open(self.filename, "rb") as fh:
            fh.seek(self.offset + start * self.shape[1] * 4)
            out = np.fromfile(fh, dtype=np.float32, count=count)
        if out.size != count:
            raise CorruptDataError(f"{self.filename}: truncated ({out.size} of {count} values)")
        return out.reshape(-1, self.shape[1])


def shards_meta(shard_dir, store_dir) -> dict:
    """What a store's meta records of its shard folder: the absolute path, and the path relative to the
    store folder (which survives moving or copying the work folder that holds both)."""
    shard_dir, store_dir = Path(shard_dir).resolve(), Path(store_dir).resolve()
    return {"shards": str(shard_dir), "shards_relative": os.path.relpath(shard_dir, store_dir)}


def resolve_shards(meta: dict, store_dir) -> None:
    """Point ``meta["shards"]`` at the shard folder as seen from where the store is now: the relative path
    when it leads to a folder (the work folder was moved or copied), else the recorded absolute path."""
    rel = meta.get("shards_relative")
    if not rel:
        return
    here = Path(os.path.normpath(Path(store_dir).resolve() / rel))
    if here.is_dir():
        meta["shards"] = str(here)


def check_rows(features, *, normalize: bool, first_row: int = 0, block: int = 65536) -> tuple[np.ndarray, int]:
    """The one check of feature rows (the store's, and a distributed selector's on its slice of the pool).

    ``features`` (an N x d array or memmap) is read in blocks of ``block`` rows. A NaN/Inf or zero-norm row
    is a BadInputError naming the first one, rows numbered from ``first_row`` (a rank checking its slice
    names global rows). Rows whose norm is off 1 by more than ``NORM_TOL`` are an error too, or with
    ``normalize=True`` every row is divided by its norm. Returns (``features`` itself when nothing changed,
    else a normalised float32 copy; the number of rows that were off). The caller logs any warning.
    """
    n = int(features.shape[0])
    norms = np.empty(n, dtype=np.float64)
    for start in range(0, n, block):
        part = np.asarray(features[start:start + block], dtype=np.float32)
        # squared norms accumulated in float64 without a float64 copy of the block (10x faster than
        # np.linalg.norm(part.astype(float64)): 22 vs 210 ms on 50k x 384, 2 cores); a NaN/Inf anywhere in a
        # row makes its sum non-finite (a float32 value squared cannot overflow float64)
        sq = np.einsum("ij,ij->i", part, part, dtype=np.float64)
        finite = np.isfinite(sq)
        if not finite.all():
            first = first_row + start + int(np.flatnonzero(~finite)[0])
            raise BadInputError(f"features contain NaN/Inf (first at row {first})")
        norms[start:start + len(part)] = np.sqrt(sq)
    zero = norms < 1e-12
    if zero.any():
        raise BadInputError(f"features contain {int(zero.sum())} zero-norm rows "
                            f"(first at row {first_row + int(np.flatnonzero(zero)[0])})")
    n_off = int((np.abs(norms - 1.0) > NORM_TOL).sum())
    if not n_off:
        return features, 0
    if not normalize:
        raise BadInputError(
            f"features are not L2-normalised ({n_off} rows off by > {NORM_TOL}); "
            "normalise them or load with FeatureStore.from_array(..., normalize=True)")
    return (np.asarray(features, dtype=np.float32) / norms[:, None]).astype(np.float32), n_off
