"""Table cells: one (dataset, ratio, method, seed, recipe) each, computed once and cached by what decides it.

The key of a cell (``cell_key``) covers everything that decides its numbers, so changing any one of them
recomputes the cell and nothing stale is ever reported:

- the pool and the test set: their feature fingerprints (the shards' content checksum, which covers the
  dataset subset; the encoder with the sha256 of its weights, the image size; the pooling; the extraction
  code's version);
- the method's fully resolved options (defaults included) and the method's ``version``;
- the recipe's fully resolved settings and its kind's version (``finetune.recipes.KIND_VERSIONS``);
- the seed, the ratio, and ``CELL_VERSION`` (this module's bookkeeping: budget rule, EMD, skipped cells).

Why version constants and not a hash of the source files: a cell of the paper profile is a 1000-epoch
finetune, and a hash would throw them all away on any edit (a comment, a refactor). A constant is bumped when
behaviour changes; ``tests/test_code_versions.py`` keeps each constant honest by failing when the source it
stands for changes while the constant does not.

Each result records the git revision it was computed at, and its key. Two ``run.py`` processes sharing a
work folder never compute the same cell at once: a cell is claimed with a lock file (``bench_suite.locks``:
a lock whose process is gone is taken over), and the result is checked again once the lock is held.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from bench_suite import atomic
from bench_suite.digest import ids_digest, json_digest
from bench_suite.errors import BadInputError
from bench_suite.finetune.recipes import KIND_VERSIONS
from bench_suite.locks import release, try_lock
from bench_suite.methods import budget_from_ratio, registry
from bench_suite.metrics import selection_emd
from bench_suite.runtime import Runtime
from bench_suite.tables import al_prefix
from bench_suite.tables.common import Context, get_recipe, recipe_settings

log = logging.getLogger(__name__)

CELL_VERSION = 4
POLL_S = 2.0
LIVENESS_S = 30.0


def cell_key(ctx: Context, cell: dict, train, test) -> dict:
    """Everything that decides a cell's numbers (see the module docstring); its digest names the cache file."""
    selector = registry.get(cell["method"], **(cell.get("method_config") or {}))
    recipe = recipe_settings(ctx.profile, cell["recipe"])
    return {"dataset": cell["dataset"], "ratio": cell["ratio"], "seed": cell["seed"],
            "pool_features": train.meta.get("fingerprint") or train.checksum(),
            "test_features": test.meta.get("fingerprint") or test.checksum(),
            "method": cell["method"], "method_options": selector.config(), "method_version": selector.version,
            "recipe": recipe, "recipe_version": KIND_VERSIONS[recipe["kind"]], "cell_version": CELL_VERSION}


def compute_cell(ctx: Context, cell: dict, train, test, encoder, horizon: int | None = None) -> dict:
    """Select, evaluate and measure one cell (one process's work). ``horizon``: the largest budget the grid asks
    of this cell's active-learning run (``al_prefix``: its rounds are run once, for every budget up to it)."""
    budget = budget_from_ratio(cell["ratio"], len(train))
    selector = registry.get(cell["method"], **(cell.get("method_config") or {}))
    init = selector.initial_set(len(train))
    if budget <= init:
        return {**cell, "budget": budget, "skipped": f"budget {budget} <= the initial random set ({init})"}
    sel = al_prefix.select(ctx.work, train, cell, budget, horizon, ctx.fresh_done if ctx.fresh else None)
    recipe, _ = get_recipe(ctx, cell["recipe"], encoder)
    metrics = recipe(train, sel.ids, test, cell["seed"])
    rows = train.rows_of_ids(sel.ids)
    return {**cell, "budget": budget, "selection_seconds": sel.seconds,
            "emd": selection_emd(train.features, rows), **{k: v for k, v in metrics.items() if k != "seed"},
            "selection_info": {k: v for k, v in sel.info.items() if k != "loss_curve"},
            "ids_sha": ids_digest(sel.ids)}


# --------------------------------------------------------------------------- the grid
def run_cells(ctx: Context, cells: list[dict], stores: dict, progress=None, encoder=None) -> list[dict]:
    """Run every cell (cached); all ranks return all results.

    Every rank walks the whole grid and claims work as it goes, a group at a time: for a method that shares work
    between budgets (``Selector.shares_work_across_budgets``: every active-learning method, whose smaller budgets
    take their prefix of one run; BiLAF, its ActiveFT cores) the cells of one pool, method, options and seed
    (``al_prefix.group_of``), largest budget first; for the others each cell alone (finer work, better balanced:
    Table 6's 27 ActiveFT cells in 9 groups left one rank of two a group behind). A group another rank
    holds is passed over and read once its results are there (each cell keeps its own lock too, as for two
    runs sharing a work folder). So the ranks stay busy until the grid is done, however unequal the cells
    (dealing cells round robin left one rank of two idle for minutes, and its barrier timed out). A rank that
    waits on another's work checks every ``LIVENESS_S`` that the launch's ranks are alive (``heartbeat``) and
    stops with an error naming a lost one.

    The cache is shared by all tables and keyed by what decides a cell's numbers (not its row label), so a
    cell that two tables share (ActiveFT at tau = 0.07 in Tables 1 and 6) runs once. A cell whose budget does
    not exceed an active-learning method's initial random set is recorded as skipped (the paper's "-").
    With ``ctx.fresh`` every cell is recomputed. A cell locked by another run sharing the work folder is
    waited for, not computed twice.
    """
    cache = ctx.work / "cells" / f"v{CELL_VERSION}"
    keyed = []
    for cell in cells:
        train, test = stores[cell["dataset"]]
        key = cell_key(ctx, cell, train, test)
        keyed.append(({**cell, "key": key}, cache / f"{json_digest(key)}.json"))
    if ctx.missing_cell is not None:  # collect only (the SLURM report stage): nothing is computed here
        return _collect(ctx, keyed, stores, encoder)
    rt = Runtime.of_accelerator(ctx.accelerator)
    horizons = al_prefix.horizons(cells, stores)
    groups: dict = {}
    for cell, path in keyed:
        groups.setdefault(_claim_unit(cell), []).append((cell, path))
    todo = [(group, sorted(members, key=lambda m: -m[0]["ratio"])) for group, members in groups.items()]
    t0 = time.perf_counter()
    checked = t0
    computed = []  # cache-file digests of the cells this rank computed
    while todo:  # work locked by another rank or run is retried until its results appear (or its lock goes stale)
        if ctx.world > 1 and time.perf_counter() - checked > LIVENESS_S:
            _check_ranks_alive(ctx)
            checked = time.perf_counter()
        waiting = []
        for group, members in todo:
            lock = cache / "groups" / f"{json_digest(list(group))}.lock"
            if not try_lock(lock):
                waiting.append((group, members))
                continue
            left = []
            try:
                for cell, path in members:
                    done = _claim_and_compute(ctx, cell, path, stores, encoder, progress,
                                              horizons.get(al_prefix.group_of(cell)))
                    if done is None:
                        left.append((cell, path))
                    elif done:
                        computed.append(path.stem)
            finally:
                release(lock)
            if left:
                waiting.append((group, left))
        if waiting:
            time.sleep(POLL_S)
        todo = waiting
    ctx.accelerator.wait_for_everyone()
    results = [_load(path, cell) for cell, path in keyed]
    ctx.add_time("cells", time.perf_counter() - t0)
    everyone = [d for part in rt.all_gather_object(computed) for d in part]
    ctx.timing.setdefault("computed", set()).update(everyone)
    computed = len(everyone)
    skipped = sum(1 for r in results if r.get("skipped"))
    ctx.cells_computed += computed
    ctx.cells_skipped += skipped
    ctx.cells_cached += len(keyed) - computed - skipped
    ctx.cells_total += len(keyed)
    return results


def _claim_unit(cell: dict) -> tuple:
    """What one rank claims at once: the cells that share work between budgets, else the cell alone."""
    cls = registry.selector_class(cell["method"])
    group = al_prefix.group_of(cell)
    return group if cls.shares_work_across_budgets else (*group, cell["ratio"])


def _check_ranks_alive(ctx) -> None:
    """Raise ``RankFailedError`` naming the ranks of this launch whose heartbeat stopped."""
    from bench_suite import heartbeat  # noqa: PLC0415
    from bench_suite.runtime import RankFailedError  # noqa: PLC0415

    lost = heartbeat.lost_ranks()
    if lost:
        raise RankFailedError(f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} stopped (killed or "
                              f"crashed) while rank {ctx.rank} waited for its cells; rerun the same command: "
                              "finished cells are kept")


def _collect(ctx, keyed: list, stores: dict, encoder) -> list[dict]:
    """The cached results; a missing cell becomes ``{cell, budget, **ctx.missing_cell(cell, encoder)}``."""
    results = []
    for cell, path in keyed:
        if path.exists():
            results.append(_load(path, cell))
        else:
            budget = budget_from_ratio(cell["ratio"], len(stores[cell["dataset"]][0]))
            results.append({**cell, "budget": budget, **ctx.missing_cell(cell, encoder)})
    skipped = sum(1 for r in results if r.get("skipped"))
    ctx.cells_skipped += skipped
    ctx.cells_cached += sum(1 for r in results if not r.get("skipped") and not r.get("failed"))
    ctx.cells_total += len(keyed)
    return results


def _cached(ctx, path: Path) -> bool:
    return path.exists() and not (ctx.fresh and path not in ctx.fresh_done)


def _claim_and_compute(ctx, cell, path, stores, encoder, progress, horizon=None) -> int | None:
    """1 if this run computed the cell, 0 if it was cached or is skipped ('-'), None if another run holds its lock
    (or the lock of the active-learning run it takes its prefix of)."""
    if _cached(ctx, path):
        _tick(progress, ctx, cell, None)
        return 0
    lock = path.with_suffix(".lock")
    if not try_lock(lock):
        return None
    try:
        if _cached(ctx, path):  # finished by another run between the check above and the lock
            _tick(progress, ctx, cell, None)
            return 0
        train, test = stores[cell["dataset"]]
        try:
            result = {**compute_cell(ctx, cell, train, test, encoder, horizon), "revision": ctx.revision}
        except al_prefix.TrajectoryBusy:  # its active-learning run is being computed elsewhere: come back later
            return None
        atomic.write_json(path, result)
        ctx.fresh_done.add(path)
    finally:
        release(lock)
    _tick(progress, ctx, cell, None if result.get("skipped") else result)
    return 0 if result.get("skipped") else 1


def _tick(progress, ctx, cell, result) -> None:
    if progress and ctx.rank == 0:
        progress(cell, result)


def _load(path: Path, cell: dict) -> dict:
    if not path.exists():
        raise BadInputError(f"cell result {path} is missing after the run (a rank failed?)")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise BadInputError(f"cell result {path} is damaged ({exc}); delete it and rerun") from exc
    return {**data, "variant": cell.get("variant")}  # the row label is not part of the key


def computed_here(ctx, cell: dict) -> bool:
    """True when this run computed ``cell`` (a result of ``run_cells``), False when it came from the cache."""
    return json_digest(cell["key"]) in ctx.timing.get("computed", ()) if cell.get("key") else False


def revisions(cells: list[dict]) -> list[str]:
    """The git revisions the cells were computed at (a report lists them all)."""
    return sorted({c.get("revision") or "unknown (computed before revisions were recorded)" for c in cells})
