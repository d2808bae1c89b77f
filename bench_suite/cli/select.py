r"""``python -m bench_suite.cli.select``: run any registered selection method on a feature store, or go from a
folder of images (or a shard folder) to the list of images to annotate in one command.

    python -m bench_suite.cli.select --features STORE_DIR_OR_NPY (--budget B | --ratio R) --method NAME \
        [--seed S] [--objective official|paper] [--set key=value ...] [--labels FILE] --out sel.json
    python -m bench_suite.cli.select --images DIR --encoder NAME --budget B --method activeft --out sel.json \
        [--out-list picks.txt] [--work work_dirs] [--image-size S] [--workers W] [--precision fp32|bf16] \
        [--decode cpu|reduced|device] [--drop-old-shards]
    python -m bench_suite.cli.select --shards DIR --encoder NAME --budget B ... --out sel.json
    python -m bench_suite.cli.select --list

With ``--images``/``--shards`` every stage is cached under ``--work``: the folder's shards (keyed by each
image's relative path, size and modification time, and the shard size), the features (bench_suite.extract's
fingerprint) and the selection (keyed by the features' fingerprint, method, budget, seed and options). A rerun
with the same folder and settings reuses all three; another method, budget or seed reuses the features. A
folder with images added, removed or changed is sharded again (a copy of the folder), but only the shards those
images fall in are extracted again: shards are cut where the paths' hashes say, and a shard whose images are
the same as in an earlier store with these settings has its features copied from there, the same bytes as a
fresh extraction's (``--force`` redoes all the features and the selection). Caches are kept: the shard folders
of a folder's earlier versions (named in the log) are not needed for the reuse, and ``--drop-old-shards``
deletes them once the new features are stored, so that ``--work`` holds one copy of the folder (the feature
stores, a few KB per image, stay); delete ``--work`` to reclaim the rest. The JSON lists the selected images'
paths relative to the folder (``paths``, in the order of ``ids``); ``--out-list`` writes just those paths, one
per line. Shards not made from a folder name their samples ``<shard>/<id>``.

A folder's images are checked before any work: a file that is not a readable image (empty, not an image) stops
the run with one line naming it; one cut short after its header is named when it is decoded. Files without an
image suffix (.jpg .jpeg .png .bmp .webp .tif .tiff; HEIC is not read) are skipped and counted in the log.
Photos are turned upright by their EXIF orientation, as a viewer (and the annotator) shows them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from bench_suite.methods import registry
from bench_suite import atomic, locks
from bench_suite import runtime as bdist
from bench_suite.cli import main_guard, setup_logging
from bench_suite.options import parse_set
from bench_suite.errors import BadInputError, MissingDataError
from bench_suite.methods import Selection, budget_from_ratio, check_budget, run_selection
from bench_suite.digest import json_digest
from bench_suite.data import shards as wshards
from bench_suite.encoders.registry import encoder_names, spec
from bench_suite.store import FeatureStore

log = logging.getLogger("bench_suite.cli.select")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench_suite.cli.select", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (one of)")
    src.add_argument("--features", help="FeatureStore folder or an N x d .npy")
    src.add_argument("--images", help="a folder of images (searched recursively): shards -> features -> selection")
    src.add_argument("--shards", help="a WebDataset shard folder (launchers.prepare_shards): features -> selection")
    ext = p.add_argument_group("features, with --images / --shards")
    ext.add_argument("--encoder", help="encoder name (bench_suite.encoders; an unknown name lists them)")
    ext.add_argument("--image-size", type=int, help="the encoder's input size (default: its own; "
                     "efficientnet_lite0: 112)")
    ext.add_argument("--pooling", choices=["cls", "cls+mean", "gap"])
    ext.add_argument("--weights", help="local checkpoint for encoders that need one (dino_vits16)")
    ext.add_argument("--batch-size", type=int, default=64)
    ext.add_argument("--workers", type=int, help="DataLoader workers per process (default: by device and cores)")
    ext.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ext.add_argument("--decode", choices=["cpu", "reduced", "device"], default="cpu",
                     help="where JPEGs are decoded: cpu (the workers), reduced (the workers, at 1/2-1/8 scale "
                     "keeping twice the input size: 8-11x faster for phone photos, features within cosine ~0.999), "
                     "device (nvJPEG on a GPU)")
    ext.add_argument("--shard-size", type=int, help="images per shard, on average (--images; shards hold half to twice "
                     "that; default: about 1/32 of the folder, a power of two from 64 to 1024, at least the batch)")
    ext.add_argument("--work", default="work_dirs", help="where the stages are cached (default: work_dirs)")
    ext.add_argument("--force", action="store_true", help="recompute the features and the selection")
    ext.add_argument("--drop-old-shards", action="store_true", help="--images: once the features are stored, "
                     "delete the shard folders of the folder's earlier versions under --work (a copy of the folder "
                     "each; their features are still reused; do not point other tools at them meanwhile)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=int, help="how many samples to select")
    g.add_argument("--ratio", type=float, help="or the fraction of the pool to select, in (0, 1]")
    p.add_argument("--method", default="activeft", help="selection method (default: activeft; --list shows all)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same selection (default: 0)")
    p.add_argument("--objective", choices=None, help="ActiveFT objective: official | paper")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="method options, e.g. --set iters=300 temperature=0.07")
    p.add_argument("--labels", help="labels for the AL methods' oracle: an .npy (N,) or 'store'")
    p.add_argument("--out", help="where to write the selection JSON")
    p.add_argument("--out-list", help="also write the selected images' paths, one per line")
    p.add_argument("--list", action="store_true", help="list the registered methods and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load_labels(spec: str | None, store: FeatureStore):
    if spec is None:
        return None
    if spec == "store":
        if store.labels is None:
            raise BadInputError("--labels store: this feature store has no labels.npy")
        return np.asarray(store.labels)
    path = Path(spec)
    if not path.exists():
        raise MissingDataError(f"labels file not found: {path}")
    labels = np.load(path)
    if labels.shape != (store.total_rows,):
        raise BadInputError(f"labels {path} have shape {labels.shape}, the store has {store.total_rows} rows")
    return labels[store.row_offset:store.row_offset + len(store)]


@main_guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.list:
        from rich.console import Console
        from rich.table import Table

        table = Table("method", "label-free", "description")
        for name in registry.names():
            cls = registry.selector_class(name)
            table.add_row(name, "yes" if cls.label_free else "no (oracle)", cls.description)
        Console().print(table)
        return 0
    given = [name for name in ("features", "images", "shards") if getattr(args, name)]
    if len(given) != 1:
        raise BadInputError("give one of --features (a FeatureStore folder or an .npy), --images DIR or --shards DIR"
                            + (f"; got {', '.join('--' + g for g in given)}" if given else ""))
    if args.budget is None and args.ratio is None:
        raise BadInputError("give --budget B or --ratio R")
    if not args.out:
        raise BadInputError("--out is required")
    registry.selector_class(args.method)  # unknown name -> error before any work
    config = parse_set(args.set)
    if args.objective:
        config["objective"] = args.objective
    if args.features:
        d = bdist.init_from_env()
        store, manifest = FeatureStore.open(args.features), None
    else:
        if not args.encoder:
            raise BadInputError(f"--{given[0]} needs --encoder NAME (one of {', '.join(encoder_names())})")
        spec(args.encoder)  # an unknown name fails here, listing the known ones, before any work
        store, manifest = features_of(args)
        d = bdist.init_from_env()  # the extraction's Accelerator already joined the process group, if any
    n = store.total_rows
    budget = budget_of(args, n)
    cache = None if args.features else selection_path(args, store, config, budget)
    cached = cache is not None and not args.force and cache.exists()
    if cached:
        sel = Selection.load(cache)
        log.info("selection cached in %s", cache)
    else:
        labels = load_labels(args.labels, store)
        sel = run_selection(store, args.method, budget, args.seed, config, labels, dist=d)
        if cache is not None and d.is_main:
            sel.save(cache)
    if d.is_main:
        out = sel.to_json()
        names = sample_names(store, sel.ids, required=bool(args.out_list), manifest=manifest)
        if names is not None:  # next to the ids, ahead of the method's long details (a loss curve)
            head = {k: out.pop(k) for k in list(out) if k in ("method", "budget", "seed", "ids")}
            source = str(Path(args.images).resolve()) if args.images else store.meta.get("shards")
            out = {**head, "paths": names, "source": source, **out}
        atomic.write_json(args.out, out)
        if args.out_list and any("\n" in name or "\r" in name for name in names):
            bad = next(name for name in names if "\n" in name or "\r" in name)
            raise BadInputError(f"--out-list: the selected image {wshards.shown(bad)} has a line break in its "
                                f"name, so no list is written; take the paths from {args.out}")
        if args.out_list:
            atomic.write_text(args.out_list, "".join(name + "\n" for name in names))
        log.info("%s selected %d ids %s -> %s%s", args.method, budget,
                 "(cached)" if cached else f"in {sel.seconds:.2f}s", args.out,
                 f" and {args.out_list}" if args.out_list else "")
    return bdist.exit_process(0)  # ends a distributed run without the gloo-at-exit abort


def features_of(args) -> tuple[FeatureStore, dict]:
    """The stages before the selection, each cached under ``--work``: the folder's shards (--images), then the
    features (bench_suite.extract: its fingerprint decides whether the cached store is current). With the shards'
    manifest, which names the samples (read here: a later --drop-old-shards run may delete the folder)."""
    from bench_suite.extract import extract_features
    from bench_suite.runtime import make_accelerator

    work = Path(args.work)
    # Rank 0 holds the shard folder's lock until it holds the features' lock: a --drop-old-shards run leaves a
    # folder under either, so it never deletes one between the two.
    shard_held = contextlib.ExitStack()
    with shard_held:
        if args.images:
            images = Path(args.images)
            first = os.environ.get("RANK", "0") == "0"  # the one process that notes what it skips or finds small
            files = wshards.list_images(images, note_skipped=first)
            budget_of(args, len(files))  # checked before the folder is copied into shards and encoded
            size = (wshards.folder_shard_size(len(files), args.batch_size) if args.shard_size is None
                    else args.shard_size)
            shard_dir = folder_shard_dir(work, images, files, size)
            if not (shard_dir / wshards.MANIFEST).exists():  # on every rank: each stops with the same one line
                wshards.check_images(images, files, warn_small=first)
            acc = make_accelerator()
            if acc.process_index == 0:
                shard_held.enter_context(locks.held(shard_dir.with_name(shard_dir.name + ".lock"), "writing shards"))
                if not (shard_dir / wshards.MANIFEST).exists():
                    manifest = wshards.write_folder_shards(images, shard_dir, shard_size=size, files=files,
                                                           check=False)
                    log.info("%s: %d images -> %d shards in %s", images, manifest["count"],
                             len(manifest["shards"]), shard_dir)
                    if not args.drop_old_shards:
                        note_earlier_shards(shard_dir, manifest["source"])
                else:
                    log.info("shards of %s cached in %s", images, shard_dir)
            acc.wait_for_everyone()
            manifest = wshards.load_manifest(shard_dir)
        else:
            shard_dir = Path(args.shards)
            manifest = wshards.load_manifest(shard_dir)
            budget_of(args, manifest["count"])  # checked before the features are extracted
            acc = make_accelerator()
        image_size = args.image_size or spec(args.encoder).image_size  # the default and the same size: one store
        tag = "-".join(str(v) for v in (args.encoder, image_size, args.pooling or "default", args.precision,
                                        *([args.decode] if args.decode != "cpu" else [])))
        feat_dir = work / "features" / f"{shard_dir.name}-{manifest['checksum'][:8]}-{tag}"
        with contextlib.ExitStack() as feat_held:
            if acc.process_index == 0:
                feat_held.enter_context(locks.held(feat_dir.with_name(feat_dir.name + ".lock"), "extracting features"))
            shard_held.close()
            store = extract_features(shard_dir, feat_dir, encoder=args.encoder, pooling=args.pooling,
                                     image_size=args.image_size, batch_size=args.batch_size, accelerator=acc,
                                     weights=args.weights, num_workers=args.workers, precision=args.precision,
                                     decode=args.decode, force=args.force, reuse=earlier_stores(feat_dir, tag))
    if args.images and args.drop_old_shards and acc.process_index == 0:
        drop_old_shards(shard_dir, manifest["source"])
    return store, manifest


def folder_shard_dir(work: Path, images: Path, files: list[Path], size: int) -> Path:
    """Where an image folder's shards are cached: ``images-<folder name>-<listing key>-<shard size>``."""
    return work / "shards" / f"images-{images.resolve().name}-{wshards.folder_key(images, files)}-{size}"


def listing_key(shard_dir: Path) -> str:
    """The listing key in a ``folder_shard_dir`` name: which version of the folder its shards hold."""
    return shard_dir.name.rsplit("-", 2)[1]


def earlier_shard_folders(shard_dir: Path, source: str) -> list[Path]:
    """The shard folders of the same image folder's earlier versions (another listing key than ``shard_dir``'s;
    not the same version at another shard size): each is a copy of the folder, and the features of their
    unchanged shards are reused without them (the stores' meta says what they held)."""
    key = listing_key(shard_dir)
    found = []
    for other in shard_dir.parent.glob("images-*"):
        try:
            if (other != shard_dir and listing_key(other) != key and not other.is_symlink()
                    and wshards.load_manifest(other, files=False).get("source") == source):
                found.append(other)
        except Exception:  # noqa: BLE001 - not a complete shard folder, or one deleted meanwhile: not counted
            continue
    return sorted(found)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.tar"))


def note_earlier_shards(shard_dir: Path, source: str) -> None:
    """Log the shard folders of the image folder's earlier versions: what --drop-old-shards would delete."""
    others = earlier_shard_folders(shard_dir, source)
    if others:
        names = ", ".join(d.name for d in others[:3]) + (", ..." if len(others) > 3 else "")
        log.info("%d shard folders of %s's earlier versions (%.1f GB) are in %s (%s): the features of their "
                 "unchanged shards are reused without them; --drop-old-shards deletes them", len(others), source,
                 sum(map(folder_bytes, others)) / 1e9, shard_dir.parent, names)


def drop_old_shards(shard_dir: Path, source: str) -> None:
    """--drop-old-shards: delete the shard folders of the image folder's earlier versions, once the current
    store is complete, so that ``--work`` holds one copy of the folder. Their feature stores stay (a few KB per
    image) and are still reused. A folder that another select run is writing or extracting (a lock held) is
    left; one is renamed away before it is deleted, so that no run sees it half gone (``atomic.remove_dir``).
    Best effort: a folder that cannot be deleted is named in a warning, and the run goes on."""
    dropped, size = [], 0
    atomic.sweep_stale_in(shard_dir.parent)  # what a killed deletion left
    features = shard_dir.parent.parent / "features"
    for other in earlier_shard_folders(shard_dir, source):
        lock = other.with_name(other.name + ".lock")
        if not locks.try_lock(lock):
            log.info("left %s: another run is writing it", other)
            continue
        try:
            readers = [f for f in features.glob(f"{other.name}-*.lock") if not locks.is_stale(f)]
            if readers:
                log.info("left %s: another run is extracting its features (%s)", other, readers[0])
            elif (other / wshards.MANIFEST).is_file():  # else another run dropped it meanwhile
                bytes_ = folder_bytes(other)
                atomic.remove_dir(other)
                dropped.append(other.name)
                size += bytes_
        except OSError as exc:
            log.warning("could not delete %s (%s: %s); left as it is", other, type(exc).__name__, exc)
        finally:
            locks.release(lock)
    if dropped:
        log.info("deleted %d shard folders of %s's earlier versions (%.1f GB): %s", len(dropped), source,
                 size / 1e9, ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else ""))


def earlier_stores(feat_dir: Path, tag: str) -> list[Path]:
    """The other feature stores under ``--work`` with these extraction settings, newest first: where the features
    of a folder's unchanged shards are taken from when the folder changed (bench_suite.extract checks each)."""
    found = [p for p in feat_dir.parent.glob(f"*-{tag}") if p != feat_dir and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: (p / "meta.json").stat().st_mtime_ns, reverse=True)


def budget_of(args, n: int) -> int:
    """``--budget`` (checked against the pool of ``n``) or ``--ratio`` of it; also called before any shards are
    written or features extracted, so that a bad budget stops the run at once."""
    return check_budget(args.budget, n) if args.budget is not None else budget_from_ratio(args.ratio, n)


def selection_path(args, store: FeatureStore, config: dict, budget: int) -> Path:
    """Where the selection of these features, method, budget, seed and options is cached."""
    key = json_digest({"features": store.meta.get("fingerprint") or store.checksum(), "method": args.method,
                       "budget": budget, "seed": args.seed, "config": config, "labels": args.labels})
    return Path(args.work) / "selections" / f"{args.method}-{budget}-{key}.json"


def sample_names(store: FeatureStore, ids, *, required: bool, manifest: dict | None = None) -> list[str] | None:
    """The selected samples' paths relative to the image folder (or ``<shard>/<id>``), from ``manifest`` or the
    manifest of the store's shard folder; None when the store records none (an .npy), an error if ``required``."""
    if manifest is None:
        shard_dir = (store.meta or {}).get("shards")
        if not shard_dir or not (Path(shard_dir) / wshards.MANIFEST).exists():
            if required:
                raise BadInputError("--out-list needs a feature store that records its shard folder (made by "
                                    "--images, --shards or bench_suite.cli.features)")
            return None
        manifest = wshards.load_manifest(shard_dir, files=False)
    return wshards.sample_names(manifest, ids)


if __name__ == "__main__":
    main()
