"""Tables 3, 5, 6, 7 through the real pipeline (digits shards -> EfficientNet-Lite0 features -> selectors ->
probe): variant rows, ratio-per-line layout, '-' for active-learning cells at the initial set, shared cell cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench_suite.profiles import parse_profile
from bench_suite.tables import grid

ROOT = Path(__file__).resolve().parents[1]

PROFILE = {
    "name": "tiny-grid",
    "scaled_down": True,
    "description": "test profile: scikit-learn digits, EfficientNet-Lite0 at 64 px",
    "encoder": {"name": "efficientnet_lite0", "image_size": 64, "pooling": "gap"},
    "extraction": {"batch_size": 128},
    "seeds": [0, 1],
    "datasets": {"digits": {"label": "Digits", "role": "a tiny pool", "pool": {"split": "train"},
                            "test": {"split": "test"}, "al": {"init_ratio": 0.02}},
                 "seg_digits": {"label": "Seg-Digits", "role": "ADE20K", "pool": {"split": "train", "limit": 100},
                                "test": {"split": "test", "limit": 40}}},
    "recipes": {"linear_probe": {"kind": "linear_probe", "C": 10.0, "max_iter": 500},
                "seg": {"kind": "seg_finetune", "decoder": "linear", "optimizer": "sgd", "lr": 0.01, "batch_size": 16,
                        "micro_batch_size": 16, "epochs": 2, "trainable_blocks": 0, "image_size": 56,
                        "eval_every": 0, "checkpoint_every": 1}},
    "methods": {"activeft": {"iters": 40, "temperature": 0.07}},
    "tables": {
        "1": {"recipe": "linear_probe", "methods": ["random", "activeft"], "cells": {"digits": [0.03]}},
        "2": {"recipe": "seg", "seeds": [0], "methods": ["random", "activeft"],
              "encoder": {"name": "dinov2_vits14", "image_size": 56, "pooling": "cls+mean"},
              "cells": {"seg_digits": [0.1]}},
        "3": {"recipe": "linear_probe", "seeds": [0], "methods": ["kmeans", "coreset", "activeft"],
              "cells": {"digits": [0.02, 0.04]}},
        "6": {"recipe": "linear_probe",
              "methods": [{"label": "tau = 0.04", "method": "activeft", "config": {"temperature": 0.04}},
                          {"label": "tau = 0.07", "method": "activeft", "config": {"temperature": 0.07}}],
              "cells": {"digits": [0.03]}},
        "4": {"recipe": "linear_probe", "seeds": [0], "methods": ["random", "activeft"],
              "encoders": [{"label": "DINOv2-S", "encoder": {"name": "dinov2_vits14", "image_size": 56,
                                                             "pooling": "cls"}},
                           {"label": "EfficientNet-Lite0", "encoder": {"name": "efficientnet_lite0",
                                                                       "image_size": 64, "pooling": "gap"}}],
              "cells": {"digits": [0.03]}},
        "7": {"recipe": "linear_probe", "seeds": [0],
              "methods": [{"label": "T = 0", "method": "activeft", "config": {"iters": 0}},
                          {"label": "T = 40", "method": "activeft", "config": {"iters": 40}}],
              "cells": {"digits": [0.03]}},
    },
}


def run_table(tmp_path, table):
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    cmd = [sys.executable, "bench_suite/run.py", "--table", table, "--profile", str(prof),
           "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work"), "--quiet"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "results"
    return (out / f"table{table}.md").read_text(), json.loads((out / f"table{table}.json").read_text())


def n_cached(tmp_path):
    return len(list((tmp_path / "work" / "cells").rglob("*.json")))


@pytest.fixture(scope="module")
def table1(tmp_path_factory):
    """Table 1 from an empty work folder; the tests below start from its shards and EfficientNet-Lite0 features
    (extracting them again in each test cost ~10 s)."""
    tmp = tmp_path_factory.mktemp("table1")
    return tmp, run_table(tmp, "1")[1]


def start_from(table1, tmp_path, *parts):
    for part in parts:
        shutil.copytree(table1[0] / "work" / part, tmp_path / "work" / part)


@pytest.mark.slow
def test_variant_tables_share_cells_and_print_ratio_lines(table1, tmp_path):
    start_from(table1, tmp_path, "shards", "features", "cells")
    t1 = table1[1]
    assert n_cached(tmp_path) == 4
    md6, t6 = run_table(tmp_path, "6")
    assert n_cached(tmp_path) == 6  # tau = 0.07 is Table 1's ActiveFT cell: reused, not recomputed
    c07 = {c["seed"]: c["ids_sha"] for c in t6["cells"] if c["variant"] == "tau = 0.07"}
    c_t1 = {c["seed"]: c["ids_sha"] for c in t1["cells"] if c["method"] == "activeft"}
    assert c07 == c_t1
    c04 = {c["seed"]: c["ids_sha"] for c in t6["cells"] if c["variant"] == "tau = 0.04"}
    assert c04 != c07  # the temperature changes the selection
    assert "| Sel. Ratio | tau = 0.04 | tau = 0.07 |" in md6 and "| Digits 3% (B=38) |" in md6
    assert "Table 6 (CIFAR10, DINO DeiT-S)" in md6 and "not the paper's setting" in md6

    md7, t7 = run_table(tmp_path, "7")
    t0 = next(c for c in t7["cells"] if c["variant"] == "T = 0")
    assert t0["selection_info"]["init_ids"] is not None
    assert "T = 0" in md7 and "T = 40" in md7


@pytest.mark.slow
def test_table3_times_and_dash_for_the_initial_set(table1, tmp_path):
    start_from(table1, tmp_path, "shards", "features")
    md, t3 = run_table(tmp_path, "3")
    cs = {(c["method"], c["ratio"]): c for c in t3["cells"]}
    # 2% of 1297 = 25 (floor) = the initial random set: CoreSet has nothing to select -> "-"; 4% runs one round
    assert cs[("coreset", 0.02)].get("skipped") and "top1" not in cs[("coreset", 0.02)]
    assert cs[("coreset", 0.04)]["selection_info"]["oracle_queries"] == cs[("coreset", 0.04)]["budget"] == 51
    line = next(ln for ln in md.splitlines() if ln.startswith("| Digits 2%"))
    assert line.split("|")[3].strip() == "-" and line.split("|")[2].strip() != "-"
    assert "## Selection time" in md and "Table 3 (CIFAR100 training set, GPU)" in md


def test_rows_of_variants_merge_the_profile_config():
    profile = parse_profile(PROFILE, "test profile")
    rows = grid.rows_of(profile, "6")
    assert [r["label"] for r in rows] == ["tau = 0.04", "tau = 0.07"]
    assert rows[0]["config"] == {"iters": 40, "temperature": 0.04}
    cells = grid.build_cells(profile, "3")
    assert next(c for c in cells if c["method"] == "coreset")["method_config"] == {"init_ratio": 0.02}
    assert next(c for c in cells if c["method"] == "kmeans")["method_config"] == {}
    assert {c["seed"] for c in cells} == {0}


@pytest.mark.slow
def test_table4_one_subtable_per_encoder(table1, tmp_path):
    start_from(table1, tmp_path, "shards", "features")  # EfficientNet-Lite0's; DINOv2's are extracted here
    md, t4 = run_table(tmp_path, "4")
    a, b = t4["parts"]
    assert a["stores"]["digits"]["pool_meta"]["encoder"]["name"] == "dinov2_vits14"
    assert b["stores"]["digits"]["pool_meta"]["encoder"]["name"] == "efficientnet_lite0"
    sha = lambda part: {c["method"]: c["ids_sha"] for c in part["cells"]}  # noqa: E731
    assert sha(a)["activeft"] != sha(b)["activeft"]  # other features, other selection
    assert sha(a)["random"] == sha(b)["random"]  # random ignores the features
    assert "## (a) DINOv2-S" in md and "## (b) EfficientNet-Lite0" in md and "ResNet-50 pretrained with DINO" in md


@pytest.mark.slow
def test_table2_segmentation_reports_miou(tmp_path):
    md, t2 = run_table(tmp_path, "2")
    assert {c["method"] for c in t2["cells"]} == {"random", "activeft"}
    for c in t2["cells"]:
        assert c["budget"] == 10 and c["n_train"] == 10 and 0 < c["miou"] <= 100 and c["n_test"] == 40
    meta = t2["stores"]["seg_digits"]["pool_meta"]
    assert meta["encoder"]["name"] == "dinov2_vits14" and meta["pooling"] == "cls+mean"
    assert "## mIoU (%)" in md and "| Seg-Digits 10% (B=10) |" in md and "Table 2 (ADE20k" in md


def test_grid_progress_names_each_tables_metric(caplog, monkeypatch):
    """The grid's progress lines show top-1 for classification cells and mIoU for segmentation (Table 2)
    cells (it used to raise KeyError on a segmentation cell unless --quiet), and nothing for skipped ones."""
    import logging

    from bench_suite import run as run_py

    monkeypatch.setenv("BENCH_SUITE_PROGRESS_S", "0")  # a line per cell (stderr is not a terminal here)
    factory, stop = run_py.make_progress(quiet=False, rank=0)
    advance = factory(3)
    cell = {"dataset": "seg_digits", "ratio": 0.05, "method": "random", "seed": 0}
    with caplog.at_level(logging.INFO, logger="bench_suite.progress"):
        advance(cell, {"miou": 41.25})
        advance({**cell, "dataset": "mnist"}, {"top1": 77.5})
        advance(cell, None)
        stop()
    lines = caplog.text.splitlines()
    assert "1/3" in lines[0] and lines[0].endswith("last: seg_digits 0.05 random s0 miou 41.2")
    assert "2/3" in lines[1] and lines[1].endswith("last: mnist 0.05 random s0 top1 77.5")
    assert "3/3" in lines[2] and lines[2].endswith("last: seg_digits 0.05 random s0")
    # several ranks: rank 0 counts the whole grid (every rank walks it), and says how many ranks share it
    caplog.clear()
    factory, stop = run_py.make_progress(quiet=False, rank=0, world=2)
    advance = factory(5)
    with caplog.at_level(logging.INFO, logger="bench_suite.progress"):
        advance(cell, None)
        stop()
    assert "cells (2 ranks)" in caplog.text and "1/5" in caplog.text
    assert run_py.make_progress(quiet=False, rank=1, world=2)[0](5) is None
