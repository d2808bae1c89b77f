"""Plots of the reports (orchestration): accuracy against the budget (Table 1), against tau (Table 6) and T
(Table 7), with error bars over the seeds; and the drawing of the paper's Figures 3 and 4 (``bench_suite.cli.
figures`` computes them).

matplotlib is used through its object API (``matplotlib.figure.Figure``, rendered by Agg): no pyplot, no GUI
backend, no global state, so it runs headless anywhere. matplotlib is imported only when a plot is drawn
(the table registry imports this package's modules, and most runs never plot). Every PNG is written to a
temporary sibling and renamed (``bench_suite.atomic``); the PNG carries no date or version metadata, so the
same numbers give the same bytes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from bench_suite import atomic

log = logging.getLogger(__name__)

DPI = 110
CAPTION = "mean over the seeds; error bars: ±1 std over the seeds (ddof=0, as in the tables)"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_png(fig, path) -> Path:
    """Write ``fig`` to ``path`` atomically (PNG, no metadata)."""
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _colors(n: int) -> list:
    """``n`` distinct colours: tab10, then black, gold and navy (12 methods stay told apart)."""
    from matplotlib import colormaps

    base = [colormaps["tab10"](i) for i in range(10)] + ["black", "gold", "navy"]
    return [base[i % len(base)] for i in range(n)]


MARKERS = "osD^v<>pPX*h"


# ----------------------------------------------------------------------------------- grouping of table cells
def series(cells: list[dict], metric: str, panel_of, line_of, x_of) -> dict:
    """``{panel: {line: [(x, mean, std, n)]}}`` over the cells that have ``metric`` (skipped ("-") and failed
    cells are left out); mean and std (ddof=0) over the seeds, x ascending; insertion order of panels and lines
    follows the cells'."""
    groups: dict = {}
    for c in cells:
        if c.get("skipped") or c.get("failed") or c.get(metric) is None:
            continue
        groups.setdefault(panel_of(c), {}).setdefault(line_of(c), {}).setdefault(x_of(c), []).append(float(c[metric]))
    return {p: {ln: [(x, float(np.mean(v)), float(np.std(v)), len(v)) for x, v in sorted(xs.items())]
                for ln, xs in lines.items()} for p, lines in groups.items()}


def plot_series(path, data: dict, *, xlabel: str, ylabel: str, title: str, logx: bool = False,
                xticks: dict | None = None, legend_title: str | None = None) -> Path:
    """One panel per key of ``data`` (``series``' shape), one line with error bars per line label. ``xticks``:
    ``{panel: {x: tick label}}``."""
    panels = list(data)
    lines = list(dict.fromkeys(ln for p in panels for ln in data[p]))
    colors = dict(zip(lines, _colors(len(lines))))
    ncols = min(len(panels), 2) or 1
    nrows = -(-len(panels) // ncols) or 1
    fig = _figure(5.2 * ncols + (2.2 if len(lines) > 1 else 0), 3.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        xs_all = sorted({x for pts in data[panel].values() for x, *_ in pts})
        for i, ln in enumerate(lines):
            pts = data[panel].get(ln)
            if not pts:
                continue
            x = np.array([p[0] for p in pts], dtype=float)
            # spread the lines a little sideways so that their error bars do not hide each other
            shift = (i - (len(lines) - 1) / 2) * 0.012
            x = x * (1 + shift) if logx else x + shift * (max(xs_all) - min(xs_all) if len(xs_all) > 1 else 1)
            ours = str(ln).startswith("ActiveFT")  # the paper's method stands out
            ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], label=ln, color=colors[ln],
                        marker=MARKERS[i % len(MARKERS)], markersize=5 if ours else 4,
                        linewidth=2.4 if ours else 1.2, capsize=2.5, zorder=3 if ours else 2)
        if logx:
            ax.set_xscale("log")
        ticks = (xticks or {}).get(panel)
        if ticks:
            ax.set_xticks(list(ticks), list(ticks.values()))
            ax.minorticks_off()
        ax.set_title(str(panel) + (f": {lines[0]}" if len(lines) == 1 else ""), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if len(lines) > 1:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8,
                   title=legend_title, title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


# ----------------------------------------------------------------------------------- the tables' plots
def budget_plot(path, cells: list[dict], dataset_label, *, metric: str = "top1", title: str) -> Path:
    """Table 1: ``metric`` against the sampling ratio, one line per method, one panel per dataset; the ticks
    name the ratio and the budget B."""
    data = series(cells, metric, lambda c: dataset_label(c["dataset"]), lambda c: c.get("variant") or c["method"],
                  lambda c: float(c["ratio"]) * 100)
    ticks: dict = {}
    for c in cells:
        if "budget" in c:
            ticks.setdefault(dataset_label(c["dataset"]), {})[float(c["ratio"]) * 100] = \
                f"{float(c['ratio']) * 100:g}%\nB={c['budget']}"
    ticks = {p: dict(sorted(t.items())) for p, t in ticks.items()}
    return plot_series(path, data, xlabel="sampling ratio (budget B)", ylabel=_ylabel(metric), title=title,
                       logx=True, xticks=ticks, legend_title="method")


def variant_plot(path, cells: list[dict], x_of_label: dict, dataset_label, *, xlabel: str, metric: str = "top1",
                 title: str, logx: bool = False) -> Path:
    """Tables 6 and 7: ``metric`` against a variant's value (tau, T), one line per sampling ratio, one panel per
    dataset. ``x_of_label``: row label -> its numeric value."""
    cells = [c for c in cells if c.get("variant") in x_of_label]
    data = series(cells, metric, lambda c: dataset_label(c["dataset"]),
                  lambda c: f"{float(c['ratio']) * 100:g}%" + (f" (B={c['budget']})" if "budget" in c else ""),
                  lambda c: float(x_of_label[c["variant"]]))
    xs = sorted(set(x_of_label.values()))
    ticks = {p: {float(x): f"{x:g}" for x in xs} for p in data}
    return plot_series(path, data, xlabel=xlabel, ylabel=_ylabel(metric), title=title, logx=logx, xticks=ticks,
                       legend_title="sampling ratio")


def _ylabel(metric: str) -> str:
    return {"top1": "top-1 accuracy (%)", "miou": "mIoU (%)"}.get(metric, metric)


# ----------------------------------------------------------------------------------- the paper's figures
def figure3_plot(path, pools: dict, *, tau: float, title: str) -> Path:
    """Figure 3: per pool (a panel), the average exponential similarity E_i[exp(sim(f_i, theta^(k)) / tau)]
    of each sample to its k-th most similar parameter, k = 1..K, as bars (log scale), one bar group per budget.
    ``pools``: ``{panel: {budget label: (mean per k, std per k over draws)}}``."""
    panels = list(pools)
    fig = _figure(max(7.0, 5.0 * len(panels) + 0.5), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        budgets = list(pools[panel])
        colors = _colors(len(budgets))
        width = 0.8 / len(budgets)
        for j, b in enumerate(budgets):
            mean, std = (np.asarray(a, dtype=float) for a in pools[panel][b])
            k = np.arange(1, len(mean) + 1)
            ax.bar(k + (j - (len(budgets) - 1) / 2) * width, mean, width=width, yerr=std, color=colors[j], label=b,
                   capsize=1.5, error_kw={"linewidth": 0.8})
        ax.set_yscale("log")
        ax.set_xticks(np.arange(1, len(mean) + 1, 2 if len(mean) > 10 else 1))
        ax.set_xlabel("k-th most similar parameter")
        ax.set_ylabel(f"E_i[exp(sim / tau)], tau = {tau:g}")
        ax.set_title(str(panel), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


def figure4_plot(path, xy: np.ndarray, labels: np.ndarray | None, picks: dict, *, title: str) -> Path:
    """Figure 4: the t-SNE embedding ``xy`` (n x 2) coloured by class, one panel per method with its picks
    (``{panel title: row indices into xy}``) in black."""
    names = list(picks)
    ncols = min(4, len(names)) or 1
    nrows = -(-len(names) // ncols) or 1
    fig = _figure(3.4 * ncols, 3.4 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if labels is not None:
        classes = np.unique(labels)
        cmap = dict(zip(classes.tolist(), _colors(len(classes))))
        colors = np.array([cmap[v] for v in np.asarray(labels).tolist()])
    else:
        colors = np.array([(0.6, 0.6, 0.6, 1.0)] * len(xy))
    for ax, name in zip(axes, names):
        ax.scatter(xy[:, 0], xy[:, 1], s=3 if len(xy) > 2000 else 6, c=colors, alpha=0.5, linewidths=0,
                   rasterized=True)
        rows = np.asarray(picks[name], dtype=int)
        ax.scatter(xy[rows, 0], xy[rows, 1], s=9, c="black", linewidths=0)
        ax.set_title(f"{name} ({len(rows)})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


def png_check(path) -> tuple[int, int, float]:
    """(width, height, fraction of pixels that are not background): what the tests check of every PNG."""
    from matplotlib import image

    img = image.imread(str(path))
    rgb = np.asarray(img)[..., :3].astype(float)
    background = rgb[0, 0]
    ink = float(np.mean(np.abs(rgb - background).sum(axis=-1) > 0.05))
    return img.shape[1], img.shape[0], ink


# ----------------------------------------------------------------------------------- a table's plot, beside its report
def plotted(run, table: str, draw):
    """Wrap a table's ``run(ctx, progress_factory)``: after the cells, rank 0 draws ``draw(profile, out, path)``
    to ``<out>/table<N>.png`` (next to the report, atomically) and records its name as ``out["plot"]``, which
    the markdown embeds. A plot that fails to draw is logged and left out; it never costs the table."""

    def run_table(ctx, progress_factory=None) -> dict:
        out = run(ctx, progress_factory)
        if ctx.rank == 0:
            name = f"table{table}.png"
            t0 = time.perf_counter()
            try:
                draw(ctx.profile, out, Path(ctx.out) / name)
                out["plot"] = name
            except Exception as exc:  # noqa: BLE001 - a plot is never worth an hour of cells
                log.warning("table %s: the plot was not drawn (%s: %s); the report has no plot", table,
                            type(exc).__name__, exc)
            timing = getattr(ctx, "timing", None)
            if isinstance(timing, dict):  # the report's stage (report.time_by_stage)
                timing["report"] = timing.get("report", 0.0) + time.perf_counter() - t0
        return out
    return run_table


def embed(out: dict, what: str) -> str:
    """The markdown that shows a table's plot (empty when it has none)."""
    if not out.get("plot"):
        return ""
    return f"![{what}]({out['plot']})\n\n*{what}: {CAPTION}.*\n"


def dataset_label(profile, dataset: str) -> str:
    from bench_suite.data.registry import get_dataset

    try:
        return profile.dataset(dataset).label or get_dataset(dataset).label or dataset
    except Exception:  # noqa: BLE001 - a label is cosmetic
        return dataset
