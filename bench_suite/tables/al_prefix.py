"""Active-learning cells at several budgets from one run of the protocol: the run to a smaller budget is a prefix
of the run to a larger one.

Why it holds: the B.3 protocol (``baselines._al_protocol``) sees the budget only through the number of rounds.
Its initial set is drawn from the seed; round r's seed is word r of ``SeedSequence(seed).generate_state(n)``,
whose first words do not depend on n; each round retrains on the labels bought so far and picks a full batch,
except a last batch truncated to fill the budget. So when the smaller budget ends on a full round
(``budget`` is ``init + r * batch``), its run is exactly the first r rounds of any longer run: the same ids in
the same order (``tests/test_al_prefix.py`` checks it for every active-learning method).

Why it pays: the cpu profile's Tables 1 and 3 ask VAAL, TA-VAAL, LearnLoss, CoreSet and ALFA-Mix for 2 or 3
budgets of the same pool and seed; without this each budget redoes every round of the smaller ones.

How: a grid's cells of one (pool, method, options, seed) are run once, to the largest budget any of them asks for
(its horizon). The labelled ids and the per-round records are kept under ``<work>/al_runs/``, and every cell
takes its prefix. A cell that takes a prefix records ``prefix_of`` in its selection info. Its selection time is
what the protocol spent to get there: the run's preparation and start-up plus the wall times of its own rounds.
A trajectory whose lock another process holds (another rank, or another run sharing the work folder) raises
``TrajectoryBusy``: the grid puts the cell back and takes it up again once the run is stored, so ranks never run
the same rounds twice.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from bench_suite import atomic
from bench_suite.digest import ids_digest, json_digest
from bench_suite.locks import release, try_lock
from bench_suite.methods import Selection, budget_from_ratio, registry, run_selection
from bench_suite.runtime import Runtime

log = logging.getLogger(__name__)

# bumped when what is stored per trajectory changes (the ids themselves are the protocol's)
TRAJECTORY_VERSION = 1


class TrajectoryBusy(Exception):
    """Another live process is running the trajectory this cell would take its prefix of: retry the cell later."""


def group_of(cell: dict) -> tuple:
    """The cells that can share one run: same pool, method, options and seed (the ratio may differ)."""
    return (cell["dataset"], cell["method"], json.dumps(cell.get("method_config") or {}, sort_keys=True),
            cell["seed"])


def horizons(cells: list[dict], stores: dict) -> dict:
    """``group_of(cell) -> the largest budget`` over the active-learning cells of a grid."""
    out: dict = {}
    for cell in cells:
        if registry.selector_class(cell["method"]).label_free:
            continue
        budget = budget_from_ratio(cell["ratio"], len(stores[cell["dataset"]][0]))
        g = group_of(cell)
        out[g] = max(out.get(g, 0), budget)
    return out


def select(work: Path, train, cell: dict, budget: int, horizon: int | None, fresh_done: set | None = None) -> Selection:
    """The cell's selection: a prefix of a stored (or new) run to ``horizon`` where the protocol allows it.
    ``fresh_done`` (a ``--fresh`` run): only runs stored by this run count, and the runs it stores join it.
    ``info["compute_seconds"]``: what selecting cost this call (the whole run to the horizon if it ran it,
    next to nothing for a stored run's prefix), for the reports' time by stage."""
    t0 = time.perf_counter()
    sel = _select(work, train, cell, budget, horizon, fresh_done)
    sel.info["compute_seconds"] = round(time.perf_counter() - t0, 4)
    return sel


def _select(work: Path, train, cell: dict, budget: int, horizon: int | None, fresh_done: set | None) -> Selection:
    method, config, seed = cell["method"], cell.get("method_config") or {}, cell["seed"]
    selector = registry.get(method, **config)
    if selector.label_free or not on_round(budget, *selector.sizes(len(train))):
        return _run(train, method, budget, seed, config)
    path = _path(work, train, selector, method, seed)
    stored = _load(path, fresh_done)
    if stored is not None and budget in stored.info.get("labelled_sizes", ()):
        return prefix(stored, budget)
    target = horizon if horizon and horizon > budget else budget
    lock = path.with_suffix(".lock")
    if not try_lock(lock):  # another process is running this trajectory: take the prefix once it is stored
        raise TrajectoryBusy(str(path))
    try:
        stored = _load(path, fresh_done)
        if stored is None or budget not in stored.info.get("labelled_sizes", ()):
            stored = _run(train, method, target, seed, config)
            atomic.write_json(path, stored.to_json())
            if fresh_done is not None:
                fresh_done.add(path)
    finally:
        release(lock)
    return prefix(stored, budget)


def on_round(budget: int, init: int, batch: int) -> bool:
    """True when the protocol's run to ``budget`` ends on a full round (so it is a prefix of longer runs)."""
    return budget > init and (budget - init) % batch == 0


def prefix(run: Selection, budget: int) -> Selection:
    """The selection the protocol makes for ``budget``, from its run to ``run.budget`` (>= budget)."""
    if budget == run.budget:
        return run
    info = {k: v for k, v in run.info.items() if k != "compute_seconds"}
    sizes = list(info["labelled_sizes"])
    r = sizes.index(budget)  # rounds that reach the budget
    rounds = info["rounds"][:r]
    all_rounds = sum(float(x["seconds"]) for x in info["rounds"])
    start_up = max(0.0, float(run.seconds) - all_rounds - float(info.get("prepare_seconds", 0.0)))
    own = sum(float(x["seconds"]) for x in rounds)
    seconds = start_up + float(info.get("prepare_seconds", 0.0)) + own
    info.update(rounds=rounds, n_rounds=r, labelled_sizes=sizes[:r + 1], oracle_queries=int(budget),
                train_seconds_total=round(sum(float(x.get("train_seconds", 0.0)) for x in rounds), 4),
                prefix_of={"budget": int(run.budget), "rounds": r, "ids_sha": ids_digest(run.ids),
                           "note": f"the first {r} rounds of the run to {run.budget} labels (the same ids: a "
                                   "shorter run of the protocol is a prefix of a longer one); seconds = that run's "
                                   "start-up and preparation + these rounds"})
    return Selection(run.ids[:budget], run.method, budget, run.seed, seconds, run.config, info)


def _run(train, method: str, budget: int, seed: int, config: dict) -> Selection:
    # a cell is one process's work; ranks share the grid, not a cell
    return run_selection(train, method, budget, seed, config, labels=train.labels, dist=Runtime())


def _path(work: Path, train, selector, method: str, seed: int) -> Path:
    key = {"pool_features": train.meta.get("fingerprint") or train.checksum(),
           "labels": ids_digest(np.asarray(train.labels, dtype=np.int64)), "method": method,
           "method_options": selector.config(), "method_version": selector.version, "seed": int(seed),
           "trajectory_version": TRAJECTORY_VERSION}
    return Path(work) / "al_runs" / f"{json_digest(key)}.json"


def _load(path: Path, fresh_done: set | None = None) -> Selection | None:
    if not path.exists() or (fresh_done is not None and path not in fresh_done):
        return None
    try:
        return Selection.load(path)
    except Exception as exc:  # a damaged trajectory is recomputed, never trusted
        log.warning("ignoring the damaged active-learning run %s (%s)", path, exc)
        return None
