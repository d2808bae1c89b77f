"""Distributed feature extraction: WebDataset shards -> L2-normalised FeatureStore, streamed and resumable.

The pipeline of one process (``extract_features``):

- **Ranks.** Each Accelerate process reads its own shards (round robin, see data.shards.rank_shards) - the
  loader is NOT passed through ``accelerator.prepare`` (that would split the data a second time and drop half
  of it).
- **Workers.** A ``DataLoader`` with ``num_workers`` workers over a WebDataset of the rank's shards, split by
  worker (``webdataset.split_by_worker``: worker w of W reads shards w, w+W, ...). Workers read the tars,
  decode the images and (on the CPU) preprocess them; the main process only runs the encoder.
- **Batches never cross shard boundaries** and each carries its shard and first row, so 1 and N processes,
  and 0 and N workers, run the encoder on identical batches and write identical stores, whatever order the
  workers' batches arrive in; for processes, given the same torch threads in each (a convolution's sums can be
  split otherwise over 1 and 2 threads: EfficientNet-Lite0 on photos, up to 1.2e-5 apart; the tests' digits not).
- **Reuse.** Shards whose ``content`` (their images and labels; folder shards record it) an earlier store with
  the same settings holds get their features copied from it (``reuse``, ``_reuse_shards``): a folder that gained
  a few photos is not extracted again as a whole.
- **Devices.** On a GPU: pinned host memory and ``non_blocking`` copies (the next batch is decoded and copied
  while the encoder runs; results come back through a one-batch lag so the GPU is never waited for per batch),
  ``channels_last``, the resize/normalise done on the GPU from uint8 images (``preprocess="device"``), and,
  with ``decode="device"``, JPEGs decoded on the GPU by ``torchvision.io.decode_jpeg`` (PNGs and JPEGs it
  cannot take are decoded by the workers). ``precision="bf16"`` runs the encoder under bfloat16 autocast.
- **Reduced decoding** (``decode="reduced"``, opt-in): the workers have libjpeg decode each JPEG at 1/2, 1/4 or
  1/8 scale in the DCT domain (PIL's draft mode), the smallest that still leaves twice the encoder's input size
  on each side, so the resize still does the antialiasing. For photos much larger than the input it is most of
  the work saved: 12 MP photos to 224 px, 8x less time per image (190 -> 22 ms, 2 threads), to 112 px 11x; features
  within cosine 0.9998 of the exact decode's, on the benchmark's 400 x 300 JPEGs at 56 px 0.9994 (min per row;
  EfficientNet-Lite0, measured). Not the default: the exact decode is the paper's and gives the stores of record.
  ``channels_last`` is the default on the CPU too: EfficientNet-Lite0 at 112 px, batch 64, 2 cores: 151 vs
  94 images/s for the bare forward, 114 vs 97 for the whole pipeline (the cpu profile's Table 1 features:
  3m18s instead of 4m51s); DINOv2-S/14: 38 vs 31. The features differ from the contiguous layout's by float
  rounding (about 1e-5), hence version 2.
- **Streaming.** Each shard's features go to their own memory-mapped file in the parts folder
  (``.<store>.parts-<fingerprint>``) as its batches come, which is renamed into place when the shard is
  complete; nothing N x d is ever held in memory. Rank 0 then streams the shard files into the store in
  blocks (``FeatureStore.write_streaming``, global-id order), and removes the parts folder.
- **Resumable.** A finished shard's file survives a kill; the rerun of the same extraction (same fingerprint
  and the same batch size, device, precision, decoding, processor model, torch release and CPU threads,
  recorded in the parts folder) skips the
  finished shards and starts at the first unfinished one, and ends with a byte-identical store.

CPU multi-process: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...``
(plain ``--cpu --num_processes 2`` silently starts one process). The command line is
``python -m bench_suite.cli.features`` (bench_suite/cli/features.py); the benchmark is
``python -m bench_suite.bench.extract``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench_suite import atomic
from bench_suite.data import shards as wshards
from bench_suite.data.sources import decode_image, is_turned
from bench_suite.digest import json_digest
from bench_suite.encoders import get_encoder
from bench_suite.encoders.base import Encoder
from bench_suite.errors import BadInputError, BenchError, CorruptDataError
from bench_suite.progress import Tracker
from bench_suite.runtime import make_accelerator, processor_name, threads_told
from bench_suite.store import BLOCK_BYTES, FeatureStore, FileRows, shards_meta

log = logging.getLogger(__name__)


# Bumped whenever a change to extraction (decoding, preprocessing, pooling) can change the features: part of
# the feature fingerprint, so cached stores are re-extracted (tests/test_code_versions.py holds it to its source).
# 2: channels_last by default on the CPU as well (float rounding differs from version 1's contiguous layout).
EXTRACT_VERSION = 2

PRECISIONS = ("fp32", "bf16")
DECODERS = ("cpu", "reduced", "device")
PREPROCESS = ("workers", "device")


def _fingerprint(manifest: dict, enc_meta: dict, pooling: str, variant: dict | None = None) -> str:
    """What decides a feature store: the shards' content, the encoder (weights hash, image size), the pooling
    and the extraction code's version; ``variant`` holds only the settings that differ from the default
    (bf16, decoding on the device), so default stores keep the fingerprint they always had."""
    obj = {"shards": manifest["checksum"], "encoder": enc_meta, "pooling": pooling, "extract_version": EXTRACT_VERSION}
    if variant:
        obj["variant"] = variant
    return json_digest(obj, length=16)


def default_workers(device: torch.device, world: int = 1) -> int:
    """DataLoader workers per process: on a GPU, the process's share of the cores less one (the main process
    feeds the GPU); on the CPU, none on 2 cores or fewer (the model needs every core, measured in
    bench_suite.bench.extract), else a quarter of the process's share."""
    cores = max(1, (os.cpu_count() or 1) // max(1, world))
    if device.type == "cuda":
        return max(1, min(16, cores - 1))
    return 0 if cores <= 2 else max(1, cores // 4)


def extract_features(shard_dir, out_dir, *, encoder: str, pooling: str | None = None, image_size: int | None = None,
                     batch_size: int = 64, accelerator=None, weights=None, cache_dir=None, progress: bool = True,
                     force: bool = False, num_workers: int | None = None, precision: str = "fp32",
                     decode: str = "cpu", preprocess: str | None = None, channels_last: bool | None = None,
                     pin_memory: bool | None = None, threads: int | None = None,
                     reuse=()) -> FeatureStore:
    """Extract (or reuse cached) features of every sample in ``shard_dir`` into the store ``out_dir``.

    ``num_workers``: DataLoader workers per process (None: ``default_workers``). ``precision``: fp32 | bf16.
    ``decode``: cpu (the workers, PIL) | reduced (the workers, JPEGs at a reduced scale: see the module's
    docstring) | device (JPEGs by torchvision on the encoder's device: nvJPEG on a GPU). ``preprocess``: workers |
    device (resize and normalise on the encoder's device from uint8; None: device on a GPU, workers on the CPU).
    ``channels_last``: None = yes (measured faster on both). ``pin_memory``: None = on a GPU only. ``reuse``:
    earlier stores whose shards' features are copied where a shard's images are the same (``_reuse_shards``).
    """
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if decode not in DECODERS:
        raise BadInputError(f"--decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    if preprocess is not None and preprocess not in PREPROCESS:
        raise BadInputError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
    if batch_size <= 0:
        raise BadInputError(f"--batch-size must be positive, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise BadInputError(f"--workers must be >= 0, got {num_workers}")
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    manifest = wshards.load_manifest(shard_dir)
    acc = accelerator or make_accelerator()
    rank, world = acc.process_index, acc.num_processes
    device = acc.device
    if device.type == "cpu":  # the process's share of the cores, unless told (threads=, BENCH_SUITE_THREADS)
        told = threads_told()
        n = threads or (told if told is not None else max(1, (os.cpu_count() or 1) // max(1, acc.num_processes)))
        if n > 0:
            torch.set_num_threads(n)
    enc = get_encoder(encoder, image_size=image_size, weights=weights, cache_dir=cache_dir, device=str(device))
    pooling = enc.check_pooling(pooling)
    variant = {k: v for k, v, default in (("precision", precision, "fp32"), ("decode", decode, "cpu")) if v != default}
    if manifest.get("orientation") == "exif":  # a folder of photos (write_folder_shards): turned upright
        variant["orientation"] = "exif"
    elif "paths" in manifest:
        log.warning("the shards in %s were made from a folder before photos were turned upright by their EXIF "
                    "orientation; sideways photos stay sideways (select --images DIR writes new shards)", shard_dir)
    fp = _fingerprint(manifest, enc.meta, pooling, variant)
    meta_path = out_dir / "meta.json"
    if not force and meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == fp:
        log.info("features cached in %s (fingerprint %s)", out_dir, fp)
        return FeatureStore.open(out_dir)

    on_gpu = device.type == "cuda"
    settings = {
        "fingerprint": fp, "batch_size": int(batch_size), "device": device.type, "precision": precision,
        "decode": decode,
        "preprocess": resolve_preprocess(decode, preprocess, device),
        "channels_last": True if channels_last is None else bool(channels_last),
    }
    if "orientation" in variant:  # only then: the parts of a dataset's extraction interrupted earlier stay usable
        settings["orientation"] = variant["orientation"]
    # What else can change the rounding of the features: a resumed extraction, or features reused from another
    # store, must have had them too. EfficientNet-Lite0 on photos gives other bits at 1 and 2 CPU threads (up to
    # 1.2e-5 apart); another processor model or torch release can too.
    settings.update(processor=processor_name(device), torch=torch.__version__)
    if device.type == "cpu":
        settings["threads"] = torch.get_num_threads()
    workers = default_workers(device, world) if num_workers is None else int(num_workers)
    parts_dir = out_dir.parent / f".{out_dir.name}.parts-{fp}"
    if rank == 0:
        _prepare_parts(parts_dir, settings, force)
    acc.wait_for_everyone()

    names = wshards.rank_shards(manifest, rank, world)
    done = [n for n in names if _shard_done(parts_dir, n)]
    todo = [n for n in names if n not in done]
    if done:
        log.info("resuming extraction: %d of %d shards%s already extracted; starting at %s", len(done), len(names),
                 f" of rank {rank}" if world > 1 else "", todo[0] if todo else "(none left)")
    if reuse and todo and not force:
        copied = _reuse_shards(reuse, manifest, todo, enc, pooling, variant, settings, parts_dir)
        todo = [n for n in todo if n not in copied]
    wshards.verify_shards(shard_dir, todo)
    _extract_rank(shard_dir, todo, manifest, enc, pooling, settings, parts_dir, device, workers,
                  pin_memory=on_gpu if pin_memory is None else bool(pin_memory), progress=progress and rank == 0)
    acc.wait_for_everyone()
    if rank == 0:
        meta = {"dataset": manifest["dataset"], "split": manifest["split"], "encoder": enc.meta, "pooling": pooling,
                **shards_meta(shard_dir, out_dir), "shards_checksum": manifest["checksum"], "fingerprint": fp,
                "num_classes": manifest.get("num_classes"), "classes": manifest.get("classes"), "processes": world,
                "extraction": {**{k: v for k, v in settings.items() if k != "fingerprint"},
                               "workers": min(workers, len(names))}}
        if variant:
            meta["variant"] = variant
        contents = _shard_contents(manifest)
        if contents:
            meta["shard_contents"] = contents
        _merge_shards(parts_dir, manifest, out_dir, meta)
        shutil.rmtree(parts_dir, ignore_errors=True)
    acc.wait_for_everyone()
    return FeatureStore.open(out_dir)


# ---------------------------------------------------------------------------------------------- the parts folder
def _prepare_parts(parts_dir: Path, settings: dict, force: bool) -> None:
    """Keep the finished shards of an earlier, interrupted run of the same extraction; start afresh when its
    settings differ (another batch size, device, precision or decoding could change the features) or on
    ``force``."""
    cfg = parts_dir / "settings.json"
    if parts_dir.exists():
        try:
            same = json.loads(cfg.read_text()) == settings
        except (OSError, json.JSONDecodeError):
            same = False
        if force or not same:
            if not force:
                log.info("extraction parts in %s were made with other settings: starting afresh", parts_dir)
            shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.exists():
        atomic.write_json(cfg, settings)


def _part(parts_dir: Path, name: str, what: str) -> Path:
    return parts_dir / f"{name}.{what}.npy"


def _shard_done(parts_dir: Path, name: str) -> bool:
    # the features file is renamed into place last, after its ids and labels
    return all(_part(parts_dir, name, w).exists() for w in ("ids", "labels", "feats"))


class _ShardWriter:
    """One shard's features, written into a memory-mapped temporary file as its batches come (in any order),
    renamed into place when every row has come."""

    def __init__(self, parts_dir: Path, name: str, count: int, dim: int):
        self.parts_dir, self.name, self.count = parts_dir, name, count
        self.path = _part(parts_dir, name, "feats")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp.{os.getpid()}")
        if count:
            self.feats = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(count, dim))
        else:  # numpy cannot map an empty file
            self.feats = np.zeros((0, dim), np.float32)
            np.save(self.tmp, self.feats)
            self.tmp = self.tmp.with_name(self.tmp.name + ".npy")
        self.ids = np.full(count, -1, np.int64)
        self.labels = np.full(count, -1, np.int64)
        self.filled = np.zeros(count, bool)

    def write(self, start: int, ids, feats, labels) -> bool:
        """Rows ``start``.. of the shard; True when the shard is complete (and finished)."""
        end = start + len(ids)
        if end > self.count or self.filled[start:end].any():
            raise CorruptDataError(f"shard {self.name}: more samples than the manifest's {self.count}")
        if feats.shape[1] != self.feats.shape[1]:
            raise CorruptDataError(f"shard {self.name}: feature width changed within the extraction")
        self.feats[start:end] = feats
        self.ids[start:end], self.labels[start:end] = ids, labels
        self.filled[start:end] = True
        if not self.filled.all():
            return False
        if isinstance(self.feats, np.memmap):
            self.feats.flush()
        del self.feats
        atomic.save_npy(_part(self.parts_dir, self.name, "ids"), self.ids)
        atomic.save_npy(_part(self.parts_dir, self.name, "labels"), self.labels)
        os.replace(self.tmp, self.path)
        return True

    def discard(self) -> None:
        self.__dict__.pop("feats", None)
        self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- reuse
def _shard_contents(manifest: dict) -> list | None:
    """``[content, count, first_id]`` of each shard, what a later extraction needs to find its rows in this
    store (``_reuse_shards``); None unless every shard records its ``content`` and holds consecutive ids."""
    shards = manifest["shards"]
    if not all(s.get("content") and s["last_id"] - s["first_id"] + 1 == s["count"] for s in shards if s["count"]):
        return None
    return [[s["content"], s["count"], s["first_id"]] for s in shards if s["count"]]


def _reuse_shards(stores, manifest: dict, names: list[str], enc, pooling: str, variant: dict, settings: dict,
                  parts_dir: Path) -> set[str]:
    """The shards among ``names`` whose features are copied from the earlier ``stores`` instead of extracted: those
    whose images and labels (the manifest's ``content``) a store made by the same encoder, pooling, code version
    and settings (batch size, device, precision, decoding, processor, torch release, CPU threads) holds. A shard's
    batches never leave it, so its features depend on its content and those alone: the store is the one a fresh
    extraction writes (tested, byte for byte). How a folder that gained a few photos is not extracted again as a
    whole. A store that cannot be opened (damaged, vanished) is passed over with a warning."""
    want: dict = {}
    for s in manifest["shards"]:
        if s["name"] in names and s["count"] and s.get("content") and s["last_id"] - s["first_id"] + 1 == s["count"]:
            want.setdefault((s["content"], s["count"]), []).append(s)
    same = {k: v for k, v in settings.items() if k != "fingerprint"}
    copied: set[str] = set()
    for path in stores:
        if not want:
            break
        try:
            meta = json.loads((Path(path) / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        made = {k: v for k, v in meta.get("extraction", {}).items()
                if k not in ("workers", "bf16_min_cosine_first_batch")}
        fp = _fingerprint({"checksum": meta.get("shards_checksum")}, enc.meta, pooling, variant)
        if meta.get("fingerprint") != fp or made != same:
            continue
        entries = [entry for entry in meta.get("shard_contents") or [] if tuple(entry[:2]) in want]
        if not entries:
            continue
        try:
            store = FeatureStore.open(path)  # validated: its checksum, before any row of it is copied
        except BenchError as exc:  # a damaged or vanished earlier store is not this extraction's problem
            log.warning("not reusing features from %s: %s", path, exc)
            continue
        hits = [(entry, s) for entry in entries for s in want.pop(tuple(entry[:2]), [])]
        for (_, count, first), s in hits:
            rows = store.rows_of_ids(np.arange(first, first + count))
            labels = np.asarray(store.labels)[rows] if store.labels is not None else np.full(count, -1, np.int64)
            _ShardWriter(parts_dir, s["name"], count, store.dim).write(
                0, np.arange(s["first_id"], s["last_id"] + 1), store.take(rows), labels)
            copied.add(s["name"])
        log.info("reused the features of %d shards (%d images) from %s", len(hits), sum(e[1] for e, _ in hits), path)
    return copied


# ---------------------------------------------------------------------------------------------- the workers
def preprocessor(enc: Encoder):
    """A light stand-in for the encoder that ``Encoder.preprocess`` accepts: the workers get the preprocessing
    (bit for bit the encoder's own) without the model."""
    return types.SimpleNamespace(name=enc.name, image_size=enc.image_size, mean=enc.mean.clone(), std=enc.std.clone())


def resolve_preprocess(decode: str, preprocess: str | None, device: torch.device) -> str:
    """Where images are resized and normalised: on the device when it decodes them, else as told, else on a GPU
    (from uint8: a quarter of the bytes to copy) and in the workers on a CPU."""
    return "device" if decode == "device" else preprocess or ("device" if device.type == "cuda" else "workers")


def preprocess_image(prep, image: np.ndarray) -> torch.Tensor:
    """``Encoder.preprocess`` of one decoded image, (1,3,S,S). The workers preprocess each image as soon as it
    is decoded, not a stacked batch: the same bytes (each output pixel is computed alone, so the batch does not
    change it; tests/test_extract_pipeline.py checks it on photos), about 30% less CPU time for 400 x 300 photos
    at 112 px (the float copy of one photo stays in cache; 1.0 vs 1.4 ms per image, 2 threads, measured), and a
    worker holds one full-size image at a time, not a batch of them (64 phone photos of 12 MP: 9 GB as floats)."""
    return Encoder.preprocess(prep, image[None])


def preprocess_tensor(x: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``Encoder.preprocess`` on a uint8 (B,C,H,W) tensor on any device (C = 1 or 3): the same operations,
    so on the CPU the same bytes; on a GPU the resize runs there. ``mean``/``std`` belong on ``x``'s device
    already (``_extract_rank`` moves them once: a copy from pageable host memory would wait for the GPU)."""
    x = x.float().div_(255.0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x - mean.to(x.device)) / std.to(x.device)).contiguous()


# A batch of same-size uint8 images is preprocessed on the device in slices of at most this many bytes of float:
# a batch of 256 ImageNet-size images is one slice (as it always was), 64 phone photos of 12 MP are not one 9 GB
# float tensor but ten. Every output pixel is computed alone, so slicing does not change the bytes.
PREPROCESS_SLICE_BYTES = 1 << 30


def preprocess_stacked(x: torch.Tensor, prep) -> torch.Tensor:
    """``preprocess_tensor`` of a uint8 (B,C,H,W) batch, in slices of at most ``PREPROCESS_SLICE_BYTES``."""
    step = max(1, PREPROCESS_SLICE_BYTES // max(1, 4 * x[0].numel()))
    if step >= len(x):
        return preprocess_tensor(x, prep.image_size, prep.mean, prep.std)
    return torch.cat([preprocess_tensor(part, prep.image_size, prep.mean, prep.std) for part in x.split(step)])


def _is_jpeg(blob: bytes) -> bool:
    return blob[:3] == b"\xff\xd8\xff"


def _jpeg_components(blob: bytes) -> int | None:
    """The number of colour components in a JPEG's frame header (SOFn), None where none is found before the scan.
    The device decoder is given only 1- or 3-component JPEGs: CMYK (4) is not among nvJPEG's outputs."""
    i, n = 2, len(blob)
    while i + 4 <= n:
        if blob[i] != 0xFF:
            return None
        marker = blob[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: length, precision, size, Nf
            return blob[i + 9] if i + 9 < n else None
        if marker == 0xDA:  # start of scan
            return None
        i += 2 + int.from_bytes(blob[i + 2:i + 4], "big")
    return None


def _chw(image: np.ndarray) -> torch.Tensor:
    arr = np.require(image, requirements=["C", "W"])
    return torch.from_numpy(arr)[None] if arr.ndim == 2 else torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# A worker's batch is cut early once the full-size images it holds for the device's resize reach this many bytes
# (a rule of the shard's content alone, so any split of the shards between processes and workers makes the same
# batches). A batch of 256 ImageNet photos holds about 110 MB on average (0.4 MB each), so only one with unusually
# large photos is cut. Phone photos of 12 MP (36 MB) are, at 8 per batch: with 15 workers prefetching 4 batches
# each, 256-photo batches would hold 550 GB of host memory, these at most 17 GB. (The workers' own preprocessing,
# the CPU's default, keeps one full-size image at a time and is not counted.)
BATCH_IMAGE_BYTES = 256 << 20


class ShardBatches(torch.utils.data.IterableDataset):
    """Batches of whole shards from a WebDataset split by worker: dicts with the shard's name, the first row
    within the shard, ids, labels and the images (``inputs``: preprocessed float (B,3,S,S) when the workers
    preprocess; else uint8 (B,C,H,W) when the images share a shape; else ``packed``: every image of the batch in
    one flat uint8 tensor, cut by ``offsets``, each either a uint8 (C,H,W) image of shape ``shapes[i]`` or, with
    ``decode="device"``, a JPEG's bytes where ``encoded`` says so). One tensor per batch, not one per image: each
    tensor a worker hands over holds a file descriptor until the main process frees it, and a batch of 256 with
    4 batches prefetched per worker ran out of the usual 1024 (measured: "Too many open files")."""

    def __init__(self, shard_dir, names: list[str], batch_size: int, prep, *, preprocess: str, decode: str,
                 orient: bool = False):
        if decode == "device" and preprocess == "workers":
            raise ValueError("decoding on the device means preprocessing there too (see resolve_preprocess)")
        self.urls = [str(Path(shard_dir) / n) for n in names]
        self.batch_size, self.prep, self.preprocess, self.decode = batch_size, prep, preprocess, decode
        self.orient = orient  # EXIF orientation applied (folders of photos); oriented JPEGs are decoded here

    def __iter__(self):
        import webdataset as wds

        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)
        ds = wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                            empty_check=False)
        batch, url, start, held = [], None, 0, 0
        for sample in ds:
            if sample["__url__"] != url:
                if batch:
                    yield self._pack(url, start, batch)
                batch, url, start, held = [], sample["__url__"], 0, 0
            item = self._item(url, sample)
            batch.append(item)
            if self.preprocess != "workers" and not item[3]:
                held += item[2].nbytes  # a full-size image waiting for the device's resize
            if len(batch) == self.batch_size or held >= BATCH_IMAGE_BYTES:
                yield self._pack(url, start, batch)
                batch, start, held = [], start + len(batch), 0
        if batch:
            yield self._pack(url, start, batch)

    def _item(self, url: str, s: dict) -> tuple:
        """(id, label, image, encoded) of one sample: the image decoded (and preprocessed, when the workers do
        it), or a JPEG's bytes for the device's decoder."""
        key = s["__key__"]
        blob = s.get("png", s.get("jpg"))
        if blob is None:
            raise CorruptDataError(f"sample {key} has no png/jpg image")
        try:
            if (self.decode == "device" and _is_jpeg(blob) and _jpeg_components(blob) in (1, 3)
                    and not (self.orient and is_turned(blob))):
                return int(key), int(s["cls"]), torch.frombuffer(bytearray(blob), dtype=torch.uint8), True
            image = decode_image(blob, orient=self.orient,
                                 reduce_to=2 * self.prep.image_size if self.decode == "reduced" else None)
        except Exception as exc:  # noqa: BLE001 - PIL's errors for a corrupt image: one message, named
            raise CorruptDataError(f"sample {int(key)} in shard {Path(url).name}: cannot decode its image: "
                                   f"{type(exc).__name__}: {exc}") from exc
        if self.preprocess == "workers":  # unless told otherwise (never with device decoding: resolve_preprocess)
            image = preprocess_image(self.prep, image)
        return int(key), int(s["cls"]), image, False

    def _pack(self, url: str, start: int, batch: list[tuple]) -> dict:
        ids, labels, images, encoded = (list(column) for column in zip(*batch))
        out = {"shard": Path(url).name, "start": start, "ids": np.asarray(ids, np.int64),
               "labels": np.asarray(labels, np.int64)}
        if self.preprocess == "workers":
            out["inputs"] = torch.cat(images)
        elif not any(encoded) and all(im.shape == images[0].shape for im in images):
            out["inputs"] = torch.stack([_chw(im) for im in images])  # uint8 (B,C,H,W): one copy to the device
        else:
            items = [im if enc else _chw(im) for im, enc in zip(images, encoded)]
            out["packed"] = torch.cat([t.reshape(-1) for t in items])
            out["offsets"] = np.cumsum([0] + [int(t.numel()) for t in items])
            out["shapes"] = [None if enc else tuple(t.shape) for t, enc in zip(items, encoded)]
            out["encoded"] = encoded
        return out


def _device_inputs(batch: dict, prep, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """The encoder's (B,3,S,S) input on ``device`` from a worker's batch (``prep``'s mean and std on ``device``)."""
    if "packed" not in batch:
        inputs = batch["inputs"]
        if inputs.dtype == torch.uint8:
            return preprocess_stacked(inputs.to(device, non_blocking=non_blocking), prep)
        return inputs.to(device, non_blocking=non_blocking)
    flat, cut, shapes, encoded = batch["packed"], batch["offsets"], batch["shapes"], batch["encoded"]
    pieces = [flat[int(cut[i]):int(cut[i + 1])] for i in range(len(shapes))]
    moved: list = [None] * len(pieces)
    if not all(encoded):  # the images the workers decoded: one copy of the whole batch, cut on the device
        flat_dev = flat.to(device, non_blocking=non_blocking)
        for i, shape in enumerate(shapes):
            if shape is not None:
                moved[i] = flat_dev[int(cut[i]):int(cut[i + 1])].view(shape)
    if any(encoded):
        from torchvision.io import ImageReadMode, decode_jpeg

        idx = [i for i, enc in enumerate(encoded) if enc]
        mode = ImageReadMode.UNCHANGED
        try:
            decoded = decode_jpeg([pieces[i] for i in idx], mode=mode, device=device)
        except RuntimeError:  # one JPEG the device decoder does not take: retry one by one, not the whole batch
            decoded = []
            for i in idx:
                try:
                    decoded.append(decode_jpeg(pieces[i], mode=mode, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(idx, decoded):
            if img is None or img.shape[0] not in (1, 3):  # decoded here instead, as a worker would have
                try:
                    img = _chw(decode_image(pieces[i].numpy().tobytes())).to(device)
                except Exception as exc:  # noqa: BLE001 - PIL's errors for a corrupt image: one message
                    raise CorruptDataError(f"sample {int(batch['ids'][i])} in shard {batch['shard']}: cannot "
                                           f"decode its image: {type(exc).__name__}: {exc}") from exc
            moved[i] = img
    size = prep.image_size
    if all(t.shape == moved[0].shape for t in moved):
        return preprocess_stacked(torch.stack(moved), prep)
    return torch.cat([preprocess_tensor(t[None], size, prep.mean, prep.std) for t in moved])


def input_batches(shard_dir, names: list[str], prep, settings: dict, device: torch.device, workers: int, *,
                  pin_memory: bool):
    """``(batch, x)`` for each worker batch of the shards ``names``: ``x`` is the encoder's input for it on
    ``device`` (channels_last when ``settings`` say so). Extraction's whole data path short of the encoder, so that
    the benchmark can time it alone (``bench.extract``: the rate the pipeline cannot exceed)."""
    prep_dev = types.SimpleNamespace(**{**vars(prep), "mean": prep.mean.to(device), "std": prep.std.to(device)})
    ds = ShardBatches(shard_dir, names, settings["batch_size"], prep, preprocess=settings["preprocess"],
                      decode=settings["decode"], orient=settings.get("orientation") == "exif")
    workers = min(workers, len(names))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                         pin_memory=pin_memory and device.type == "cuda",
                                         prefetch_factor=4 if workers else None,
                                         persistent_workers=False)
    non_blocking = device.type == "cuda"
    try:
        for batch in _read(loader, shard_dir):
            x = _device_inputs(batch, prep_dev, device, non_blocking)
            if settings["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            yield batch, x
    except CorruptDataError as exc:
        named = _with_path(exc, shard_dir)
        if named is exc:
            raise
        raise named from exc


# ---------------------------------------------------------------------------------------------- one rank's work
@torch.inference_mode()
def _extract_rank(shard_dir, names, manifest, enc, pooling, settings, parts_dir, device, workers, *, pin_memory,
                  progress):
    if not names:
        return
    counts = {s["name"]: s["count"] for s in manifest["shards"]}
    if settings["channels_last"]:
        enc.model.to(memory_format=torch.channels_last)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if settings["precision"] == "bf16"
                else torch.autocast(device_type=device.type, enabled=False))
    non_blocking = device.type == "cuda"
    writers: dict[str, _ShardWriter] = {}
    pending: list = []  # (batch, host features, event): results still being copied back from the GPU

    def finish(item):
        batch, feats, event = item
        if event is not None:
            event.synchronize()
        name = batch["shard"]
        if name not in writers:
            writers[name] = _ShardWriter(parts_dir, name, counts[name], feats.shape[1])
        if writers[name].write(batch["start"], batch["ids"], feats.numpy(), batch["labels"]):
            del writers[name]
        bar.advance(len(batch["ids"]))

    bar = Tracker(f"features {manifest['dataset']}/{manifest['split']}", sum(counts[n] for n in names),
                  enabled=progress, unit="images", transient=True)
    checked = False
    try:
        for batch, x in input_batches(shard_dir, names, preprocessor(enc), settings, device, workers,
                                      pin_memory=pin_memory):
            with autocast:
                f = enc.features(x, pooling=pooling)
            f = F.normalize(f.float(), dim=1)
            if settings["precision"] == "bf16" and not checked:  # measure what bf16 costs, on the first batch
                ref = F.normalize(enc.features(x, pooling=pooling).float(), dim=1)
                _check_bf16(parts_dir, float((f * ref).sum(1).min()), len(f), enc.name)
                checked = True
            if non_blocking:
                host = torch.empty(f.shape, dtype=f.dtype, pin_memory=True)
                host.copy_(f, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                pending.append((batch, host, event))
                while len(pending) > 1:  # lag one batch: the GPU runs batch i while batch i-1 is written
                    finish(pending.pop(0))
            else:
                finish((batch, f.cpu(), None))
        while pending:
            finish(pending.pop(0))
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    finally:
        bar.close()
    if writers:
        name, w = next(iter(writers.items()))
        seen = int(w.filled.sum())
        for w in writers.values():
            w.discard()
        raise CorruptDataError(f"shard {name}: read {seen} samples, manifest says {counts[name]}")
    empty = [n for n in names if counts[n] == 0]
    for name in empty:  # a shard with no samples: nothing came through the loader
        _ShardWriter(parts_dir, name, 0, enc.poolings[pooling]).write(0, np.zeros(0, np.int64),
                                                                      np.zeros((0, enc.poolings[pooling]), np.float32),
                                                                      np.zeros(0, np.int64))
    missing = [n for n in names if not _shard_done(parts_dir, n)]
    if missing:
        raise CorruptDataError(f"shard {missing[0]}: read 0 samples, manifest says {counts[missing[0]]}")


BF16_MIN_COSINE = 0.999


def _check_bf16(parts_dir: Path, cosine: float, rows: int, encoder: str) -> None:
    """Record the smallest per-row cosine between bf16 and fp32 features of the first batch (it goes into the
    store's meta) and warn when it is under ``BF16_MIN_COSINE``."""
    atomic.write_json(parts_dir / f"bf16-check-{os.getpid()}.json", {"min_cosine": cosine, "rows": rows})
    if cosine < BF16_MIN_COSINE:
        log.warning("--precision bf16: %s's bf16 features differ from fp32 (min cosine %.5f per row on the first "
                    "batch of %d, under %.3f); use fp32 for this encoder", encoder, cosine, rows, BF16_MIN_COSINE)
    else:
        log.info("--precision bf16: min cosine to fp32 per row on the first batch of %d: %.5f", rows, cosine)


def _read(loader, shard_dir):
    try:
        yield from loader
    except Exception as exc:  # tarfile / decode errors inside webdataset or a worker
        text = str(exc).strip()
        if "Original Traceback" in text:  # a worker's error (any type): its last line is the message
            last = text.splitlines()[-1]
            if isinstance(exc, (CorruptDataError, BadInputError)):
                raise type(exc)(last.partition(": ")[2] or last) from exc  # without "module.Class: "
            raise CorruptDataError(f"reading shards in {shard_dir} failed: {last}") from exc
        if isinstance(exc, (CorruptDataError, BadInputError)):
            raise
        raise CorruptDataError(f"reading shards in {shard_dir} failed: {type(exc).__name__}: {exc}") from exc


_A_SAMPLE = re.compile(r"sample (\d+) in shard ")


def _with_path(exc: CorruptDataError, shard_dir) -> CorruptDataError:
    """The error about one sample, led by that image's path where the shards were made from a folder."""
    found = _A_SAMPLE.match(str(exc))
    try:
        manifest = wshards.load_manifest(shard_dir) if found else {}
    except Exception:  # noqa: BLE001 - the error being reported matters more than a name for it
        return exc
    paths = manifest.get("paths") or []
    i = int(found.group(1)) if found else -1
    if not 0 <= i < len(paths):
        return exc
    return CorruptDataError(f"{wshards.shown(Path(manifest.get('source', '.')) / paths[i])}: {exc}")


# ---------------------------------------------------------------------------------------------- the merge
def _merge_shards(parts_dir: Path, manifest: dict, out_dir: Path, meta: dict) -> None:
    """Stream every shard's features into the store in global-id order, in blocks (never N x d in memory)."""
    names = [s["name"] for s in manifest["shards"]]
    missing = [n for n in names if not _shard_done(parts_dir, n)]
    if missing:
        raise CorruptDataError(f"extraction parts in {parts_dir} lack {len(missing)} shards (first {missing[0]}); "
                               "did a rank fail?")
    ids = np.concatenate([np.load(_part(parts_dir, n, "ids")) for n in names])
    labels = np.concatenate([np.load(_part(parts_dir, n, "labels")) for n in names])
    feats = [FileRows.of_npy(_part(parts_dir, n, "feats")) for n in names]  # plain reads: no page piles up
    dims = {f.shape[1] for f in feats if len(f)}
    if len(ids) != manifest["count"] or len(np.unique(ids)) != len(ids) or len(dims) > 1:
        raise CorruptDataError(f"merged {len(ids)} feature rows ({len(np.unique(ids))} unique, widths {sorted(dims)}) "
                               f"but the manifest lists {manifest['count']} samples")
    dim = dims.pop() if dims else 0
    checks = [json.loads(p.read_text()) for p in sorted(parts_dir.glob("bf16-check-*.json"))]
    if checks:
        meta = {**meta, "extraction": {**meta.get("extraction", {}), "bf16_min_cosine_first_batch":
                                       min(c["min_cosine"] for c in checks)}}
    offsets = np.cumsum([0] + [len(f) for f in feats])
    order = np.argsort(ids, kind="stable")
    rows = max(1, BLOCK_BYTES // max(1, 4 * dim))

    def blocks():
        if np.array_equal(order, np.arange(len(order))):  # ids in shard order (always, for prepared shards)
            for f in feats:
                for start in range(0, len(f), rows):
                    yield f[start:start + rows]
            return
        for start in range(0, len(order), rows):  # else gather each block of rows from the shards
            src = order[start:start + rows]
            which = np.searchsorted(offsets, src, "right") - 1
            out = np.empty((len(src), dim), np.float32)
            for s in np.unique(which):
                sel = which == s
                local = src[sel] - offsets[s]
                lo, hi = int(local.min()), int(local.max()) + 1
                out[sel] = feats[s][lo:hi][local - lo]
            yield out

    FeatureStore.write_streaming(out_dir, blocks(), len(ids), dim, ids[order], labels[order], meta)
    log.info("feature store %s: %d x %d", out_dir, len(ids), dim)
