"""WebDataset shards: write a dataset split as tar shards + manifest; read them back per rank.

Layout of a shard folder::

    manifest.json            dataset, split, count, classes, subset, and per shard: name, count, sha256, ids
    shard-000000.tar ...     samples: __key__ = 9-digit global id, png|jpg image, cls label (, seg.png mask)

Global ids are indices into the original split, so a selection always names the same images whatever
subset of the split was sharded. A folder of images (``write_folder_shards``, for ``python -m
bench_suite.cli.select --images DIR``) is sharded in sorted path order: id i is the i-th image, its label is
-1 (unknown), and the manifest's ``paths`` lists each id's path relative to the folder; its shards are cut where
the paths' hashes say (``content_cuts``) and each records a digest of its images (``content``), so that the
features of the shards an added or removed image leaves alone are reused (bench_suite.extract). Rank r of W
reads shards r, r+W, ... (round robin); feature extraction never runs collectives per batch, so uneven shard
counts per rank cannot hang it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np

from bench_suite import atomic
from bench_suite.digest import json_digest
from bench_suite.data.registry import get_dataset
from bench_suite.data.sources import decode_image
from bench_suite.errors import BadInputError, CorruptDataError, MissingDataError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of size ``limit`` (all of them when limit is None)."""
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    if limit <= 0:
        raise BadInputError(f"--limit must be positive, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False)).astype(np.int64)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(dataset: str, split: str, out_dir, *, source=None, limit: int | None = None, subset_seed: int = 0,
                 shard_size: int = 1000, progress=None) -> dict:
    """Write ``dataset``/``split`` (optionally a seeded subset) as shards; returns the manifest."""
    import webdataset as wds

    spec = get_dataset(dataset)
    raw = spec.load(split, source)
    idx = subset_indices(len(raw.labels), limit, subset_seed)
    if shard_size <= 0:
        raise BadInputError(f"--shard-size must be positive, got {shard_size}")
    n_shards = max(1, math.ceil(len(idx) / shard_size))
    out_dir = Path(out_dir)
    shards = []
    with atomic.atomic_dir(out_dir) as tmp:
        for s in range(n_shards):
            part = idx[s * shard_size:(s + 1) * shard_size]
            name = f"shard-{s:06d}.tar"
            # a fixed mtime: the same samples give byte-identical shards (and checksums) on every run and machine
            with wds.TarWriter(str(tmp / name), encoder=False, mtime=0.0) as sink:
                for gid in part.tolist():
                    item = raw.images[gid]
                    if isinstance(item, Path):  # ImageFolder: keep the original bytes
                        ext = "png" if item.suffix.lower() == ".png" else "jpg"
                        sample = {ext: item.read_bytes()}
                    else:
                        sample = {"png": encode_png(np.asarray(item))}
                    sample["__key__"] = f"{gid:09d}"
                    sample["cls"] = str(int(raw.labels[gid])).encode()
                    if raw.masks is not None:
                        mask = raw.masks[gid]
                        sample["seg.png"] = mask.read_bytes() if isinstance(mask, Path) else encode_png(np.asarray(mask))
                    sink.write(sample)
            shards.append({"name": name, "count": int(len(part)), "sha256": sha256_file(tmp / name),
                           "first_id": int(part[0]), "last_id": int(part[-1])})
            if progress:
                progress(len(part))
        manifest = {
            "dataset": dataset, "split": split, "task": spec.task, "count": int(len(idx)),
            "classes": list(raw.classes), "num_classes": len(raw.classes),
            "subset": {"limit": limit, "seed": subset_seed, "of": int(len(raw.labels))},
            "source": str(source) if source else "registry default",
            "label_counts": np.bincount(raw.labels[idx], minlength=len(raw.classes)).tolist(),
            "shards": shards,
        }
        manifest["checksum"] = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Folder shards' layout, part of the folder's key: 2 = the manifest says to orient images by their EXIF tag;
# 3 = shards cut by the paths' hashes (content_cuts), each with the digest of its images (content).
FOLDER_LAYOUT = 3


def list_images(image_dir, *, note_skipped: bool = True) -> list[Path]:
    """The image files under ``image_dir`` (recursively, hidden files and folders skipped), in sorted order of
    their relative paths; the other files are counted by suffix in one log line (``note_skipped``)."""
    root = Path(image_dir)
    if not root.is_dir():
        raise MissingDataError(f"--images {root}: not a folder")
    files, skipped = [], {}
    for p in root.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        else:
            kind = p.suffix.lower() or "no suffix"
            skipped[kind] = skipped.get(kind, 0) + 1
    if skipped and note_skipped:
        log.info("--images %s: skipped %d files that are not images by their suffix (%s); read are %s", root,
                 sum(skipped.values()), ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())),
                 " ".join(IMAGE_SUFFIXES))
    if not files:
        raise BadInputError(f"--images {root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def folder_key(image_dir, files: list[Path] | None = None) -> str:
    """A digest of a folder's images as listed by ``list_images`` (or ``files``, that listing): relative path,
    size and modification time of each (what decides whether its shards are still current, without reading
    every image), and the folder shards' layout."""
    root = Path(image_dir)
    entries = []
    for p in list_images(root) if files is None else files:
        st = p.stat()
        entries.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return json_digest({"images": entries, "layout": FOLDER_LAYOUT})


def folder_shard_size(count: int, batch_size: int = 64) -> int:
    """The target of ``content_cuts`` for a folder of ``count``: about count / 32, so that the DataLoader workers
    have shards to share (a shard is a worker's unit of work: 1,000-image shards would give a folder of 900 photos
    one worker), at least 64 and a batch (a batch never spans two shards), at most 1,024 or a batch. Rounded down
    to a power of two, so that a folder that grows or shrinks keeps its target, and its shards, until it crosses
    32 x 2^k images (4,096, 8,192, 16,384, 32,768): there every shard is cut anew, once."""
    per = max(1, math.ceil(count / 32))
    return min(max(1024, batch_size), max(64, batch_size, 1 << (per.bit_length() - 1)))


def content_cuts(names: list[str], target: int) -> list[int]:
    """Shard sizes for the samples ``names`` (in their order), ``target`` on average, cut where the names say
    (content-defined chunking): a shard ends at a name whose hash is 0 modulo target - target//2 + 1 once it holds
    target//2 samples, or at 2 x target. An image added or removed changes the shard it falls in (now and then the
    next one too), not every later shard as fixed-size cuts would, so the features of the others are reused."""
    half = max(1, target // 2)
    modulus = max(1, target - half + 1)  # the first cut after ``half`` comes after modulus - 1 more on average
    sizes, n = [], 0
    for name in names:
        n += 1
        h = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big")
        if n >= 2 * target or (n >= half and h % modulus == 0):
            sizes.append(n)
            n = 0
    return sizes + [n] if n or not sizes else sizes


def shown(path) -> str:
    """A path for a one-line message: line breaks in file names written as \\n, \\r."""
    return str(path).replace("\n", "\\n").replace("\r", "\\r")


SMALL_SIDE = 64  # images with a side under this many pixels are named in a warning (icons, thumbnails)


def check_images(root: Path, files: list[Path], *, warn_small: bool = True) -> None:
    """Every file opens as an image (its header: cheap), before any is sharded; else one line naming the bad ones.
    An image cut short after its header is found when it is decoded (extraction names its path). Images under
    ``SMALL_SIDE`` pixels on a side are selected like any other, resized to the encoder's input: a warning names
    them, as they are often icons or thumbnails that no one means to annotate."""
    from PIL import Image

    bad, small = [], []
    for p in files:
        if p.stat().st_size == 0:
            bad.append((p, "empty file"))
            continue
        try:
            with Image.open(p) as im:
                if min(im.size) < SMALL_SIDE:
                    small.append((p, im.size))
        except Exception as exc:  # noqa: BLE001 - whatever PIL raises for it, the file is named
            bad.append((p, type(exc).__name__))
    if small and warn_small and not bad:
        names = ", ".join(f"{shown(p.relative_to(root).as_posix())} ({w}x{h})" for p, (w, h) in small[:5])
        log.warning("--images %s: %d of %d images are under %d pixels on a side (icons, thumbnails?); they are "
                    "selected like the others: %s%s", root, len(small), len(files), SMALL_SIDE, names,
                    ", ..." if len(small) > 5 else "")
    if bad:
        names = ", ".join(f"{shown(p.relative_to(root).as_posix())} ({why})" for p, why in bad[:5])
        raise BadInputError(f"--images {root}: {len(bad)} of {len(files)} files are not readable images: {names}"
                            f"{', ...' if len(bad) > 5 else ''}; move them out of the folder or repair them")


def write_blob_shards(samples, out_dir, *, dataset: str, split: str = "all", count: int, shard_size: int = 1000,
                      sizes: list[int] | None = None, classes=(), extra: dict | None = None, progress=None) -> dict:
    """Write encoded images as shards + manifest: ``samples`` yields (id, blob, label) in increasing id order;
    the blob (JPEG, PNG or any format PIL reads) is stored as is, under ``jpg`` when it is a JPEG and
    ``png`` otherwise. Shards of ``shard_size`` samples, or of the given ``sizes``. ``extra`` goes into the
    manifest. Each shard records ``content``, a digest of its images and labels in order (not of its ids): what
    its features depend on."""
    import webdataset as wds

    if sizes is None:
        if shard_size <= 0:
            raise BadInputError(f"--shard-size must be positive, got {shard_size}")
        sizes = [min(shard_size, count - s * shard_size) for s in range(max(1, math.ceil(count / shard_size)))]
    if sum(sizes) != count:
        raise BadInputError(f"shard sizes add up to {sum(sizes)}, not the {count} samples")
    out_dir = Path(out_dir)
    shards, label_counts = [], {}
    it = iter(samples)
    with atomic.atomic_dir(out_dir) as tmp:
        for s, size in enumerate(sizes):
            name = f"shard-{s:06d}.tar"
            gids, content = [], hashlib.sha256()
            with wds.TarWriter(str(tmp / name), encoder=False, mtime=0.0) as sink:
                for gid, blob, label in (next(it) for _ in range(size)):
                    ext = "jpg" if blob[:3] == b"\xff\xd8\xff" else "png"
                    sink.write({"__key__": f"{gid:09d}", ext: blob, "cls": str(int(label)).encode()})
                    gids.append(int(gid))
                    content.update(f"{hashlib.sha256(blob).hexdigest()} {int(label)}\n".encode())
                    label_counts[int(label)] = label_counts.get(int(label), 0) + 1
            shards.append({"name": name, "count": len(gids), "sha256": sha256_file(tmp / name),
                           "first_id": gids[0] if gids else -1, "last_id": gids[-1] if gids else -1,
                           "content": content.hexdigest()})
            if progress:
                progress(len(gids))
        manifest = {"dataset": dataset, "split": split, "task": "classification", "count": int(count),
                    "classes": list(classes), "num_classes": len(classes),
                    "label_counts": {str(k): v for k, v in sorted(label_counts.items())}, **(extra or {}),
                    "shards": shards}
        manifest["checksum"] = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_folder_shards(image_dir, out_dir, *, shard_size: int | None = None, progress=None,
                        files: list[Path] | None = None, check: bool = True) -> dict:
    """Shard a folder of images (``list_images`` order, or ``files``, that listing; id = position, label -1,
    ``paths`` in the manifest) into shards of about ``shard_size`` (None: ``folder_shard_size``), cut by
    ``content_cuts``. Unreadable files fail first, named (``check_images``; ``check`` False: the caller did it);
    the manifest's ``orientation: exif`` has extraction turn photos upright."""
    root = Path(image_dir)
    files = list_images(root, note_skipped=False) if files is None else files
    if check:
        check_images(root, files)
    if shard_size is not None and shard_size <= 0:
        raise BadInputError(f"--shard-size must be positive, got {shard_size}")
    paths = [p.relative_to(root).as_posix() for p in files]
    samples = ((i, p.read_bytes(), -1) for i, p in enumerate(files))
    target = folder_shard_size(len(files)) if shard_size is None else shard_size
    return write_blob_shards(samples, out_dir, dataset=f"folder:{root.name}", split="all", count=len(files),
                             sizes=content_cuts(paths, target),
                             extra={"source": str(root.resolve()), "paths": paths, "orientation": "exif"},
                             progress=progress)


def sample_names(manifest: dict, ids) -> list[str]:
    """What to call the samples ``ids`` of a shard folder: their paths relative to the image folder when the
    manifest has them (``write_folder_shards``), else ``<shard>/<key>`` (where the sample is in the shards)."""
    ids = [int(i) for i in ids]
    paths = manifest.get("paths")
    if paths is not None:
        return [paths[i] for i in ids]
    where = {}
    for s in manifest["shards"]:
        if s.get("count"):
            where[(s["first_id"], s["last_id"])] = s["name"]
    out = []
    for i in ids:
        name = next((n for (a, b), n in where.items() if a <= i <= b), "?")
        out.append(f"{name}/{i:09d}")
    return out


def load_manifest(shard_dir, *, files: bool = True) -> dict:
    """A shard folder's manifest; with ``files``, each shard it lists must be there (``files`` False: only the
    samples' names are wanted, which the manifest holds)."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.exists():
        raise MissingDataError(f"no {MANIFEST} in {shard_dir} (run `python -m launchers.prepare_shards` first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptDataError(f"{path} is not valid JSON: {exc}") from exc
    for s in manifest["shards"] if files else ():
        if not (shard_dir / s["name"]).exists():
            raise MissingDataError(f"shard {shard_dir / s['name']} listed in the manifest is missing")
    return manifest


def verify_shards(shard_dir, names=None) -> None:
    """Check shard files against the manifest's sha256 (a corrupt shard fails before any compute)."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    for s in manifest["shards"]:
        if names is not None and s["name"] not in names:
            continue
        if sha256_file(shard_dir / s["name"]) != s["sha256"]:
            raise CorruptDataError(f"shard {shard_dir / s['name']} does not match its sha256 in the manifest "
                                   "(re-run prepare_shards)")


def rank_shards(manifest: dict, rank: int, world: int) -> list[str]:
    return [s["name"] for i, s in enumerate(manifest["shards"]) if i % world == rank]


def decode_sample(sample: dict) -> tuple:
    """(id, image, label) or, for segmentation shards, (id, image, label, mask)."""
    key = sample["__key__"]
    blob = sample.get("png", sample.get("jpg"))
    if blob is None:
        raise CorruptDataError(f"sample {key} has no png/jpg image")
    out = (int(key), decode_image(blob), int(sample["cls"]))
    if "seg.png" in sample:
        out += (decode_image(sample["seg.png"]),)
    return out


def iter_samples(shard_dir, names: list[str], *, num_workers: int = 0, batch_size: int = 64, ids=None):
    """Yield batches ``(ids, images, labels[, masks])`` from the named shards, in shard order when num_workers=0.

    ``ids`` (optional): keep only these global ids. Workers split the shards (never more workers than
    shards: webdataset would raise "No samples found" in an idle worker).
    """
    import torch
    import webdataset as wds

    shard_dir = Path(shard_dir)
    if not names:
        return
    keep = None if ids is None else set(int(i) for i in ids)
    urls = [str(shard_dir / n) for n in names]

    def wanted(sample):
        return keep is None or int(sample["__key__"]) in keep

    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                         empty_check=False)
          .select(wanted).map(decode_sample))
    workers = min(num_workers, len(urls))

    def collate(batch):
        cols = list(zip(*batch))
        out = (np.asarray(cols[0], np.int64), np.stack(cols[1]), np.asarray(cols[2], np.int64))
        return out + (np.stack(cols[3]),) if len(cols) > 3 else out

    loader = torch.utils.data.DataLoader(ds.batched(batch_size, collation_fn=collate), batch_size=None,
                                         num_workers=workers)
    try:
        yield from loader
    except CorruptDataError:
        raise
    except Exception as exc:  # tarfile / decode errors inside webdataset
        raise CorruptDataError(f"reading shards in {shard_dir} failed: {type(exc).__name__}: {exc}") from exc


def read_all(shard_dir, ids=None) -> tuple:
    """All (or the given) samples of a shard folder, ordered by global id: (ids, images, labels[, masks])."""
    manifest = load_manifest(shard_dir)
    batches = list(iter_samples(shard_dir, [s["name"] for s in manifest["shards"]], ids=ids))
    if not batches:
        raise BadInputError(f"no samples with the requested ids in {shard_dir}")
    cols = [np.concatenate(c) for c in zip(*batches)]
    order = np.argsort(cols[0])
    return tuple(c[order] for c in cols)


def ensure_shards(dataset: str, part: str, split_cfg: dict, work, source=None, write: bool = True) -> Path:
    """The shard folder of one dataset split (``part`` = pool | test, settings ``split_cfg`` = a profile's
    ``split``/``limit``/``subset_seed``/``shard_size``) under ``work``/shards, written if missing.

    The folder name hashes the dataset, source and split settings, so the tables and
    ``python -m launchers.finetune --dataset NAME`` share one copy.
    """
    key = json_digest({"dataset": dataset, "source": str(source), **split_cfg})
    shard_dir = Path(work) / "shards" / f"{dataset}-{part}-{key}"
    if write and not (shard_dir / MANIFEST).exists():
        log.info("writing shards for %s %s -> %s", dataset, part, shard_dir)
        write_shards(dataset, split_cfg.get("split", "train"), shard_dir, source=source, limit=split_cfg.get("limit"),
                     subset_seed=split_cfg.get("subset_seed", 0), shard_size=split_cfg.get("shard_size", 1000))
    return shard_dir
