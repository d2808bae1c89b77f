"""What a table needs on SLURM: its feature stores, its cells, and which cells are cached already.

A cell is named by ``cell_id``: a digest of what the profile says about it (dataset, ratio, method and its
options, seed, recipe) and of its encoder. Unlike the cache key (``tables.cells.cell_key``), it is known
before any feature exists, so a submission can list its cells before stage 1 has extracted anything, and
the report can say which array task a missing cell was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from bench_suite.data.shards import ensure_shards
from bench_suite.digest import json_digest
from bench_suite.profiles import EncoderRef, Profile
from bench_suite.store import FeatureStore
from bench_suite.tables import cells as cell_cache
from bench_suite.tables.common import Context
from bench_suite.tables.grid import build_cells

IDENTITY = ("dataset", "ratio", "method", "method_config", "seed", "recipe")


def encoders_of(profile: Profile, table: str) -> list[EncoderRef]:
    """The encoders a table extracts with: one, or Table 4's one per sub-table."""
    t = profile.table(table)
    return [e.encoder for e in t.encoders] or [profile.encoder_of(table)]


def cell_id(cell: dict, encoder: EncoderRef | dict) -> str:
    enc = encoder if isinstance(encoder, dict) else dataclasses.asdict(encoder)
    return json_digest({**{k: cell.get(k) for k in IDENTITY}, "encoder": enc})[:20]


def feature_dir(profile: Profile, work: Path, sources: dict, dataset: str, part: str, enc: EncoderRef) -> Path:
    """Where ``tables.common.prepare_split`` puts (or finds) these features."""
    split = dataclasses.asdict(getattr(profile.dataset(dataset), part))
    shard_dir = ensure_shards(dataset, part, split, work, sources.get(dataset), write=False)
    return work / "features" / f"{shard_dir.name}-{enc.name}-{enc.image_size}-{enc.pooling}"


@dataclass
class TablePlan:
    table: str
    cells: list[dict]  # {"id", "cell", "encoder" (asdict), "cached": bool | None (None: features not there yet)}
    missing_features: list[str]  # "dataset part encoder" not extracted yet

    @property
    def to_compute(self) -> list[dict]:
        return [c for c in self.cells if not c["cached"]]


def stores_of(profile: Profile, table: str, work: Path, sources: dict) -> tuple[dict, list[str]]:
    """The table's extracted feature stores by (dataset, part, encoder name, size, pooling), and the names of
    those not extracted yet."""
    stores, missing = {}, []
    for enc in encoders_of(profile, table):
        for d in profile.table(table).cells:
            for part in ("pool", "test"):
                fdir = feature_dir(profile, work, sources, d, part, enc)
                if (fdir / "features.npy").exists() and (fdir / "meta.json").exists():
                    stores[(d, part, enc.name, enc.image_size, enc.pooling)] = FeatureStore.open(fdir)
                else:
                    missing.append(f"{d} {part} {enc.name}")
    return stores, missing


def plan_table(profile: Profile, table: str, work: Path, sources: dict) -> TablePlan:
    """Every cell of the table (in the order the table runs them) and whether its result is cached."""
    stores, missing = stores_of(profile, table, work, sources)
    ctx = Context(profile, work, work, None)
    cache = work / "cells" / f"v{cell_cache.CELL_VERSION}"
    out = []
    for enc in encoders_of(profile, table):
        for cell in build_cells(profile, table):
            pool = stores.get((cell["dataset"], "pool", enc.name, enc.image_size, enc.pooling))
            test = stores.get((cell["dataset"], "test", enc.name, enc.image_size, enc.pooling))
            cached = None
            if pool is not None and test is not None:
                key = cell_cache.cell_key(ctx, cell, pool, test)
                cached = (cache / f"{json_digest(key)}.json").exists()
            out.append({"id": cell_id(cell, enc), "cell": cell, "encoder": dataclasses.asdict(enc), "cached": cached})
    return TablePlan(table, out, missing)
