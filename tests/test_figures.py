"""The plots beside Tables 1, 6 and 7 and the paper's Figures 3 and 4: every PNG opens, has a sensible size and
is not blank; the tables' markdown embeds its plot; Figure 3's numbers are the paper's quantity; Figure 4's
picks come from the registry, deterministic by seed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from bench_suite.cli import figures
from bench_suite.profiles import load_profile, parse_profile
from bench_suite.store import FeatureStore
from bench_suite.tables import plots

ROOT = Path(__file__).resolve().parents[1]


def assert_png(path: Path, min_w: int = 300, min_h: int = 200) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    w, h, ink = plots.png_check(path)
    assert w >= min_w and h >= min_h, (path, w, h)
    assert w <= 4000 and h <= 4000, (path, w, h)
    assert ink > 0.02, (path, ink)  # not blank: some of the pixels are drawn on


@pytest.mark.parametrize("table", ["1", "6", "7"])
def test_table_plot_from_a_committed_report(tmp_path, table):
    """Each table's plot drawn from the committed report's real cells (no cell is run), through the same
    ``plotted`` hook the table's run uses, and its markdown embeds it."""
    from bench_suite.tables.registry import get_table

    data = json.loads((ROOT / "results" / f"table{table}.json").read_text())
    profile = parse_profile(data["profile"], f"table{table}.json")
    spec = get_table(table)

    class Ctx:
        rank, out = 0, tmp_path

    Ctx.profile = profile
    # the hook that wraps the grid's runner, around a stand-in run that returns the committed report
    run = plots.plotted(lambda ctx, pf=None: dict(data), table, _draw_of(table))
    out = run(Ctx())
    assert out["plot"] == f"table{table}.png"
    assert_png(tmp_path / f"table{table}.png")
    md = spec.markdown(profile, data["provenance"], out)
    assert f"](table{table}.png)" in md and "error bars: ±1 std over the seeds" in md
    assert f"](table{table}.png)" not in spec.markdown(profile, data["provenance"], {k: v for k, v in out.items()
                                                                                      if k != "plot"})


def _draw_of(table: str):
    from bench_suite.tables import table1, table6, table7

    return {"1": table1.draw, "6": table6.PLOT, "7": table7.PLOT}[table]


def test_a_plot_that_fails_never_costs_the_table(tmp_path, caplog):
    class Ctx:
        rank, out, profile = 0, tmp_path, None

    def broken(profile, out, path):
        raise ValueError("no numbers")

    out = plots.plotted(lambda ctx, pf=None: {"cells": []}, "1", broken)(Ctx())
    assert "plot" not in out and "the plot was not drawn" in caplog.text
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_series_means_and_stds_over_seeds():
    cells = [{"dataset": "d", "ratio": 0.01, "variant": "A", "seed": s, "top1": v} for s, v in enumerate([1.0, 3.0])]
    cells.append({"dataset": "d", "ratio": 0.02, "variant": "A", "seed": 0, "skipped": "budget"})
    got = plots.series(cells, "top1", lambda c: c["dataset"], lambda c: c["variant"], lambda c: c["ratio"])
    assert got == {"d": {"A": [(0.01, 2.0, 1.0, 2)]}}


def test_figure3_is_the_papers_quantity():
    """E_i[exp(sim_(k)/tau)] over the k-th most similar of B parameters drawn from the pool, self excluded:
    checked against a brute-force loop on a small pool."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = figures.exp_similarity_topk(x, 12, tau=0.07, k=5, seed=3, block=7)
    rows = np.sort(np.random.default_rng(3).choice(60, size=12, replace=False))
    want = np.zeros(5)
    for i in range(60):
        sims = sorted((float(x[i] @ x[r]) for r in rows if r != i), reverse=True)[:5]
        want += np.exp(np.array(sims) / 0.07)
    np.testing.assert_allclose(got["mean"], want / 60, rtol=1e-4)
    assert np.all(np.diff(got["mean"]) <= 0)
    with pytest.raises(Exception, match="budget 1 must be in"):
        figures.exp_similarity_topk(x, 1, tau=0.07)


@pytest.fixture(scope="module")
def digits_figures(digits_pixel_store, tmp_path_factory):
    """Figures 3 and 4 through the command's own functions on the real digits pool (1797 images, pixels as
    features), the cpu profile's method options; t-SNE on 300 points."""
    out = tmp_path_factory.mktemp("figures")
    store = FeatureStore.from_array(digits_pixel_store.features, ids=digits_pixel_store.ids,
                                    labels=digits_pixel_store.labels,
                                    meta={**digits_pixel_store.meta, "fingerprint": "digits-test"})
    cpu = load_profile("cpu")  # ActiveFT at 20 iterations: the test's time, not the method, is the point here
    profile = dataclasses.replace(cpu, methods={**cpu.methods, "activeft": {**cpu.methods["activeft"], "iters": 20}})
    nums = figures.figure3_numbers(np.asarray(store.features), [30, 90], [0, 1], 0.07)
    plots.figure3_plot(out / "figure3.png", {"Digits": {f"B = {b}": (v["mean"], v["std"]) for b, v in nums.items()}},
                       tau=0.07, title="Figure 3 (test)")
    methods = ["activeft", "random", "kmeans"]
    picks = figures.figure4_picks(store, profile, "fashion_mnist", methods, 0.03, 0)  # B = 38 of 1297; AL init 12
    keep = np.concatenate([p["rows"] for p in picks.values()])
    rows, xy = figures.tsne_embedding(np.asarray(store.features), keep, max_points=300, seed=0)
    where = {int(r): i for i, r in enumerate(rows)}
    plots.figure4_plot(out / "figure4.png", xy, np.asarray(store.labels)[rows],
                       {p["label"]: [where[r] for r in p["rows"]] for p in picks.values()}, title="Figure 4 (test)")
    return out, store, profile, nums, picks, rows


def test_figure3_png_and_assumption1(digits_figures):
    out, _, _, nums, _, _ = digits_figures
    assert_png(out / "figure3.png")
    for v in nums.values():
        assert len(v["mean"]) == 20 and v["mean"][0] > v["mean"][1] > v["mean"][-1] > 0


def test_figure4_png_and_picks_from_the_registry(digits_figures):
    out, store, profile, _, picks, rows = digits_figures
    assert_png(out / "figure4.png", min_w=600)
    assert set(picks) == {"activeft", "random", "kmeans"}
    for p in picks.values():
        assert len(p["rows"]) == len(set(p["rows"])) == 38 and p["check"] == "no cached Table 1 cell"
        assert set(p["rows"]) <= set(rows.tolist())  # every pick is in the t-SNE subsample
    assert len(rows) == 300
    again = figures.figure4_picks(store, profile, "fashion_mnist", ["random", "activeft"], 0.03, 0)
    assert all(again[m]["ids_sha"] == picks[m]["ids_sha"] for m in again)  # deterministic by seed
    other = figures.figure4_picks(store, profile, "fashion_mnist", ["random"], 0.03, 1)
    assert other["random"]["ids_sha"] != picks["random"]["ids_sha"]


def test_figure4_checks_the_picks_against_the_cached_table1_cell(digits_figures, tmp_path):
    """A cached cell with the same pool, ratio, seed, method and options: the picks' digest is compared."""
    from bench_suite.digest import json_digest
    from bench_suite.methods import registry
    from bench_suite.tables.cells import CELL_VERSION

    _, store, profile, _, picks, _ = digits_figures
    cells = tmp_path / "cells" / f"v{CELL_VERSION}"
    cells.mkdir(parents=True)
    opts = registry.get("random", **figures.method_config(profile, "random", "fashion_mnist")).config()
    key = {"pool_features": "digits-test", "ratio": 0.03, "seed": 0, "method": "random", "method_options": opts}
    (cells / "a.json").write_text(json.dumps({"key": key, "ids_sha": picks["random"]["ids_sha"]}))
    cached = figures.cached_digests(tmp_path)
    assert json_digest(opts) in {k[4] for k in cached}
    got = figures.figure4_picks(store, profile, "fashion_mnist", ["random"], 0.03, 0, cached)
    assert got["random"]["check"] == "same picks as the cached Table 1 cell"
    (cells / "a.json").write_text(json.dumps({"key": key, "ids_sha": "0" * 16}))
    got = figures.figure4_picks(store, profile, "fashion_mnist", ["random"], 0.03, 0, figures.cached_digests(tmp_path))
    assert got["random"]["check"].startswith("DIFFERS")


def test_figure4_uses_table1s_options():
    """CoreSet gets the dataset's active-learning protocol, as in Table 1's cells; label-free methods do not."""
    cpu = load_profile("cpu")
    assert figures.method_config(cpu, "coreset", "fashion_mnist")["init_ratio"] == 0.01
    assert "init_ratio" not in figures.method_config(cpu, "activeft", "fashion_mnist")
    assert figures.method_config(cpu, "activeft", "mnist")["temperature"] == 0.07


def test_figures_command_writes_the_report(tmp_path, monkeypatch, digits_pixel_store):
    """``python -m bench_suite.cli.figures`` end to end in this process, the pools' features served as if
    cached in --work (a small pool: the real extraction is Table 1's and tested there)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    x = (centres[rng.integers(0, 5, 500)] + 0.3 * rng.normal(size=(500, 16))).astype(np.float32)
    labels = np.argmax(x @ centres.T, axis=1)
    store = FeatureStore.from_array(x, labels=labels, normalize=True, meta={"fingerprint": "synthetic"})
    monkeypatch.setattr(figures, "prepare_split", lambda ctx, d, part, encoder=None: store)
    out = tmp_path / "results"
    assert figures.main(["--profile", "cpu", "--work", str(tmp_path / "work"), "--out", str(out), "--methods",
                         "random,kmeans", "--ratio", "0.04", "--tsne-max", "300"]) == 0
    md = (out / "figures.md").read_text()
    for name in ("figure3.png", "figure4_mnist.png"):
        assert f"]({name})" in md
        assert_png(out / name)
    assert "300 of the pool's 500 points" in md and "not the paper's setting" in md
    data = json.loads((out / "figures.json").read_text())
    assert set(data["figure3"]) == {"mnist", "fashion_mnist"} and data["figure4"]["mnist"]["budget"] == 20
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic: no temporary left behind
