"""What the tables share: the run's context, cached data preparation (shards, then features), recipes.

Every stage output is content-addressed (shards by their dataset and split settings, features by a
fingerprint of shards + encoder + pooling + extraction version; cells, in ``cells``, by everything that
decides them), so an interrupted table resumes where it stopped and an unchanged cell is never recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_suite import locks
from bench_suite.data.shards import ensure_shards
from bench_suite.extract import extract_features
from bench_suite.finetune.launch import recipe_fn
from bench_suite.finetune.recipes import resolve_named
from bench_suite.profiles import EncoderRef, Profile
from bench_suite.store import FeatureStore

log = logging.getLogger(__name__)


class FreshSet:
    """What a ``--fresh`` launch has recomputed (cell results, active-learning runs), seen by all its ranks.

    Every rank walks the whole grid (``cells.run_cells``), so a rank must know that a result another rank just
    wrote belongs to this launch and is not one of the stale ones ``--fresh`` ignores. Each path added gets a
    marker file under ``<work>/.fresh/<tag>/`` (``tag``: one per launch, from rank 0); without a tag (one
    process) it is a plain set."""

    def __init__(self, work: Path, tag: str | None = None):
        self.dir = Path(work) / ".fresh" / tag if tag else None
        self._mine: set = set()

    def _marker(self, path) -> Path:
        return self.dir / hashlib.sha256(str(Path(path)).encode()).hexdigest()[:24]

    def add(self, path) -> None:
        self._mine.add(Path(path))
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._marker(path).touch()

    def __contains__(self, path) -> bool:
        return Path(path) in self._mine or (self.dir is not None and self._marker(path).exists())

    def remove_markers(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Context:
    profile: Profile
    work: Path  # shards, features, cell cache
    out: Path  # reports
    accelerator: object
    sources: dict = field(default_factory=dict)  # dataset -> local source path (paper datasets)
    quiet: bool = False
    fresh: bool = False  # recompute every cell, ignoring the cache
    revision: str = "unknown"  # the git revision this run computes at (recorded in each cell)
    cells_computed: int = 0  # by this run
    cells_cached: int = 0  # found in --work
    cells_skipped: int = 0  # the paper's "-": budget within an AL method's initial random set
    cells_total: int = 0
    # cells and AL runs a --fresh run already recomputed (shared by two tables, and by the ranks: FreshSet)
    fresh_done: set | FreshSet = field(default_factory=set)
    # collect only (the SLURM report stage): a cell that is not cached is not computed; its record is the
    # cell's fields plus missing_cell(cell, encoder) (its failure: SLURM state and log)
    missing_cell: object = None
    # where this run's wall time went (report.time_by_stage): seconds per stage ("shards", "features", "cells",
    # "report"), how many shard folders / feature stores were made vs found cached, and the cache-file digests of
    # the cells this run computed (every rank's). A dict, so a table's sub-contexts (Table 4) add to the same.
    timing: dict = field(default_factory=dict)

    def add_time(self, stage: str, seconds: float, count: str | None = None) -> None:
        self.timing[stage] = self.timing.get(stage, 0.0) + float(seconds)
        if count:
            self.timing[count] = self.timing.get(count, 0) + 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def prepare_split(ctx: Context, dataset: str, part: str, encoder: EncoderRef | None = None) -> FeatureStore:
    """Shards (rank 0 writes them once) then features (all ranks extract) of ``part`` = pool | test.

    ``encoder`` defaults to the profile's; Table 4 passes its own.
    """
    split = dataclasses.asdict(getattr(ctx.profile.dataset(dataset), part))
    source = ctx.sources.get(dataset)
    t0 = time.perf_counter()
    shard_dir = ensure_shards(dataset, part, split, ctx.work, source, write=False)
    had = (shard_dir / "manifest.json").exists()
    if ctx.rank == 0:  # another run sharing --work may be writing the same shards: one writer at a time
        with locks.held(shard_dir.with_name(shard_dir.name + ".lock"), "writing shards"):
            ensure_shards(dataset, part, split, ctx.work, source, write=True)
    ctx.accelerator.wait_for_everyone()
    ctx.add_time("shards", time.perf_counter() - t0, "shards_cached" if had else "shards_made")
    enc = encoder or ctx.profile.encoder
    feat_dir = ctx.work / "features" / f"{shard_dir.name}-{enc.name}-{enc.image_size}-{enc.pooling}"
    lock = feat_dir.with_name(feat_dir.name + ".lock")
    t0 = time.perf_counter()
    had = (feat_dir / "meta.json").exists()
    with locks.held(lock, "extracting features") if ctx.rank == 0 else contextlib.nullcontext():
        store = extract_features(shard_dir, feat_dir, encoder=enc.name, pooling=enc.pooling,
                                 image_size=enc.image_size, batch_size=ctx.profile.extraction.batch_size,
                                 accelerator=ctx.accelerator, weights=enc.weights, progress=not ctx.quiet)
    ctx.add_time("features", time.perf_counter() - t0, "features_cached" if had else "features_made")
    return store


def recipe_settings(profile: Profile, name: str) -> dict:
    """The fully resolved recipe ``name`` of a profile (an unknown name is an error listing the known ones)."""
    return resolve_named(name, profile.recipes)


def get_recipe(ctx: Context, name: str, encoder: EncoderRef | None = None):
    """A recipe as ``fn(train_store, ids, test_store, seed) -> metrics``, and the resolved recipe: the catalogue's
    entry overridden by the profile's (``resolve_named``); finetuning starts from ``encoder`` (the table's,
    else the profile's)."""
    recipe = recipe_settings(ctx.profile, name)
    return recipe_fn(name, recipe, encoder=encoder or ctx.profile.encoder, work_dir=ctx.work / "finetune",
                     progress=not ctx.quiet), recipe
