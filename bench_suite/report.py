"""Reports: provenance header, mean ± std markdown tables, atomic writes of .md and .json."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from bench_suite import atomic
from bench_suite.digest import json_digest
from bench_suite.progress import duration

PACKAGES = ("torch", "torchvision", "timm", "accelerate", "webdataset", "numpy", "scikit-learn", "faiss-cpu")


def git_revision(root: Path | None = None) -> str:
    """HEAD, with "+dirty" when tracked files differ from it (the committed reports in results/ do not count:
    regenerating one table must not mark the next one dirty)."""
    root = root or Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> str:
    import torch

    from bench_suite.runtime import processor_name

    cpu = processor_name()
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = "RAM unknown"
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "no GPU")
    return f"{cpu}, {os.cpu_count()} cores, {mem}, {gpu}"


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for pkg in PACKAGES:
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def provenance(profile, seeds, world: int, extra: dict | None = None) -> dict:
    """Where a report's numbers come from (``profile`` is a bench_suite.profiles.Profile)."""
    return {
        "command": " ".join(shlex.quote(a) for a in sys.argv) or "(python api)",
        "profile": profile.name,
        "profile_note": profile.description,
        "git_revision": git_revision(),
        "hardware": hardware(),
        "processes": world,
        "versions": versions(),
        "seeds": list(seeds),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **(extra or {}),
    }


def provenance_markdown(prov: dict, scaled_down: bool) -> str:
    lines = ["| | |", "|---|---|"]
    for key in ("command", "profile", "git_revision", "date", "hardware", "processes", "versions", "seeds"):
        val = prov.get(key)
        lines.append(f"| {key.replace('_', ' ')} | `{val}` |" if key in ("command",) else f"| {key.replace('_', ' ')} | {val} |")
    for key, val in prov.items():
        if key not in ("command", "profile", "git_revision", "date", "hardware", "processes", "versions", "seeds",
                       "profile_note"):
            lines.append(f"| {key.replace('_', ' ')} | {val} |")
    note = ""
    if scaled_down:
        note = ("\n> **This is the `{}` profile, not the paper's setting.** {}\n"
                .format(prov["profile"], prov.get("profile_note", "")).rstrip() + "\n")
    return "\n".join(lines) + "\n" + note


def mean_std(values) -> str:
    vals = np.asarray([v for v in values if v is not None], dtype=float)
    if len(vals) == 0:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{vals.mean():.1f}±{vals.std(ddof=0):.1f}"


def markdown_table(header: list[str], rows: list[list[str]], bold_max_cols: list[int] | None = None) -> str:
    """Plain pipe table; in ``bold_max_cols`` the best mean (the number before '±') is bolded."""
    rows = bold_best(rows, bold_max_cols or [])
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def bold_best(rows: list[list[str]], cols: list[int]) -> list[list[str]]:
    """A copy of ``rows`` where, in each of ``cols``, the best mean (the number before '±') is bolded."""
    rows = [list(r) for r in rows]
    for c in cols:
        best, best_r = None, []
        for i, r in enumerate(rows):
            try:
                v = float(r[c].split("±")[0])
            except (ValueError, IndexError):
                continue
            if best is None or v > best + 1e-9:
                best, best_r = v, [i]
            elif abs(v - best) <= 1e-9:
                best_r.append(i)
        for i in best_r:
            rows[i][c] = f"**{rows[i][c]}**"
    return rows


REPORT_SECONDS = "<report seconds>"  # filled in once the report is written (run.py)


def selection_cost(cell: dict) -> float:
    """What selecting cost when the cell was computed: its selection time, except for an active-learning cell
    that took its rounds from a longer run (``tables.al_prefix``): that run is counted once, in the cell that
    ran it, and the prefix costs what taking it did."""
    spent = (cell.get("selection_info") or {}).get("compute_seconds")
    return float(spent if spent is not None else cell.get("selection_seconds") or 0.0)


def _per_row(cells: list[dict], top: int) -> str:
    """Selection cost summed per table row (the row's label), the largest ``top`` first, then the rest."""
    per: dict = {}
    for c in cells:
        row = c.get("variant") or c.get("method")
        per[row] = per.get(row, 0.0) + selection_cost(c)
    ranked = sorted(per.items(), key=lambda kv: -kv[1])
    parts = [f"{row} {duration(sec)}" for row, sec in ranked[:top]]
    if len(ranked) > top:
        parts.append(f"{len(ranked) - top} others {duration(sum(sec for _, sec in ranked[top:]))}")
    return ", ".join(parts)


def time_by_stage(elapsed: float, timing: dict, cells: list[dict], top: int = 4) -> str:
    """Where a table run's wall time went, one line from what the run recorded (``tables.common.Context.timing``
    and the cells): shards, feature extraction, the cells (selection summed per row, the largest ``top``; the
    finetune / probe; the rest: loading, EMD, waiting), the report (plot and markdown: ``REPORT_SECONDS``, filled
    in by the caller once written). Cells found in the cache cost this run nothing; their recorded times are
    shown as recorded earlier."""
    def stage(name: str, made: str, cached: str, verb: str) -> str:
        n_made, n_cached = int(timing.get(made, 0)), int(timing.get(cached, 0))
        what = ", ".join(x for x in (f"{n_made} {verb}" if n_made else "", f"{n_cached} cached" if n_cached else "")
                         if x)
        return f"{name} {duration(float(timing.get(name, 0.0)))}" + (f" ({what})" if what else "")

    done = timing.get("computed", set())
    real = [c for c in cells if not c.get("skipped") and not c.get("failed") and "selection_seconds" in c]
    here = [c for c in real if c.get("key") and json_digest(c["key"]) in done]
    earlier = [c for c in real if not (c.get("key") and json_digest(c["key"]) in done)]

    def train_seconds(cs):
        return sum(float(c.get("wall_seconds", c.get("seconds")) or 0.0) for c in cs)

    sel = sum(selection_cost(c) for c in here)
    cells_s = float(timing.get("cells", 0.0))
    parts = [f"{duration(elapsed)} in all", stage("shards", "shards_made", "shards_cached", "written"),
             stage("features", "features_made", "features_cached", "extracted")]
    if here:
        parts.append(f"cells {duration(cells_s)} for {len(here)} computed: selection {duration(sel)} "
                     f"({_per_row(here, top)}), finetune/probe {duration(train_seconds(here))}, "
                     f"rest {duration(max(0.0, cells_s - sel - train_seconds(here)))}")
    else:
        parts.append(f"cells {duration(cells_s)} (none computed)")
    parts.append(f"report {REPORT_SECONDS}")
    line = "; ".join(parts)
    if earlier:
        line += (f"; {len(earlier)} cells from the cache, recorded earlier: selection "
                 f"{duration(sum(selection_cost(c) for c in earlier))} ({_per_row(earlier, top)}), "
                 f"finetune/probe {duration(train_seconds(earlier))}")
    return line


def write_report(out_dir, stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    atomic.write_json(js, data)
    atomic.write_text(md, markdown)
    return md, js


def headline(groups: list[tuple[str, list[dict]]], metric: str, higher_better: bool = True) -> str:
    """One sentence from a table's numbers: which row is best in how many of its (dataset, ratio) columns, how
    ActiveFT fares, and how many rows sit within one std (over seeds) of the best. ``groups``: (label, cells)
    per sub-table (Table 4 has one per encoder)."""
    wins: dict = {}
    near: dict = {}
    n_cols = 0
    for _, cells in groups:
        cols: dict = {}
        for c in cells:
            if c.get("skipped") or c.get(metric) is None:
                continue
            cols.setdefault((c["dataset"], c["ratio"]), {}).setdefault(c.get("variant") or c["method"], []).append(
                float(c[metric]))
        for rows in cols.values():
            stats = {r: (float(np.mean(v)), float(np.std(v))) for r, v in rows.items()}
            best = (max if higher_better else min)(stats, key=lambda r: stats[r][0])
            n_cols += 1
            wins[best] = wins.get(best, 0) + 1
            for r, (m, s) in stats.items():
                if r != best and abs(m - stats[best][0]) <= max(s, stats[best][1]):
                    near[r] = near.get(r, 0) + 1
    if not n_cols:
        return "no numbers"
    top = max(wins, key=wins.get)
    what = "best" if higher_better else "fastest" if "seconds" in metric else "lowest"
    parts = [f"{top} {what} in {wins[top]} of {n_cols} column{'s' if n_cols > 1 else ''} ({metric})"]
    activeft = next((r for r in {*wins, *near} if r.startswith("ActiveFT")), None)
    if activeft and activeft != top:
        parts.append(f"{activeft} {what} in {wins.get(activeft, 0)}, within one std of the best in "
                     f"{near.get(activeft, 0)}")
    runner = max((r for r in near if r != top), key=near.get, default=None)
    if runner and runner != activeft:
        parts.append(f"{runner} within one std of the best in {near[runner]}")
    return "; ".join(parts)


def write_index(out_dir, entries: list[dict]) -> Path:
    """``results/README.md``: one line per table (headline, report link, wall time, revision)."""
    lines = ["# Results", "",
             "Written by `bench_suite/run.py --table all`; each line links the table's report (its provenance "
             "header says the profile, hardware, seeds and revisions).", "",
             "| table | headline | wall time | revision | profile |", "|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| [{e['name']}. {e['title']}]({e['report']}) | {e['headline']} | {duration(e['seconds'])} | "
                     f"{e['revision']} | {e['profile']} |")
    path = Path(out_dir) / "README.md"
    atomic.write_text(path, "\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    """``python -m bench_suite.report compare A B``: two runs' reports cell by cell (``bench_suite.cli.compare``)."""
    from bench_suite.cli import main_guard
    from bench_suite.cli.compare import main as compare_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "compare":
        print("usage: python -m bench_suite.report compare A B [--metric M] [--all] [--out FILE] [--strict]\n"
              "  A, B: a results folder, a tableN.json, or REV:PATH (a git revision's, e.g. HEAD~1:results)",
              file=sys.stderr)
        return 2
    return main_guard(compare_main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
