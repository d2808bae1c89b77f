"""Compare two runs' reports cell by cell: ``python -m bench_suite.report compare A B``.

A and B are each a results folder (every ``tableN.json`` in it), one report JSON, or ``REV:PATH``, the same
read from git revision REV (``HEAD~3:results``, ``0e8c41c:results/table1.json``), so two versions of the code can
be compared without checking either out.

A cell here is one (sub-table, dataset, ratio, row) of a table, its values over the seeds. The rule, printed
with every comparison: a cell is **CHANGED** when

    |mean_B - mean_A| > max(std_A, std_B, tol)

with mean and std over the seeds (std with ddof=0, as the reports), i.e. when the difference is larger than
the seeds' spread in either run and larger than ``tol``, the difference expected with no change at all: 0.05
points of accuracy (top-1, mIoU; the cross-machine float rounding the README states), 1e-4 of EMD, and for
selection seconds 10% of the larger mean (wall time moves with machine load). Otherwise it is *identical*
(every seed's value equal) or *within noise*. Cells present in only one run, and cells skipped ("-") or
failed in one run but not the other, are listed too; so is whether the selections themselves changed (the
digest of the picked ids, per seed), which tells a change of the selection from a change of the evaluation.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench_suite.errors import BadInputError

TOLERANCE = {"top1": 0.05, "miou": 0.05, "emd": 1e-4}
SECONDS_RELATIVE = 0.10
TABLE_FILE = re.compile(r"^table\w+\.json$")
METRICS = ("top1", "miou", "emd", "selection_seconds")


def tolerance(metric: str, mean_a: float, mean_b: float) -> float:
    if metric == "selection_seconds":
        return SECONDS_RELATIVE * max(abs(mean_a), abs(mean_b))
    return TOLERANCE.get(metric, 0.05)


def rule_text(metric: str) -> str:
    tol = ("10% of the larger mean (wall time moves with machine load)" if metric == "selection_seconds" else
           f"{TOLERANCE.get(metric, 0.05):g}" + (" points (float rounding between machines)"
                                                  if metric in ("top1", "miou") else ""))
    return (f"a cell (sub-table x dataset x ratio x row; values over the seeds) is CHANGED when "
            f"|mean_B - mean_A| > max(std_A, std_B, tol), std over the seeds with ddof=0, tol = {tol}; "
            "otherwise identical (every seed equal) or within noise")


# ----------------------------------------------------------------------------------- reading the two sides
def _git(args: list[str], cwd: Path) -> str:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BadInputError(f"git {' '.join(args)}: {exc}") from exc
    if res.returncode != 0:
        raise BadInputError(f"git {' '.join(args)}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'failed'}")
    return res.stdout


def read_side(spec: str, cwd: Path | None = None) -> dict[str, dict]:
    """``{file name: report JSON}`` of a folder, a JSON file, or ``REV:PATH`` (a folder or file at a git
    revision; PATH relative to the repository root)."""
    cwd = Path(cwd or Path.cwd())
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = cwd / path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if TABLE_FILE.match(p.name))
        if not files:
            raise BadInputError(f"{spec}: no tableN.json in this folder")
        return {p.name: _parse(p.read_text(), str(p)) for p in files}
    if path.is_file():
        return {path.name: _parse(path.read_text(), str(path))}
    if ":" in spec:
        rev, _, rel = spec.partition(":")
        rel = rel.strip("/") or "."
        top = Path(_git(["rev-parse", "--show-toplevel"], cwd).strip())
        kind = _git(["cat-file", "-t", f"{rev}:{rel}"], top).strip()
        if kind == "tree":
            names = [n for n in _git(["ls-tree", "--name-only", f"{rev}:{rel}"], top).split() if TABLE_FILE.match(n)]
            if not names:
                raise BadInputError(f"{spec}: no tableN.json in this folder at {rev}")
            return {n: _parse(_git(["show", f"{rev}:{rel}/{n}"], top), f"{spec}/{n}") for n in names}
        return {Path(rel).name: _parse(_git(["show", f"{rev}:{rel}"], top), spec)}
    raise BadInputError(f"{spec}: no such folder or file (and not REV:PATH)")


def _parse(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadInputError(f"{where}: not a report JSON ({exc})") from exc
    if not isinstance(data, dict) or not ("cells" in data or "parts" in data):
        raise BadInputError(f"{where}: not a report JSON (no 'cells' or 'parts'); give results/tableN.json")
    return data


@dataclass
class Cell:
    """One (sub-table, dataset, ratio, row): per seed, its value, selection digest and status."""
    values: dict = field(default_factory=dict)  # seed -> float
    ids: dict = field(default_factory=dict)  # seed -> ids_sha
    status: dict = field(default_factory=dict)  # seed -> "skipped" | "failed"


def cells_of(report: dict, metric: str) -> dict[tuple, Cell]:
    """``{(part, dataset, ratio, row): Cell}`` of one report."""
    groups = [(p.get("label", ""), p["cells"]) for p in report.get("parts", [])] or [("", report.get("cells", []))]
    out: dict = {}
    for part, cells in groups:
        for c in cells:
            key = (part, str(c.get("dataset")), float(c.get("ratio", 0.0)), str(c.get("variant") or c.get("method")))
            cell = out.setdefault(key, Cell())
            seed = c.get("seed")
            if c.get("skipped") or c.get("failed"):
                cell.status[seed] = "skipped" if c.get("skipped") else "failed"
            elif c.get(metric) is not None:
                cell.values[seed] = float(c[metric])
            if c.get("ids_sha"):
                cell.ids[seed] = c["ids_sha"]
    return out


def default_metric(name: str, report: dict) -> str:
    """The table's headline metric (the tables registry's ``headline_metric``), else the first of top1, miou
    that its cells have."""
    match = re.match(r"^table(\w+)\.json$", name)
    if match:
        try:
            from bench_suite.tables.registry import get_table

            return get_table(match.group(1)).headline_metric[0]
        except Exception:  # noqa: BLE001 - an unknown table: fall back on the cells
            pass
    cells = list(report.get("cells", [])) + [c for p in report.get("parts", []) for c in p["cells"]]
    return next((m for m in METRICS if any(c.get(m) is not None for c in cells)), "top1")


# ----------------------------------------------------------------------------------- comparing
@dataclass
class Row:
    key: tuple
    mark: str  # CHANGED | within noise | identical | skipped in both | only in A | only in B | status changed | no numbers
    a: str
    b: str
    diff: float | None = None
    noise: float | None = None
    selections: str = ""


def _stats(values: dict) -> tuple[float, float, int]:
    v = np.array(list(values.values()), dtype=float)
    return float(v.mean()), float(v.std(ddof=0)), len(v)


def _fmt(values: dict, status: dict, metric: str) -> str:
    if not values:
        return ", ".join(sorted(set(status.values()))) or "-"
    m, s, n = _stats(values)
    digits = 4 if metric == "emd" else 2
    return f"{m:.{digits}f}±{s:.{digits}f} (n={n})" + (f", {len(status)} {'/'.join(sorted(set(status.values())))}"
                                                        if status else "")


def compare_cells(a: dict[tuple, Cell], b: dict[tuple, Cell], metric: str) -> list[Row]:
    rows = []
    for key in list(a) + [k for k in b if k not in a]:
        ca, cb = a.get(key), b.get(key)
        if ca is None or cb is None:
            rows.append(Row(key, "only in A" if cb is None else "only in B",
                            _fmt(ca.values, ca.status, metric) if ca else "", _fmt(cb.values, cb.status, metric) if cb else ""))
            continue
        sel = ""
        common = [s for s in ca.ids if s in cb.ids]
        if common:
            differ = sum(ca.ids[s] != cb.ids[s] for s in common)
            sel = "same" if not differ else f"{differ} of {len(common)} differ"
        fa, fb = _fmt(ca.values, ca.status, metric), _fmt(cb.values, cb.status, metric)
        if ca.status != cb.status and (ca.status or cb.status):
            rows.append(Row(key, "status changed", fa, fb, selections=sel))
            continue
        if not ca.values and not cb.values and ca.status:  # the paper's "-" in both
            rows.append(Row(key, "skipped in both", fa, fb, selections=sel))
            continue
        if not ca.values or not cb.values:
            rows.append(Row(key, "no numbers", fa, fb, selections=sel))
            continue
        (ma, sa, _), (mb, sb, _) = _stats(ca.values), _stats(cb.values)
        diff = mb - ma
        noise = max(sa, sb, tolerance(metric, ma, mb))
        if ca.values == cb.values:
            mark = "identical"
        elif abs(diff) > noise:
            mark = "CHANGED"
        else:
            mark = "within noise"
        rows.append(Row(key, mark, fa, fb, diff, noise, sel))
    return rows


def _column(key: tuple) -> str:
    part, dataset, ratio, _ = key
    return (f"{part[:40]}: " if part else "") + f"{dataset} {ratio * 100:g}%"


def _prov(report: dict) -> str:
    p = report.get("provenance", {})
    return ", ".join(f"{k} {p[k]}" for k in ("git_revision", "date", "profile") if p.get(k)) or "no provenance"


def compare(side_a: dict[str, dict], side_b: dict[str, dict], *, names=("A", "B"), metric: str | None = None,
            show_all: bool = False) -> tuple[str, int]:
    """The comparison as markdown, and the number of CHANGED cells (plus cells only in one run or with a changed
    status)."""
    lines = []
    flagged = 0
    rules: dict = {}
    files = list(side_a) + [f for f in side_b if f not in side_a]
    for name in files:
        ra, rb = side_a.get(name), side_b.get(name)
        if ra is None or rb is None:
            lines += [f"## {name}", "", f"only in {'A' if rb is None else 'B'}", ""]
            flagged += 1
            continue
        m = metric or default_metric(name, rb)
        rules.setdefault(m, []).append(name)
        rows = compare_cells(cells_of(ra, m), cells_of(rb, m), m)
        counts: dict = {}
        for r in rows:
            counts[r.mark] = counts.get(r.mark, 0) + 1
        changed = [r for r in rows if r.mark == "CHANGED"]
        up = sum(1 for r in changed if r.diff > 0)
        sel_diff = sum(1 for r in rows if r.selections and r.selections != "same")
        order = ("identical", "within noise", "skipped in both", "CHANGED", "status changed", "only in A", "only in B",
                 "no numbers")
        summary = ", ".join(f"{counts[k]} {k}" + (f" ({up} up, {len(changed) - up} down)" if k == "CHANGED" else "")
                            for k in order if counts.get(k))
        lines += [f"## {name}: {m}", "",
                  f"- A: {_prov(ra)}", f"- B: {_prov(rb)}",
                  f"- {len(rows)} cells: {summary}; selections differ in {sel_diff} cell(s)"
                  + (" (of those whose selections both runs recorded)." if sel_diff else "."), ""]
        shown = [r for r in rows if show_all or r.mark not in ("identical", "within noise", "skipped in both")]
        if shown:
            lines += ["| mark | column | row | A | B | B - A | noise max(std, tol) | selections |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in shown:
                mark = f"**{r.mark}**" if r.mark == "CHANGED" else r.mark
                lines.append(f"| {mark} | {_column(r.key)} | {r.key[3]} | {r.a} | {r.b} | "
                             + (f"{r.diff:+.4g}" if r.diff is not None else "") + " | "
                             + (f"{r.noise:.4g}" if r.noise is not None else "") + f" | {r.selections} |")
            lines.append("")
        elif rows:
            lines += ["No cell outside the seeds' noise" + (" (pass --all to list every cell)." if not show_all else "."),
                      ""]
        flagged += sum(1 for r in rows if r.mark in ("CHANGED", "status changed", "only in A", "only in B"))
    head = [f"# Comparing {names[0]} (A) with {names[1]} (B)", ""]
    for m, tables in rules.items():
        head.append(f"- Rule for {m} ({', '.join(tables)}): {rule_text(m)}.")
    head += [f"- Marked: {flagged} (CHANGED cells, cells whose status changed, cells or tables in one run only).", ""]
    return "\n".join(head + lines).rstrip() + "\n", flagged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench_suite.report compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="results folder, tableN.json, or REV:PATH (e.g. HEAD~1:results)")
    p.add_argument("b", help="the same, for the other run")
    p.add_argument("--metric", choices=METRICS, help="the number to compare (default: each table's headline metric)")
    p.add_argument("--all", action="store_true", help="list every cell, not only those outside the noise")
    p.add_argument("--out", help="also write the comparison (markdown) to this file")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when a cell changed (or appears in one run only)")
    args = p.parse_args(argv)
    text, flagged = compare(read_side(args.a), read_side(args.b), names=(args.a, args.b), metric=args.metric,
                            show_all=args.all)
    if args.out:
        from bench_suite import atomic

        atomic.write_text(args.out, text)
    sys.stdout.write(text)
    return 1 if (args.strict and flagged) else 0
