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
from bench_suite.methods import registry
from bench_suite.profiles import EncoderRef, Profile
from bench_suite.progress import duration
from bench_suite.store import FeatureStore
from bench_suite.tables import cells as cell_cache
from bench_suite.tables.common import Context, recipe_settings
from bench_suite.tables.grid import build_cells, rows_of


def check_names(profile: Profile, table: str) -> None:
    """Every name the table's settings use (datasets, recipes, methods and their options, encoders) exists."""
    t = profile.table(table)
    for d in t.cells:
        profile.dataset(d)
        get_dataset(d)
    for recipe in [t.recipe, *t.recipe_by_dataset.values()]:
        recipe_settings(profile, recipe)
    for row in rows_of(profile, table):
        registry.get(row["method"], **row["config"])
    for enc in [profile.encoder, t.encoder, *[e.encoder for e in t.encoders]]:
        if enc is not None:
            encoder_spec(enc.name)


def _encoders(profile: Profile, table: str) -> list[EncoderRef]:
    t = profile.table(table)
    return [e.encoder for e in t.encoders] or [profile.encoder_of(table)]


def check(profile: Profile, table: str, work: Path, sources: dict) -> list[str]:
    """One line per dataset split and per encoder: source, shards, features, cached cells. Raises on a
    missing source or a damaged shard."""
    return _check(profile, table, work, sources)[0]


def _check(profile: Profile, table: str, work: Path, sources: dict) -> tuple[list[str], dict]:
    """``check``'s lines, and the feature stores already extracted, by (dataset, part, encoder, size, pooling)."""
    lines = [f"profile {profile.name}, table {table}: names, options and recipes are valid"]
    t = profile.table(table)
    stores = {}
    for d in t.cells:
        ds = get_dataset(d)
        if ds.needs_source and d not in sources:
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



def _cell_states(profile: Profile, table: str, work: Path, stores: dict) -> list[tuple[dict, str]]:
    """Each cell of the table with its state: ``cached``, ``to compute``, or ``not keyed`` (its features are
    not extracted yet, so its key, and whether it is cached, cannot be known)."""
    ctx = Context(profile, work, work, None)
    out = []
    for enc in _encoders(profile, table):
        for cell in build_cells(profile, table):
            key = (cell["dataset"], "pool", enc.name, enc.image_size, enc.pooling)
            test_key = (cell["dataset"], "test", enc.name, enc.image_size, enc.pooling)
            if key not in stores or test_key not in stores:
                out.append((cell, "not keyed"))
                continue
            digest = json_digest(cell_cache.cell_key(ctx, cell, stores[key], stores[test_key]))
            path = work / "cells" / f"v{cell_cache.CELL_VERSION}" / f"{digest}.json"
            out.append((cell, "cached" if path.exists() else "to compute"))
    return out


def _cell_lines(profile: Profile, table: str, work: Path, stores: dict) -> list[str]:
    states = [s for _, s in _cell_states(profile, table, work, stores)]
    total, cached, unknown = len(states), states.count("cached"), states.count("not keyed")
    return [f"cells: {total} in the table; {cached} cached, {total - cached} to compute"
            + ("" if not unknown else f" ({unknown} not keyed yet: their features are not extracted)")]


def recorded_seconds(work: Path) -> dict:
    """Seconds per cell (selection + evaluation) that earlier runs recorded in ``work``'s cell cache, by
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
        s = float(c["selection_seconds"]) + float(c.get("seconds") or 0.0)
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
    for cell, state in _cell_states(profile, table, work, stores):
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
