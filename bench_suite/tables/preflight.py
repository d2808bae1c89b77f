"""Checks before a table runs: every name exists, the data can be read, and what the cache already holds.

``check_names`` runs before every table (a typo fails in a second, before any shard or feature is made);
``run.py --check`` runs ``check`` as well and stops: it reads the profile, the datasets' sources, the
cached shards (sha256 against their manifests) and features, and counts the cells already computed,
without computing anything.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench_suite.data.registry import get_dataset
from bench_suite.data.shards import MANIFEST, ensure_shards, verify_shards
from bench_suite.digest import json_digest
from bench_suite.encoders.registry import spec as encoder_spec
from bench_suite.errors import MissingDataError
from bench_suite.finetune.recipes import epochs_for
from bench_suite.methods import budget_from_ratio, registry
from bench_suite.profiles import EncoderRef, Profile
from bench_suite.report import selection_cost
from bench_suite.progress import duration
from bench_suite.store import FeatureStore
from bench_suite.tables import cells as cell_cache
from bench_suite.tables.common import Context, recipe_settings
from bench_suite.tables.grid import build_cells


def check_names(profile: Profile, table: str) -> None:
    """Every name the table's settings use (datasets, recipes, methods and their options, encoders) exists."""
    t = profile.table(table)
    for d in t.cells:
        profile.dataset(d)
        get_dataset(d)
    for recipe in [t.recipe, *t.recipe_by_dataset.values(), *[e.recipe for e in t.encoders if e.recipe]]:
        recipe_settings(profile, recipe)
    seen = set()
    for cell in build_cells(profile, table):  # each row's options on each dataset (datasets.D.methods)
        key = (cell["method"], repr(sorted(cell["method_config"].items())))
        if key not in seen:
            seen.add(key)
            registry.get(cell["method"], **cell["method_config"])
    for enc in [profile.encoder, t.encoder, *[e.encoder for e in t.encoders]]:
        if enc is not None:
            encoder_spec(enc.name)


def _encoders(profile: Profile, table: str) -> list[EncoderRef]:
    return [enc for enc, _ in _sub_tables(profile, table)]


def _sub_tables(profile: Profile, table: str) -> list[tuple[EncoderRef, Profile]]:
    """(encoder, the profile as that encoder's grid sees it): one per Table-4 encoder, else the table's own."""
    t = profile.table(table)
    return ([(e.encoder, profile.with_encoder(table, e.encoder, e.recipe)) for e in t.encoders]
            or [(profile.encoder_of(table), profile)])


def check(profile: Profile, table: str, work: Path, sources: dict) -> list[str]:
    """One line per dataset split and per encoder: source, shards, features, cached cells. Raises on a
    missing source or a damaged shard."""
    return _check(profile, table, work, sources)[0]


def _check(profile: Profile, table: str, work: Path, sources: dict,
           require_sources: bool = True) -> tuple[list[str], dict]:
    """``check``'s lines, and the feature stores already extracted, by (dataset, part, encoder, size, pooling);
    without ``require_sources`` a dataset whose source is not given is planned from its official sizes."""
    lines = [f"profile {profile.name}, table {table}: names, options and recipes are valid"]
    t = profile.table(table)
    stores = {}
    for d in t.cells:
        ds = get_dataset(d)
        if ds.needs_source and d not in sources:
            if not require_sources:
                lines.append(f"{d}: no --source given (planned from its official split sizes)")
                continue
            raise MissingDataError(f"dataset {d} converts from a local copy: pass --source {d}=PATH ({ds.install_hint})")
        if d in sources and not Path(sources[d]).exists():
            raise MissingDataError(f"--source {d}={sources[d]}: no such file or folder")
        for part in ("pool", "test"):
            split = dataclasses.asdict(getattr(profile.dataset(d), part))
            shard_dir = ensure_shards(d, part, split, work, sources.get(d), write=False)
            if not (shard_dir / MANIFEST).exists():
                lines.append(f"{d} {part}: shards not written yet ({shard_dir})")
                continue
            verify_shards(shard_dir)
            lines.append(f"{d} {part}: shards cached and intact ({shard_dir})")
            for enc in _encoders(profile, table):
                feat_dir = work / "features" / f"{shard_dir.name}-{enc.name}-{enc.image_size}-{enc.pooling}"
                if (feat_dir / "features.npy").exists():
                    stores[(d, part, enc.name, enc.image_size, enc.pooling)] = FeatureStore.open(feat_dir)
                    lines.append(f"{d} {part} {enc.name}: features cached ({feat_dir})")
                else:
                    lines.append(f"{d} {part} {enc.name}: features not extracted yet")
    lines += _cell_lines(profile, table, work, stores)
    return lines, stores



def _cell_states(profile: Profile, table: str, work: Path, stores: dict) -> list[tuple[EncoderRef, dict, str]]:
    """Each cell of the table (per encoder, for Table 4) with its state: ``cached``, ``to compute``, or ``not
    keyed`` (its features are not extracted yet, so its key, and whether it is cached, cannot be known)."""
    out = []
    for enc, sub in _sub_tables(profile, table):
        ctx = Context(sub, work, work, None)
        for cell in build_cells(sub, table):
            key = (cell["dataset"], "pool", enc.name, enc.image_size, enc.pooling)
            test_key = (cell["dataset"], "test", enc.name, enc.image_size, enc.pooling)
            if key not in stores or test_key not in stores:
                out.append((enc, cell, "not keyed"))
                continue
            digest = json_digest(cell_cache.cell_key(ctx, cell, stores[key], stores[test_key]))
            path = work / "cells" / f"v{cell_cache.CELL_VERSION}" / f"{digest}.json"
            out.append((enc, cell, "cached" if path.exists() else "to compute"))
    return out


def _cell_lines(profile: Profile, table: str, work: Path, stores: dict) -> list[str]:
    states = [s for _, _, s in _cell_states(profile, table, work, stores)]
    total, cached, unknown = len(states), states.count("cached"), states.count("not keyed")
    return [f"cells: {total} in the table; {cached} cached, {total - cached} to compute"
            + ("" if not unknown else f" ({unknown} not keyed yet: their features are not extracted)")]


def recorded_seconds(work: Path) -> dict:
    """Seconds per cell (selection cost, ``report.selection_cost``, + evaluation) that earlier runs recorded in ``work``'s cell cache, by
    (method, dataset, ratio), (method, dataset) and (method,): the estimate falls back from the first to
    the last."""
    times: dict = {}
    for path in (work / "cells").glob("v*/*.json"):
        try:
            c = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if c.get("skipped") or "selection_seconds" not in c:
            continue
        s = selection_cost(c) + float(c.get("seconds") or 0.0)
        for k in ((c["method"], c["dataset"], c["ratio"]), (c["method"], c["dataset"]), (c["method"],)):
            times.setdefault(k, []).append(s)
    return {k: sum(v) / len(v) for k, v in times.items()}


def _estimate(times: dict, cell: dict) -> float | None:
    for k in ((cell["method"], cell["dataset"], cell["ratio"]), (cell["method"], cell["dataset"]), (cell["method"],)):
        if k in times:
            return times[k]
    return None


def dry_run(profile: Profile, table: str, work: Path, sources: dict) -> list[str]:
    """``check``, then the grid: per dataset and ratio, each row's cached / total cells, and an estimate of the
    time the missing cells will take from the per-cell times that earlier runs recorded in ``work``."""
    lines, stores = _check(profile, table, work, sources)
    times = recorded_seconds(work)
    groups: dict = {}
    for _, cell, state in _cell_states(profile, table, work, stores):
        groups.setdefault((cell["dataset"], cell["ratio"]), {}).setdefault(cell.get("variant") or cell["method"],
                                                                           []).append((cell, state))
    total_s, unestimated = 0.0, 0
    lines.append("grid (cached/total per row; ~ the estimated time of the rest):")
    for (dataset, ratio), rows in groups.items():
        parts = []
        for label, cells in rows.items():
            todo = [c for c, s in cells if s != "cached"]
            est = [_estimate(times, c) for c in todo]
            known = [e for e in est if e is not None]
            total_s += sum(known)
            unestimated += len(est) - len(known)
            part = f"{label} {len(cells) - len(todo)}/{len(cells)}"
            if todo:
                part += f" ~{duration(sum(known))}" if len(known) == len(est) else " ~?"
            parts.append(part)
        lines.append(f"  {dataset} {ratio:g}: " + ", ".join(parts))
    lines.append(f"estimated time for the cells to compute: {duration(total_s)}"
                 + (f", plus {unestimated} cells with no recorded time (~?)" if unestimated else "")
                 + " (from the per-cell times recorded in this work folder; feature extraction not included)")
    return lines


def _pool_size(profile: Profile, dataset: str, stores: dict, encoder: EncoderRef) -> tuple[int | None, str]:
    """The pool's size and where it comes from: the extracted store, else the dataset's official split size
    (capped by the profile's ``limit``), else unknown until the shards exist."""
    store = stores.get((dataset, "pool", encoder.name, encoder.image_size, encoder.pooling))
    if store is not None:
        return len(store), "feature store"
    split = profile.dataset(dataset).pool
    official = get_dataset(dataset).split_sizes.get(split.split)
    if official is None:
        return (split.limit, "profile limit") if split.limit else (None, "unknown until the shards exist")
    return (min(official, split.limit), "profile limit") if split.limit else (official, "official split size")


def plan(profile: Profile, table: str, work: Path, sources: dict) -> list[dict]:
    """Every cell of the table as it will run: dataset, ratio, pool size, budget, seed; the method with its
    fully resolved options (device as given and as this machine resolves it; the active-learning protocol and
    task model); the recipe, fully resolved; whether the cell is cached. ``run.py --dry-run --json``."""
    _, stores = _check(profile, table, work, sources, require_sources=False)
    out = []
    for enc, cell, state in _cell_states(profile, table, work, stores):
        n, n_from = _pool_size(profile, cell["dataset"], stores, enc)
        selector = registry.get(cell["method"], **cell["method_config"])
        budget = budget_from_ratio(cell["ratio"], n) if n else None
        entry = {"table": table, "encoder": dataclasses.asdict(enc), "dataset": cell["dataset"],
                 "ratio": cell["ratio"], "pool_size": n, "pool_size_from": n_from, "budget": budget,
                 "seed": cell["seed"], "method": cell["method"], "row": cell["variant"],
                 "label_free": selector.label_free, "options": selector.config(),
                 "device": str(selector.device()), "method_version": selector.version,
                 "recipe_name": cell["recipe"], "recipe": recipe_settings(profile, cell["recipe"]),
                 "cached": state == "cached", "state": state}
        if entry["recipe"]["kind"] != "linear_probe":  # the epochs this cell trains (ImageNet: by ratio)
            entry["epochs"] = epochs_for(entry["recipe"], budget / n if n else cell["ratio"])
        opts = entry["options"]
        if "task_model" in opts:  # the AL methods' model of each round: DeiT-S finetuned, or a head on features
            entry["task_model"] = {"model": opts["task_model"], "recipe": opts.get("task_recipe_settings") if
                                   opts["task_model"] == "finetune" else
                                   {k: v for k, v in opts.items() if k.startswith("head_")}}
        if not selector.label_free and n:
            init = selector.initial_set(n)
            entry["al_initial_set"] = init
            if budget is not None and budget <= init:
                entry["skipped"] = f"budget {budget} <= the initial random set ({init})"
        out.append(entry)
    return out
