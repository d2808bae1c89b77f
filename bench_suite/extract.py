"""Distributed feature extraction: WebDataset shards -> L2-normalised FeatureStore.

Each Accelerate process reads its own shards (round robin, see data.shards.rank_shards) - the loader is
NOT passed through ``accelerator.prepare`` (that would split the data a second time and drop half of it).
Batches never cross shard boundaries, so 1 and N processes run the encoder on identical batches and give
identical stores. Ranks write their part atomically; rank 0 merges them in global-id order.

CPU multi-process: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...``
(plain ``--cpu --num_processes 2`` silently starts one process). The command line is
``python -m bench_suite.cli.features`` (bench_suite/cli/features.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from bench_suite import atomic
from bench_suite.data import shards as wshards
from bench_suite.digest import json_digest
from bench_suite.encoders import get_encoder
from bench_suite.errors import CorruptDataError
from bench_suite.progress import Tracker
from bench_suite.runtime import make_accelerator
from bench_suite.store import FeatureStore

log = logging.getLogger(__name__)


# Bumped whenever a change to extraction (decoding, preprocessing, pooling) can change the features: part of
# the feature fingerprint, so cached stores are re-extracted (tests/test_code_versions.py holds it to its source).
EXTRACT_VERSION = 1


def _fingerprint(manifest: dict, enc_meta: dict, pooling: str) -> str:
    """What decides a feature store: the shards' content, the encoder (weights hash, image size), the pooling
    and the extraction code's version."""
    return json_digest({"shards": manifest["checksum"], "encoder": enc_meta, "pooling": pooling,
                        "extract_version": EXTRACT_VERSION}, length=16)


def extract_features(shard_dir, out_dir, *, encoder: str, pooling: str | None = None, image_size: int | None = None,
                     batch_size: int = 64, accelerator=None, weights=None, cache_dir=None, progress: bool = True,
                     force: bool = False) -> FeatureStore:
    """Extract (or reuse cached) features of every sample in ``shard_dir`` into the store ``out_dir``."""
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    manifest = wshards.load_manifest(shard_dir)
    acc = accelerator or make_accelerator()
    rank, world = acc.process_index, acc.num_processes
    device = acc.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, acc.num_processes)))
    enc = get_encoder(encoder, image_size=image_size, weights=weights, cache_dir=cache_dir, device=str(device))
    pooling = pooling or enc.default_pooling
    fp = _fingerprint(manifest, enc.meta, pooling)
    meta_path = out_dir / "meta.json"
    if not force and meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == fp:
        log.info("features cached in %s (fingerprint %s)", out_dir, fp)
        return FeatureStore.open(out_dir)

    names = wshards.rank_shards(manifest, rank, world)
    wshards.verify_shards(shard_dir, names)
    parts_dir = out_dir.parent / f".{out_dir.name}.parts-{fp}"
    parts_dir.mkdir(parents=True, exist_ok=True)
    part_path = parts_dir / f"part-{rank:05d}-of-{world:05d}.npz"
    ids, feats, labels = _extract_rank(shard_dir, names, manifest, enc, pooling, batch_size, device,
                                       progress=progress and rank == 0)
    with atomic.atomic_path(part_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=ids, feats=feats, labels=labels)
    acc.wait_for_everyone()
    if rank == 0:
        _merge_parts(parts_dir, world, manifest, out_dir, {
            "dataset": manifest["dataset"], "split": manifest["split"], "encoder": enc.meta, "pooling": pooling,
            "shards": str(shard_dir.resolve()), "shards_checksum": manifest["checksum"], "fingerprint": fp,
            "num_classes": manifest.get("num_classes"), "classes": manifest.get("classes"), "processes": world})
        shutil.rmtree(parts_dir, ignore_errors=True)
    acc.wait_for_everyone()
    return FeatureStore.open(out_dir)


@torch.inference_mode()
def _extract_rank(shard_dir, names, manifest, enc, pooling, batch_size, device, progress):
    counts = {s["name"]: s["count"] for s in manifest["shards"]}
    ids, feats, labels = [], [], []
    bar = Tracker(f"features {manifest['dataset']}/{manifest['split']}", sum(counts[n] for n in names),
                  enabled=progress, unit="images", transient=True)
    try:
        for name in names:  # one shard at a time: batches never cross shards (1 vs N processes identical)
            seen = 0
            for b_ids, b_imgs, b_labels, *_ in wshards.iter_samples(shard_dir, [name], batch_size=batch_size):
                x = enc.preprocess(b_imgs).to(device)
                f = enc.features(x, pooling=pooling).float()
                f = torch.nn.functional.normalize(f, dim=1).cpu().numpy()
                ids.append(b_ids); feats.append(f); labels.append(b_labels)
                seen += len(b_ids)
                bar.advance(len(b_ids))
            if seen != counts[name]:
                raise CorruptDataError(f"shard {name}: read {seen} samples, manifest says {counts[name]}")
    finally:
        bar.close()
    if not ids:
        dim = enc.dim if pooling == enc.default_pooling else 0
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(ids), np.concatenate(feats).astype(np.float32), np.concatenate(labels)


def _merge_parts(parts_dir: Path, world: int, manifest: dict, out_dir: Path, meta: dict) -> None:
    parts = [np.load(parts_dir / f"part-{r:05d}-of-{world:05d}.npz") for r in range(world)]
    nonempty = [p for p in parts if len(p["ids"])]
    ids = np.concatenate([p["ids"] for p in nonempty])
    feats = np.concatenate([p["feats"] for p in nonempty])
    labels = np.concatenate([p["labels"] for p in nonempty])
    if len(ids) != manifest["count"] or len(np.unique(ids)) != len(ids):
        raise CorruptDataError(f"merged {len(ids)} feature rows ({len(np.unique(ids))} unique) but the manifest "
                               f"lists {manifest['count']} samples")
    order = np.argsort(ids, kind="stable")
    FeatureStore(feats[order], ids[order], labels[order], meta).save(out_dir)
    log.info("feature store %s: %d x %d", out_dir, len(ids), feats.shape[1])
