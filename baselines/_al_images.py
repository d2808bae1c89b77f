"""The pool's images for the baselines that train on pixels: read from the store's shards.

``load_pool_images``: the whole pool at 32x32 for VAAL's and TA-VAAL's VAE; decoded once per process and
kept (read-only) for the next selection on the same pool (a table runs VAAL and TA-VAAL on one pool for
every ratio and seed: 6-8 s of decoding each time on the cpu profile). ``PoolImages``: the images at
their own size for a task model that finetunes the backbone (coreset, learnloss, tavaal, alfamix with
``task_model: finetune``; ``baselines/_al_backbone.py``).

A FeatureStore made by ``bench_suite.extract --shards DIR`` records the WebDataset folder its features came
from in ``meta["shards"]``; the images are read from there, row-aligned with the store. Labels in the shards
are never kept (the methods buy labels from the oracle).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_suite.data import shards as wshards
from bench_suite.errors import BadInputError, MissingDataError


def _shard_dir(store, method: str) -> Path:
    shard_dir = (store.meta or {}).get("shards")
    if not shard_dir:
        raise BadInputError(
            f"{method} trains on the images, but this feature store's meta has no 'shards' folder; use a "
            "store made by `python -m bench_suite.extract --shards DIR` (it records the folder) or set "
            "meta['shards'] to the WebDataset folder the features came from")
    shard_dir = Path(shard_dir)
    if not shard_dir.exists():
        raise MissingDataError(f"{method}: the store's shard folder {shard_dir} does not exist (re-run "
                               "launchers.prepare_shards or fix meta['shards'])")
    return shard_dir


def _to_rgb_u8(image, size: int) -> np.ndarray:
    """One image -> 3 x size x size uint8 (PIL bilinear, antialiased when shrinking; grey -> 3 channels)."""
    im = Image.fromarray(np.asarray(image))
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


# decoded pools kept between selections in this process: key -> read-only array (most recent last)
POOL_CACHE_BYTES = int(os.environ.get("BENCH_SUITE_AL_POOL_CACHE_MB", "1024")) << 20
_POOL_CACHE: dict = {}


def _pool_cache_key(shard_dir: Path, manifest: dict, ids: np.ndarray, size: int):
    """What decides the decoded pool: the shard files as they are now (path, size, mtime; the manifest's
    sha256 of each), the pool's ids in row order and the size. A rewritten shard changes its mtime."""
    files = []
    for s in manifest["shards"]:
        st = (shard_dir / s["name"]).stat()
        files.append((s["name"], s.get("sha256"), st.st_size, st.st_mtime_ns))
    ids_key = hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()
    return str(shard_dir.resolve()), tuple(files), len(ids), ids_key, int(size)


def load_pool_images(store, size: int = 32, method: str = "vaal") -> np.ndarray:
    """The pool's images as ``N x 3 x size x size`` uint8, row-aligned with the store (read-only).

    Read from the WebDataset shard folder in ``store.meta["shards"]`` (recorded by bench_suite.extract),
    resized with PIL bilinear (antialiased when shrinking), grey repeated to 3 channels. Labels in the shards
    are never read. Images are decoded one by one, so pools with images of mixed sizes (ImageNet) work.
    The decoded pool is kept for this process's next call on the same shards, ids and size (pools of at most
    ``BENCH_SUITE_AL_POOL_CACHE_MB``, default 1024, in all; the least recently used one goes first).
    """
    shard_dir = _shard_dir(store, method)
    manifest = wshards.load_manifest(shard_dir)
    ids = np.asarray(store.ids, dtype=np.int64)
    key = _pool_cache_key(shard_dir, manifest, ids, size)
    if key in _POOL_CACHE:
        _POOL_CACHE[key] = _POOL_CACHE.pop(key)  # most recently used
        return _POOL_CACHE[key]
    out = _decode_pool(shard_dir, manifest, ids, size, method)
    out.flags.writeable = False
    if out.nbytes <= POOL_CACHE_BYTES:
        _POOL_CACHE[key] = out
        while sum(a.nbytes for a in _POOL_CACHE.values()) > POOL_CACHE_BYTES:
            _POOL_CACHE.pop(next(iter(_POOL_CACHE)))
    return out


def _decode_pool(shard_dir: Path, manifest: dict, ids: np.ndarray, size: int, method: str) -> np.ndarray:
    wshards.verify_shards(shard_dir)  # a truncated or damaged shard is an error, never missing images
    out = np.zeros((len(ids), 3, size, size), dtype=np.uint8)
    seen = np.zeros(len(ids), dtype=bool)
    names = [s["name"] for s in manifest["shards"]]
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    for b_ids, b_imgs, *_ in wshards.iter_samples(shard_dir, names, batch_size=1, ids=ids):
        row = int(order[np.searchsorted(sorted_ids, int(b_ids[0]))])
        out[row] = _to_rgb_u8(b_imgs[0], size)
        seen[row] = True
    if not seen.all():
        missing = ids[~seen][:5].tolist()
        raise MissingDataError(f"{method}: {int((~seen).sum())} pool ids have no image in {shard_dir} "
                               f"(first: {missing}); the store and the shard folder do not match")
    return out


def to_unit_range(images_u8: np.ndarray, device) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (VAAL's Normalize(mean 0.5, std 0.5))."""
    return torch.as_tensor(images_u8, device=device).float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------- the finetuned task model's images
IMAGE_BUDGET = int(os.environ.get("BENCH_SUITE_AL_IMAGE_BUDGET_MB", "8192")) << 20  # keep the pool decoded below
# reader processes of a streamed pass (a pool too large to keep: ImageNet's 1.28M JPEGs per round)
STREAM_WORKERS = int(os.environ.get("BENCH_SUITE_AL_IMAGE_WORKERS", str(max(1, min(8, (os.cpu_count() or 2) // 2)))))


class PoolImages:
    """The pool's images at their own size (uint8 arrays), row-aligned with the store, for a task model that
    finetunes the backbone (``baselines/_al_backbone.py``): the encoder's own preprocessing resizes them.

    Read from the store's shard folder (``meta["shards"]``, as ``load_pool_images``); the shards' labels are
    never kept. A pool whose decoded images fit ``BENCH_SUITE_AL_IMAGE_BUDGET_MB`` (default 8192; CIFAR's
    50,000 32x32 images are 150 MB) is decoded once and kept; a larger one (ImageNet) is streamed from the
    shards on every pass (``BENCH_SUITE_AL_IMAGE_WORKERS`` reader processes, default half the cores up to 8),
    and only the labelled samples' images are kept between rounds.
    """

    def __init__(self, store, method: str, budget: int | None = None):
        self.shard_dir = _shard_dir(store, method)
        self.method = method
        manifest = wshards.load_manifest(self.shard_dir)
        wshards.verify_shards(self.shard_dir)  # a truncated or damaged shard is an error, never missing images
        self.names = [s["name"] for s in manifest["shards"]]
        self.ids = np.asarray(store.ids, dtype=np.int64)
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]
        self.cache: list | None = None
        self.kept: dict[int, np.ndarray] = {}
        budget = IMAGE_BUDGET if budget is None else int(budget)
        first = next(self._stream(np.arange(min(1, len(self.ids))), 1, workers=0), None)
        per_image = first[1][0].nbytes if first is not None else 0
        if per_image * len(self.ids) <= budget:
            self.cache = [None] * len(self.ids)
            for rows, images in self._stream(np.arange(len(self.ids)), 256, workers=0):
                for r, im in zip(rows.tolist(), images):
                    self.cache[r] = im
            if any(im is None for im in self.cache):
                raise MissingDataError(f"{method}: some pool ids have no image in {self.shard_dir}; the store and "
                                       "the shard folder do not match")

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        return self._order[np.searchsorted(self._sorted, ids)]

    def _stream(self, rows: np.ndarray, batch: int, workers: int | None = None):
        """(rows, images) batches of the given rows, read from the shards (in shard order with one reader; with
        ``workers`` reader processes, each reads whole shards)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        want = self.ids[rows]
        got_rows, got = [], []
        n_seen = 0
        workers = STREAM_WORKERS if workers is None else int(workers)
        for b_ids, b_imgs, *_ in wshards.iter_samples(self.shard_dir, self.names, batch_size=1, ids=want,
                                                      num_workers=workers):
            got_rows.append(int(self._rows_of(np.asarray(b_ids[:1]))[0]))
            got.append(np.asarray(b_imgs[0]))
            n_seen += 1
            if len(got) == batch:
                yield np.asarray(got_rows, np.int64), got
                got_rows, got = [], []
        if got:
            yield np.asarray(got_rows, np.int64), got
        if n_seen < len(np.unique(want)):
            raise MissingDataError(f"{self.method}: {len(np.unique(want)) - n_seen} pool ids have no image in "
                                   f"{self.shard_dir}; the store and the shard folder do not match")

    def get(self, rows) -> list:
        """The images of ``rows`` (in that order); without the whole-pool cache, read once and kept."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.cache is not None:
            return [self.cache[r] for r in rows.tolist()]
        missing = np.asarray([r for r in rows.tolist() if r not in self.kept], dtype=np.int64)
        for got_rows, images in self._stream(missing, 256):
            self.kept.update(zip(got_rows.tolist(), images))
        return [self.kept[r] for r in rows.tolist()]

    def batches(self, rows, batch: int):
        """``(positions, images)`` batches covering ``rows``: ``images[j]`` is the image of
        ``rows[positions[j]]``; in ``rows`` order from the cache, in reading order when streamed."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.cache is not None:
            for s in range(0, len(rows), batch):
                yield np.arange(s, min(s + batch, len(rows))), [self.cache[r] for r in rows[s:s + batch].tolist()]
            return
        pos_of = {r: p for p, r in enumerate(rows.tolist())}
        for got_rows, images in self._stream(rows, batch):
            yield np.asarray([pos_of[r] for r in got_rows.tolist()], np.int64), images
