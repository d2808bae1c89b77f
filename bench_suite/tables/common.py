"""Machinery shared by the tables: cached data preparation, cached cells spread over ranks, recipes.

Every stage output is content-addressed (shards by their manifest, features by a fingerprint of shards +
encoder + pooling, cells by a hash of everything that determines them), so an interrupted table resumes
where it stopped and an unchanged cell is never recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from bench_suite import atomic
from bench_suite.data.shards import ensure_shards
from bench_suite.digest import ids_digest, json_digest
from bench_suite.errors import BadInputError
from bench_suite.extract import extract_features
from bench_suite.finetune.launch import recipe_fn
from bench_suite.finetune.recipes import resolve_named
from bench_suite.methods import budget_from_ratio, registry, run_selection
from bench_suite.metrics import selection_emd
from bench_suite.profiles import EncoderRef, Profile
from bench_suite.runtime import Runtime
from bench_suite.store import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class Context:
    profile: Profile
    work: Path  # shards, features, cell cache
    out: Path  # reports
    accelerator: object
    sources: dict = field(default_factory=dict)  # dataset -> local source path (paper datasets)
    quiet: bool = False
    cells_computed: int = 0  # by this run (the rest came from the cache)
    cells_total: int = 0

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
    split = getattr(ctx.profile.dataset(dataset), part)
    shard_dir = ensure_shards(dataset, part, dataclasses.asdict(split), ctx.work, ctx.sources.get(dataset),
                              write=ctx.rank == 0)
    ctx.accelerator.wait_for_everyone()
    enc = encoder or ctx.profile.encoder
    feat_dir = ctx.work / "features" / f"{shard_dir.name}-{enc.name}-{enc.image_size}-{enc.pooling}"
    return extract_features(shard_dir, feat_dir, encoder=enc.name, pooling=enc.pooling, image_size=enc.image_size,
                            batch_size=ctx.profile.extraction.batch_size, accelerator=ctx.accelerator,
                            weights=enc.weights, progress=not ctx.quiet)


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


def initial_set_size(method: str, config: dict, n: int) -> int:
    """The random initial set an active-learning method buys before its first round (0 for one-shot methods)."""
    selector = registry.get(method, **(config or {}))
    return selector.sizes(n)[0] if hasattr(selector, "sizes") else 0


def run_cells(ctx: Context, cells: list[dict], stores: dict, progress=None, encoder: dict | None = None) -> list[dict]:
    """Run every cell (cached); cells are dealt round robin to ranks; all ranks return all results.

    The cache is shared by all tables and keyed by what determines a cell's numbers (not its row label), so a
    cell that two tables share (ActiveFT at tau = 0.07 in Tables 1 and 6, when the config is written the same
    way: the profile's config merged with the variant's) runs once. A cell whose budget does
    not exceed an active-learning method's initial random set is recorded as skipped (the paper's "-").
    """
    cache = ctx.work / "cells" / "v2"
    keyed = []
    for cell in cells:
        train, test = stores[cell["dataset"]]
        full = {**{k: v for k, v in cell.items() if k != "variant"},
                "train": train.meta.get("fingerprint") or train.checksum(),
                "test": test.meta.get("fingerprint") or test.checksum()}
        keyed.append((cell, cache / f"{json_digest(full)}.json"))
    single = Runtime()  # a cell is one process's work; ranks share the grid, not a cell
    computed = 0
    for i, (cell, path) in enumerate(keyed):
        if i % ctx.world != ctx.rank or path.exists():
            if progress and ctx.rank == 0:
                progress(cell, None)
            continue
        train, test = stores[cell["dataset"]]
        budget = budget_from_ratio(cell["ratio"], len(train))
        init = initial_set_size(cell["method"], cell.get("method_config"), len(train))
        if budget <= init:
            result = {**cell, "budget": budget, "skipped": f"budget {budget} <= the initial random set ({init})"}
            atomic.write_json(path, result)
            if progress and ctx.rank == 0:
                progress(cell, None)
            continue
        sel = run_selection(train, cell["method"], budget, cell["seed"], cell.get("method_config"),
                            labels=train.labels, dist=single)
        recipe, _ = get_recipe(ctx, cell["recipe"], encoder)
        metrics = recipe(train, sel.ids, test, cell["seed"])
        rows = train.rows_of_ids(sel.ids)
        result = {**cell, "budget": budget, "selection_seconds": sel.seconds,
                  "emd": selection_emd(train.features, rows), **{k: v for k, v in metrics.items() if k != "seed"},
                  "selection_info": {k: v for k, v in sel.info.items() if k != "loss_curve"},
                  "ids_sha": ids_digest(sel.ids)}
        atomic.write_json(path, result)
        computed += 1
        if progress and ctx.rank == 0:
            progress(cell, result)
    ctx.accelerator.wait_for_everyone()
    if ctx.world > 1:
        from accelerate.utils import gather_object

        computed = sum(gather_object([computed]))
    ctx.cells_computed += computed
    ctx.cells_total += len(keyed)
    results = []
    for cell, path in keyed:
        if not path.exists():
            raise BadInputError(f"cell result {path} is missing after the run (a rank failed?)")
        results.append({**json.loads(path.read_text()), "variant": cell.get("variant")})
    return results
