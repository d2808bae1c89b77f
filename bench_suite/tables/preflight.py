"""Checks before a table runs: every name exists, the data can be read, and what the cache already holds.

``check_names`` runs before every table (a typo fails in a second, before any shard or feature is made);
``run.py --check`` runs ``check`` as well and stops: it reads the profile, the datasets' sources, the
cached shards (sha256 against their manifests) and features, and counts the cells already computed,
without computing anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench_suite.data.registry import get_dataset
from bench_suite.data.shards import MANIFEST, ensure_shards, verify_shards
from bench_suite.digest import json_digest
from bench_suite.encoders.registry import spec as encoder_spec
from bench_suite.errors import MissingDataError
from bench_suite.methods import registry
from bench_suite.profiles import EncoderRef, Profile
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
    return lines


def _cell_lines(profile: Profile, table: str, work: Path, stores: dict) -> list[str]:
    ctx = Context(profile, work, work, None)
    cached = known = 0
    cells = build_cells(profile, table)
    for enc in _encoders(profile, table):
        for cell in cells:
            key = (cell["dataset"], "pool", enc.name, enc.image_size, enc.pooling)
            test_key = (cell["dataset"], "test", enc.name, enc.image_size, enc.pooling)
            if key not in stores or test_key not in stores:
                continue
            known += 1
            digest = json_digest(cell_cache.cell_key(ctx, cell, stores[key], stores[test_key]))
            cached += (work / "cells" / f"v{cell_cache.CELL_VERSION}" / f"{digest}.json").exists()
    total = len(cells) * len(_encoders(profile, table))
    return [f"cells: {total} in the table; {cached} cached, {total - cached} to compute"
            + ("" if known == total else f" ({total - known} not keyed yet: their features are not extracted)")]
