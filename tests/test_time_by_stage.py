"""The report's "time by stage" line: where a table run's wall time went (shards, features, selection per row,
finetune/probe, report), from what the run recorded; cached cells are counted as cached."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from bench_suite import report
from bench_suite.digest import json_digest
from bench_suite.progress import duration

ROOT = Path(__file__).resolve().parents[1]

PROFILE = {
    "name": "tiny-timing",
    "scaled_down": True,
    "description": "test profile: scikit-learn digits, EfficientNet-Lite0 at 32 px, one seed",
    "encoder": {"name": "efficientnet_lite0", "image_size": 32, "pooling": "gap"},
    "extraction": {"batch_size": 256},
    "seeds": [0],
    "datasets": {"digits": {"label": "Digits", "role": "a tiny pool", "pool": {"split": "train"},
                            "test": {"split": "test"}}},
    "recipes": {"linear_probe": {"kind": "linear_probe", "C": 10.0, "max_iter": 200}},
    "tables": {"1": {"recipe": "linear_probe", "methods": ["random", "kmeans"], "cells": {"digits": [0.01, 0.03]}}},
}


def _cell(method, seconds, probe, computed_set, key):
    cell = {"method": method, "variant": method.title(), "selection_seconds": seconds, "seconds": probe, "key": key}
    if computed_set is not None:
        computed_set.add(json_digest(key))
    return cell


def test_the_line_sums_what_the_cells_recorded():
    done: set = set()
    cells = [_cell("vaal", 100.0, 1.0, done, {"k": 1}), _cell("vaal", 50.0, 1.0, done, {"k": 2}),
             _cell("bilaf", 20.0, 0.5, done, {"k": 3}), _cell("random", 0.01, 0.5, done, {"k": 4}),
             _cell("fds", 0.02, 0.5, done, {"k": 5}), _cell("kmeans", 3.0, 0.5, None, {"k": 6}),
             {"method": "tavaal", "variant": "Tavaal", "skipped": "budget 10 <= the initial random set (10)"}]
    timing = {"shards": 1.5, "shards_made": 1, "shards_cached": 1, "features": 240.0, "features_made": 2,
              "cells": 180.0, "computed": done, "report": 0.5}
    line = report.time_by_stage(430.0, timing, cells, top=2)
    assert line.startswith("7m10s in all; shards 1.50s (1 written, 1 cached); features 4m00s (2 extracted); ")
    assert "cells 3m00s for 5 computed: selection 2m50s (Vaal 2m30s, Bilaf 20.0s, 2 others 0.03s), " \
           "finetune/probe 3.50s, rest 6.47s; report " + report.REPORT_SECONDS in line
    assert line.endswith("; 1 cells from the cache, recorded earlier: selection 3.00s (Kmeans 3.00s), "
                         "finetune/probe 0.50s")


def _run(tmp_path):
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    cmd = [sys.executable, "bench_suite/run.py", "--table", "1", "--profile", str(prof), "--out",
           str(tmp_path / "results"), "--work", str(tmp_path / "work"), "--quiet"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "results" / "table1.md").read_text()
    data = json.loads((tmp_path / "results" / "table1.json").read_text())
    return md, data


def test_a_real_run_reports_its_time_by_stage(tmp_path):
    md, data = _run(tmp_path)
    line = data["provenance"]["time_by_stage"]
    assert f"| time by stage | {line} |" in md
    assert report.REPORT_SECONDS not in md and report.REPORT_SECONDS not in line
    num = r"(?:\d+\.\d+s|\d+m\d\ds|\d+h\d\dm)"
    m = re.fullmatch(rf"({num}) in all; shards ({num}) \(2 written\); features ({num}) \(2 extracted\); "
                     rf"cells ({num}) for 4 computed: selection ({num}) \((K-Means|Random) {num}, "
                     rf"(K-Means|Random) {num}\), finetune/probe ({num}), rest ({num}); report ({num})", line)
    assert m, line
    cells = data["cells"]
    assert m.group(5) == duration(sum(report.selection_cost(c) for c in cells))
    assert m.group(8) == duration(sum(c["seconds"] for c in cells))

    md2, data2 = _run(tmp_path)  # from the cache: nothing computed, the cells' recorded times shown as earlier
    line2 = data2["provenance"]["time_by_stage"]
    assert f"| time by stage | {line2} |" in md2
    assert "shards" in line2 and "(2 cached)" in line2.split("; features")[0]
    assert "features" in line2 and "(2 cached)" in line2.split("; features")[1].split(";")[0]
    assert "(none computed)" in line2
    assert line2.endswith(f"; 4 cells from the cache, recorded earlier: selection "
                          f"{duration(sum(report.selection_cost(c) for c in cells))} "
                          f"({line.split('selection ', 1)[1].split('(', 1)[1].split(')', 1)[0]}), "
                          f"finetune/probe {duration(sum(c['seconds'] for c in cells))}")
