"""The samples a finetuning trains and evaluates on, read from WebDataset shards into memory.

Training: every process reads its round-robin share of the train shards, keeps the selected ids, and the
processes exchange what they found, so each holds the whole (small) selected subset in memory. Evaluation:
each process keeps only the samples of its own test shards, and the per-process results are summed.
Images are decoded once when the whole set fits ``DECODED_BUDGET``, else kept encoded and decoded on use.
Ids that no shard holds fail here, before any training step.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench_suite.data import shards as wshards
from bench_suite.data.sources import decode_image
from bench_suite.errors import BadInputError, CorruptDataError
from bench_suite.runtime import Runtime

DECODED_BUDGET = int(os.environ.get("BENCH_SUITE_DECODED_BUDGET_MB", "2048")) << 20  # decode all at once below this
TENSOR_BUDGET = int(os.environ.get("BENCH_SUITE_TENSOR_BUDGET_MB", "1024")) << 20  # cache preprocessed tensors below


@dataclass
class Samples:
    """Samples held in memory, sorted by global id: decoded uint8 arrays, or encoded bytes when large."""

    ids: np.ndarray
    labels: np.ndarray
    images: list
    masks: list | None
    encoded: bool

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> np.ndarray:
        return decode_image(self.images[i]) if self.encoded else self.images[i]

    def mask(self, i: int) -> np.ndarray:
        return decode_image(self.masks[i]) if self.encoded else self.masks[i]


def _read_raw(shard_dir: Path, names: list[str], keep: set | None) -> dict[int, dict]:
    """Raw (still encoded) members of the named shards, by global id; only ``keep`` ids when given."""
    out: dict[int, dict] = {}
    for name in names:
        try:
            with tarfile.open(shard_dir / name) as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    gid = int(key)
                    if keep is not None and gid not in keep:
                        continue
                    out.setdefault(gid, {})[ext] = tf.extractfile(member).read()
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise CorruptDataError(f"reading shard {shard_dir / name} failed: {exc}") from exc
    return out


def check_ids_in_manifest(manifest: dict, ids: np.ndarray, shard_dir) -> None:
    """Fail fast on ids that no shard can hold (outside every shard's [first_id, last_id])."""
    ranges = np.array([(s["first_id"], s["last_id"]) for s in manifest["shards"] if s["count"]], np.int64)
    if len(ranges) == 0:
        raise BadInputError(f"{shard_dir} holds no samples")
    inside = np.zeros(len(ids), bool)
    for lo, hi in ranges:
        inside |= (ids >= lo) & (ids <= hi)
    if not inside.all():
        bad = ids[~inside]
        raise BadInputError(f"{len(bad)} selected id(s) are not in the dataset of {shard_dir} "
                            f"(e.g. {bad[:5].tolist()}); was the selection made on another pool?")


def _read_selected(shard_dir: Path, names: list[str], ctx: Runtime, ids: np.ndarray | None) -> dict[int, dict]:
    """This process's raw records; with ``ids``, every process's finds merged and checked complete."""
    keep = None if ids is None else set(int(i) for i in ids)
    raw = _read_raw(shard_dir, names, keep)
    if ids is None:
        return raw
    if ctx.world > 1:
        merged: dict[int, dict] = {}
        for part in ctx.all_gather_object(raw):
            merged.update(part)
        raw = merged
    missing = sorted(keep - set(raw))
    if missing:
        raise BadInputError(f"{len(missing)} selected id(s) are not in the dataset of {shard_dir} "
                            f"(e.g. {missing[:5]}); was the selection made on another pool?")
    return raw


def _to_samples(raw: dict[int, dict], shard_dir: Path, need_masks: bool) -> Samples:
    """Records (by id) as Samples in id order; decoded at once when they fit ``DECODED_BUDGET``."""
    order = sorted(raw)
    labels, images, masks = [], [], []
    for gid in order:
        rec = raw[gid]
        blob = rec.get("png", rec.get("jpg"))
        if blob is None or "cls" not in rec:
            raise CorruptDataError(f"sample {gid} in {shard_dir} lacks an image or a label")
        if need_masks and "seg.png" not in rec:
            raise BadInputError(f"{shard_dir} has no segmentation masks (sample {gid}): not a segmentation "
                                "dataset, use --task cls")
        labels.append(int(rec["cls"]))
        images.append(blob)
        if need_masks:
            masks.append(rec["seg.png"])
    encoded = True
    if images:
        probe = decode_image(images[0]).nbytes * (2 if need_masks else 1)
        if probe * len(images) <= DECODED_BUDGET:
            images = [decode_image(b) for b in images]
            masks = [decode_image(b) for b in masks] if need_masks else None
            encoded = False
    return Samples(np.asarray(order, np.int64), np.asarray(labels, np.int64), images,
                   masks if need_masks else None, encoded)


def load_samples(shard_dir, ctx: Runtime, *, ids: np.ndarray | None, share: bool, need_masks: bool) -> Samples:
    """Read samples into memory.

    ``ids`` given (training): every process ends up with all of them (each reads its round-robin shards,
    then the processes exchange). ``ids`` None and ``share`` (evaluation): each process keeps only the
    samples of its own round-robin shards.
    """
    shard_dir = Path(shard_dir)
    manifest = wshards.load_manifest(shard_dir)
    names = wshards.rank_shards(manifest, ctx.rank, ctx.world) if (share or ids is not None) else \
        [s["name"] for s in manifest["shards"]]
    wshards.verify_shards(shard_dir, names)  # a truncated or damaged shard is an error, never fewer samples
    return _to_samples(_read_selected(shard_dir, names, ctx, ids), shard_dir, need_masks)
