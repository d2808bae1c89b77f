"""``python -m bench_suite.report compare A B`` on real report JSONs: the committed results/table1.json and
table6.json, copies of them with known edits, and the same files at a git revision."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench_suite import report
from bench_suite.cli import compare

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return json.loads((ROOT / "results" / name).read_text())


def cells_at(data: dict, dataset: str, ratio: float, variant: str) -> list[dict]:
    return [c for c in data["cells"] if c["dataset"] == dataset and c["ratio"] == ratio and c["variant"] == variant]


@pytest.fixture
def edited(tmp_path):
    """Folder A: the committed Tables 1 and 6. Folder B: the same, with ActiveFT at Fashion-MNIST 1% up by 5
    points (a real change), Random at MNIST 0.1% moved by less than its seeds' std (noise), K-Means at MNIST
    0.2% with other selections but the same numbers, one cell dropped, and Table 6 left out."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    t1, t6 = load("table1.json"), load("table6.json")
    (a / "table1.json").write_text(json.dumps(t1))
    (a / "table6.json").write_text(json.dumps(t6))
    t1b = copy.deepcopy(t1)
    for c in cells_at(t1b, "fashion_mnist", 0.01, "ActiveFT"):
        c["top1"] += 5.0
    rnd = cells_at(t1b, "mnist", 0.001, "Random")
    rnd[0]["top1"] += 0.5  # the seeds' std of this cell is 2.7
    for c in cells_at(t1b, "mnist", 0.002, "K-Means"):
        c["ids_sha"] = "0" * 16
    t1b["cells"] = [c for c in t1b["cells"] if not (c["dataset"] == "mnist" and c["ratio"] == 0.005
                                                      and c["variant"] == "BiLAF")]
    (b / "table1.json").write_text(json.dumps(t1b))
    return a, b


def test_marks_only_the_cells_outside_the_noise(edited):
    a, b = edited
    text, flagged = compare.compare(compare.read_side(str(a)), compare.read_side(str(b)), names=("a", "b"))
    assert "|mean_B - mean_A| > max(std_A, std_B, tol)" in text and "tol = 0.05 points" in text
    changed = [ln for ln in text.splitlines() if ln.startswith("| **CHANGED**")]
    assert len(changed) == 1 and "fashion_mnist 1% | ActiveFT" in changed[0] and "+5" in changed[0]
    assert "| only in A | mnist 0.5% | BiLAF |" in text
    assert "## table6.json\n\nonly in A" in text
    assert "1 within noise" in text and "Random" not in text.split("## table6")[0].split("| mark |")[1]
    assert "selections differ in 1 cell(s)" in text  # K-Means: other ids, the same numbers
    assert flagged == 3  # the changed cell, the dropped cell, the missing table
    listed = compare.compare(compare.read_side(str(a)), compare.read_side(str(b)), show_all=True)[0]
    assert "| within noise | mnist 0.1% | Random |" in listed and "| identical | mnist 0.2% | K-Means |" in listed
    assert "3 of 3 differ" in listed.split("| identical | mnist 0.2% | K-Means |")[1].splitlines()[0]


def test_rule_uses_the_larger_std_and_the_tolerance():
    a = {("", "d", 0.01, "M"): compare.Cell(values={0: 50.0, 1: 52.0})}  # mean 51, std 1
    for b_vals, mark in (({0: 50.5, 1: 52.5}, "within noise"), ({0: 52.5, 1: 52.5}, "CHANGED"),
                         ({0: 50.0, 1: 52.0}, "identical")):
        assert compare.compare_cells(a, {("", "d", 0.01, "M"): compare.Cell(values=b_vals)}, "top1")[0].mark == mark
    one = {("", "d", 0.01, "M"): compare.Cell(values={0: 50.0})}  # one seed: only the 0.05-point tolerance
    assert compare.compare_cells(one, {("", "d", 0.01, "M"): compare.Cell(values={0: 50.04})}, "top1")[0].mark == \
        "within noise"
    assert compare.compare_cells(one, {("", "d", 0.01, "M"): compare.Cell(values={0: 50.1})}, "top1")[0].mark == \
        "CHANGED"
    skipped = {("", "d", 0.01, "M"): compare.Cell(status={0: "skipped"})}
    assert compare.compare_cells(skipped, one, "top1")[0].mark == "status changed"


def test_two_revisions_and_the_entry_point(edited, tmp_path):
    """``REV:PATH`` reads a revision's reports with git; ``python -m bench_suite.report compare`` is the entry
    point (a subprocess, once); a folder against itself at HEAD is all identical for the tables HEAD has."""
    a, b = edited
    res = subprocess.run([sys.executable, "-m", "bench_suite.report", "compare", str(a / "table1.json"),
                          str(b / "table1.json"), "--strict", "--out", str(tmp_path / "cmp.md")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 1, res.stderr[-2000:]  # --strict: something changed
    assert "**CHANGED**" in res.stdout and (tmp_path / "cmp.md").read_text() == res.stdout
    head = compare.read_side("HEAD:results/table1.json", cwd=ROOT)
    same = tmp_path / "head" / "table1.json"
    same.parent.mkdir()
    same.write_text(subprocess.run(["git", "show", "HEAD:results/table1.json"], cwd=ROOT, capture_output=True,
                                   text=True, check=True).stdout)
    text, flagged = compare.compare(head, compare.read_side(str(same)))
    assert flagged == 0 and "**CHANGED**" not in text and " identical" in text
    folder = compare.read_side("HEAD:results", cwd=ROOT)
    assert "table1.json" in folder and "table6.json" in folder


@pytest.mark.parametrize("spec, message", [
    ("nowhere", "no such folder or file"),
    ("HEAD:no/such/file.json", "git cat-file"),
])
def test_bad_sides_are_one_line_errors(spec, message, cli_error):
    line = cli_error(report.main, ["compare", spec, str(ROOT / "results")], cwd=ROOT)
    assert message in line


def test_not_a_report(tmp_path, cli_error):
    bad = tmp_path / "table1.json"
    bad.write_text("{}")
    assert "not a report JSON" in cli_error(report.main, ["compare", str(bad), str(ROOT / "results" / "table1.json")])
