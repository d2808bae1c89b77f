"""An active-learning run to a smaller budget is a prefix of the run to a larger one (``tables.al_prefix``), for
every AL method, on a small real pool; and the grid's cells take their prefix from one stored run."""

import json

import numpy as np
import pytest

from bench_suite.methods import run_selection
from bench_suite.tables import al_prefix

# 40 random labels, then rounds of 40: budgets 80 and 120 end on full rounds, 100 does not
PROTO = {"init_size": 40, "batch_size": 40}
FAST_VAE = {"vae_width": 8, "vae_iters": 6, "vae_batch_size": 64}
CONFIGS = {
    "coreset": PROTO,
    "learnloss": PROTO,
    "alfamix": {**PROTO, "alpha_mode": "closed_form", "alpha_cap": 0.2},
    "vaal": {**PROTO, **FAST_VAE},
    "tavaal": {**PROTO, **FAST_VAE},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(digits_store):
    return digits_store


def cell(method, seed=0):
    return {"dataset": "digits", "method": method, "method_config": CONFIGS.get(method, {}), "seed": seed,
            "ratio": 0.1}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_shorter_run_is_a_prefix_of_the_longer_one(store, method):
    short = run_selection(store, method, 80, 3, CONFIGS[method], labels=store.labels)
    long = run_selection(store, method, 120, 3, CONFIGS[method], labels=store.labels)
    np.testing.assert_array_equal(short.ids, long.ids[:80])
    derived = al_prefix.prefix(long, 80)
    np.testing.assert_array_equal(derived.ids, short.ids)
    assert derived.info["n_rounds"] == short.info["n_rounds"] == 1
    assert derived.info["labelled_sizes"] == short.info["labelled_sizes"] == [40, 80]
    assert derived.info["oracle_queries"] == 80 and derived.info["prefix_of"]["budget"] == 120
    # its time: the run's start-up and preparation plus its own round, never the whole run's
    assert 0 < derived.seconds < long.seconds
    assert derived.seconds >= long.info["rounds"][0]["seconds"]


def test_cells_share_one_stored_run(store, tmp_path):
    c = cell("learnloss")
    first = al_prefix.select(tmp_path, store, c, 80, horizon=120)
    runs = list((tmp_path / "al_runs").glob("*.json"))
    assert len(runs) == 1
    stored = json.loads(runs[0].read_text())
    assert stored["budget"] == 120 and stored["info"]["labelled_sizes"] == [40, 80, 120]
    mtime = runs[0].stat().st_mtime_ns
    second = al_prefix.select(tmp_path, store, c, 120, horizon=120)
    assert runs[0].stat().st_mtime_ns == mtime  # taken from the stored run, not run again
    assert second.ids.tolist() == stored["ids"] and second.seconds == stored["seconds"]
    np.testing.assert_array_equal(first.ids, second.ids[:80])
    # the first cell paid for the whole run, the second for reading it back
    assert first.info["compute_seconds"] >= stored["seconds"] > first.seconds
    assert second.info["compute_seconds"] < 0.5 * stored["seconds"]
    direct = run_selection(store, "learnloss", 120, 0, CONFIGS["learnloss"], labels=store.labels)
    np.testing.assert_array_equal(second.ids, direct.ids)
    # another seed is another run
    al_prefix.select(tmp_path, store, cell("learnloss", seed=1), 80, horizon=80)
    assert len(list((tmp_path / "al_runs").glob("*.json"))) == 2


def test_a_budget_off_the_rounds_runs_on_its_own(store, tmp_path):
    c = cell("coreset")
    sel = al_prefix.select(tmp_path, store, c, 100, horizon=120)  # its last round is truncated to 20
    assert not (tmp_path / "al_runs").exists()
    assert "prefix_of" not in sel.info and sel.info["labelled_sizes"] == [40, 80, 100]
    direct = run_selection(store, "coreset", 100, 0, CONFIGS["coreset"], labels=store.labels)
    np.testing.assert_array_equal(sel.ids, direct.ids)


def test_a_run_being_computed_elsewhere_defers_the_cell(store, tmp_path):
    """Another rank running the trajectory: the cell is put back (not computed twice), then takes its prefix."""
    from bench_suite.locks import release, try_lock
    from bench_suite.methods import registry

    c = cell("coreset")
    path = al_prefix._path(tmp_path, store, registry.get("coreset", **PROTO), "coreset", 0)
    lock = path.with_suffix(".lock")
    assert try_lock(lock)  # held by a live process (this one), as another rank would
    with pytest.raises(al_prefix.TrajectoryBusy):
        al_prefix.select(tmp_path, store, c, 80, horizon=120)
    assert not path.exists()
    release(lock)
    longer = al_prefix.select(tmp_path, store, c, 120, horizon=120)  # the other rank's run, stored
    sel = al_prefix.select(tmp_path, store, c, 80, horizon=120)
    np.testing.assert_array_equal(sel.ids, longer.ids[:80])
    assert sel.info["prefix_of"]["budget"] == 120


def test_a_longer_budget_extends_the_stored_run(store, tmp_path):
    c = cell("coreset")
    al_prefix.select(tmp_path, store, c, 80, horizon=80)
    longer = al_prefix.select(tmp_path, store, c, 120, horizon=None)
    (path,) = (tmp_path / "al_runs").glob("*.json")
    assert json.loads(path.read_text())["budget"] == 120
    direct = run_selection(store, "coreset", 120, 0, CONFIGS["coreset"], labels=store.labels)
    np.testing.assert_array_equal(longer.ids, direct.ids)


def test_a_damaged_stored_run_is_recomputed(store, tmp_path):
    c = cell("coreset")
    al_prefix.select(tmp_path, store, c, 80, horizon=120)
    (path,) = (tmp_path / "al_runs").glob("*.json")
    path.write_text("{ not json")
    again = al_prefix.select(tmp_path, store, c, 80, horizon=120)
    direct = run_selection(store, "coreset", 80, 0, CONFIGS["coreset"], labels=store.labels)
    np.testing.assert_array_equal(again.ids, direct.ids)
    assert json.loads(path.read_text())["budget"] == 120


def test_label_free_methods_and_horizons(store, tmp_path):
    sel = al_prefix.select(tmp_path, store, cell("kmeans"), 80, 120)
    assert len(sel.ids) == 80 and not (tmp_path / "al_runs").exists()
    stores = {"digits": (store, None)}
    cells = [{**cell("vaal"), "ratio": r} for r in (0.05, 0.1)] + [
        cell("kmeans"), {**cell("vaal", seed=1), "ratio": 0.05}]
    h = al_prefix.horizons(cells, stores)
    n = len(store)
    assert h == {al_prefix.group_of(cells[0]): int(0.1 * n), al_prefix.group_of(cells[3]): int(0.05 * n)}


def test_time_by_stage_counts_a_shared_run_once():
    from bench_suite.report import selection_cost, time_by_stage

    def made(method, sel, spent):
        return {"method": method, "key": {"m": method, "s": sel}, "selection_seconds": sel, "seconds": 0.0,
                "selection_info": {"compute_seconds": spent}}

    cells = [made("vaal", 20.0, 100.0), made("vaal", 100.0, 0.01), {"method": "kmeans", "key": {"m": "k"},
                                                                     "selection_seconds": 3.0, "seconds": 0.0}]
    assert [selection_cost(c) for c in cells] == [100.0, 0.01, 3.0]
    from bench_suite.digest import json_digest

    line = time_by_stage(200.0, {"cells": 110.0, "computed": {json_digest(c["key"]) for c in cells}}, cells)
    assert "selection 1m43s (vaal 1m40s" in line, line


def test_fresh_runs_ignore_runs_stored_before_them(store, tmp_path):
    c = cell("coreset")
    al_prefix.select(tmp_path, store, c, 80, horizon=120)
    (path,) = (tmp_path / "al_runs").glob("*.json")
    stored = json.loads(path.read_text())
    stored["ids"][40:80] = stored["ids"][80:120]  # tampered: a --fresh run must not read it
    path.write_text(json.dumps(stored))
    done: set = set()
    fresh = al_prefix.select(tmp_path, store, c, 80, horizon=120, fresh_done=done)
    direct = run_selection(store, "coreset", 80, 0, CONFIGS["coreset"], labels=store.labels)
    np.testing.assert_array_equal(fresh.ids, direct.ids)
    assert done == {path} and fresh.info["compute_seconds"] > 0.05
    again = al_prefix.select(tmp_path, store, c, 120, horizon=120, fresh_done=done)  # stored by this run: used
    assert again.info["compute_seconds"] < fresh.info["compute_seconds"]
