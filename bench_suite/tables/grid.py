"""A table as a grid: (dataset x ratio) columns, one row per method or method variant, seeds averaged.

Tables 1, 3, 4, 5, 6 and 7 of the paper are all this shape; they differ in which rows they have (registry
methods, or ActiveFT with one option changed), which numbers they show, and what they quote from the paper.
A profile's table entry says::

    "6":
      recipe: linear_probe
      recipe_by_dataset: {imagenet: deit_finetune_imagenet}   # optional
      seeds: [0, 1, 2]            # optional, else the profile's seeds
      encoder: {...}              # optional, else the profile's encoder (Table 4 has one entry per encoder)
      cells: {mnist: [0.001, 0.002]}
      methods:                    # a registry name, or a variant of one
        - random
        - {label: "tau = 0.04", method: activeft, config: {temperature: 0.04}}
"""

from __future__ import annotations

from bench_suite import report
from bench_suite.data.registry import get_dataset
from bench_suite.methods import registry
from bench_suite.methods.base import options_of
from bench_suite.options import departures
from bench_suite.profiles import Profile
from bench_suite.progress import duration
from bench_suite.tables.cells import run_cells
from bench_suite.tables.common import Context, prepare_split, recipe_settings


def fmt_ratio(r: float) -> str:
    return f"{r * 100:g}%"


def rows_of(profile: Profile, table: str) -> list[dict]:
    """The table's rows as ``{label, method, config}`` (a variant's config goes over the profile's method config)."""
    return [{"label": row.label or registry.label(row.method), "method": row.method,
             "config": profile.method_options(row.method, row.config)} for row in profile.table(table).methods]


def _with_profile_recipe(profile: Profile, method: str, config: dict) -> dict:
    """A method that trains with a named recipe (the AL task model's ``task_recipe``) gets the profile's
    ``recipes:`` entry of that name as ``task_recipe_fields`` (under the method's own), as every other use of a
    recipe name in a profile does: the profile overrides the catalogue field by field."""
    fields = {f.name: f for f in options_of(registry.selector_class(method))}
    if "task_recipe" not in fields:
        return config
    entry = profile.recipes.get(config.get("task_recipe", fields["task_recipe"].default))
    if not entry:
        return config
    return {**config, "task_recipe_fields": {**entry, **(config.get("task_recipe_fields") or {})}}


def build_cells(profile: Profile, table: str) -> list[dict]:
    """Every (dataset, ratio, row, seed); active-learning rows get the dataset's ``al`` protocol (init/batch ratio)."""
    t = profile.table(table)
    cells = []
    for dataset, ratios in t.cells.items():
        al = profile.dataset(dataset).al
        recipe = t.recipe_by_dataset.get(dataset, t.recipe)
        for ratio in ratios:
            for row in t.methods:
                config = profile.method_options(row.method, row.config, dataset)
                if al and not registry.selector_class(row.method).label_free:
                    config = {**al, **config}
                config = _with_profile_recipe(profile, row.method, config)
                for seed in profile.seeds_of(table):
                    cells.append({"dataset": dataset, "ratio": float(ratio), "method": row.method,
                                  "variant": row.label or registry.label(row.method), "seed": seed,
                                  "method_config": config,
                                  "recipe": recipe})
    return cells


def run(ctx: Context, table: str, progress_factory=None) -> dict:
    """Prepare every dataset's pool and test features, then run (or load from cache) every cell."""
    enc = ctx.profile.encoder_of(table)
    stores = {d: (prepare_split(ctx, d, "pool", encoder=enc), prepare_split(ctx, d, "test", encoder=enc))
              for d in ctx.profile.table(table).cells}
    cells = build_cells(ctx.profile, table)
    progress = progress_factory(len(cells)) if progress_factory else None
    results = run_cells(ctx, cells, stores, progress, encoder=enc)
    return {"cells": results, "stores": {d: {"pool": len(s[0]), "test": len(s[1]), "pool_meta": s[0].meta}
                                         for d, s in stores.items()}}


def runner(table: str):
    """The ``run(ctx, progress_factory)`` of a grid table (what run.py calls)."""
    def run_table(ctx, progress_factory=None) -> dict:
        return run(ctx, table, progress_factory)
    return run_table


def columns(profile: Profile, table: str) -> list[tuple[str, float]]:
    return [(d, float(r)) for d, ratios in profile.table(table).cells.items() for r in ratios]


def pick(cells: list[dict], dataset: str, ratio: float, label: str) -> list[dict]:
    return [c for c in cells if c["dataset"] == dataset and abs(c["ratio"] - ratio) < 1e-12
            and c.get("variant", registry.label(c["method"])) == label]


def header(profile: Profile, table: str, cells: list[dict], first: str = "Methods") -> list[str]:
    labels = [r["label"] for r in rows_of(profile, table)]
    out = [first]
    for d, r in columns(profile, table):
        name = profile.dataset(d).label or get_dataset(d).label or d
        got = pick(cells, d, r, labels[0])
        out.append(f"{name} {fmt_ratio(r)}" + (f" (B={got[0]['budget']})" if got else ""))
    return out


def metric_rows(profile: Profile, table: str, cells: list[dict], fmt) -> list[list[str]]:
    """One row per method/variant; ``fmt(cells of one column)`` -> the column's text ("-" when empty). Cells that
    failed (a SLURM run's, ``"failed"``) are left out of ``fmt`` and counted: "71.0±0.5 (1 failed)", "failed"."""
    rows = []
    for row in rows_of(profile, table):
        line = [row["label"]]
        for d, r in columns(profile, table):
            got = pick(cells, d, r, row["label"])
            ok = [c for c in got if not c.get("failed")]
            text = fmt(ok) if ok and all(c.get("skipped") is None for c in ok) else "-"
            line.append(text if len(ok) == len(got) else f"{text} ({len(got) - len(ok)} failed)" if ok else "failed")
        rows.append(line)
    return rows


def transpose(head: list[str], rows: list[list[str]], first: str = "Sel. Ratio") -> tuple[list[str], list[list[str]]]:
    """Rows = columns of the grid, as the paper prints Tables 3, 5, 6 and 7 (one line per ratio)."""
    new_head = [first] + [r[0] for r in rows]
    return new_head, [[head[i]] + [r[i] for r in rows] for i in range(1, len(head))]


def top1(got: list[dict]) -> str:
    return report.mean_std([c["top1"] for c in got])


def miou(got: list[dict]) -> str:
    return report.mean_std([c["miou"] for c in got])


def emd(got: list[dict]) -> str:
    return f"{sum(c['emd'] for c in got) / len(got):.4f}"


def seconds(got: list[dict]) -> str:
    return duration(sum(c["selection_seconds"] for c in got) / len(got))


def setting_lines(profile: Profile, table: str, out: dict, what: str) -> list[str]:
    """The "Setting" section: encoder, recipe, datasets and their roles, seeds."""
    t = profile.table(table)
    enc = out["stores"][next(iter(t.cells))]["pool_meta"].get("encoder", {})
    pooling = profile.encoder_of(table).pooling or enc.get("pooling")
    recipe = recipe_settings(profile, t.recipe)
    lines = ["## Setting\n",
             f"- Encoder: `{enc.get('name')}` ({enc.get('arch')}, {enc.get('image_size')} px, pooling `{pooling}`). "
             f"{enc.get('note', '')}",
             f"- Evaluation recipe: `{t.recipe}` ({recipe}) - {what}"]
    for d in t.cells:
        dc = profile.dataset(d)
        st = out["stores"][d]
        lines.append(f"- `{d}` plays the role of {dc.role or '-'}: pool = {st['pool']} images of the "
                     f"`{dc.pool.split}` split, test = {st['test']} images. {dc.why}")
    if t.note:
        lines.append(f"- Note: {t.note}")
    lines += departure_lines(profile, table)
    lines.append(f"- Seeds: {profile.seeds_of(table)} (the seed drives the selection and the evaluation); "
                 "mean±std over seeds, std with ddof=0 (the population std, numpy's default; the paper does not "
                 "say which).\n")
    return lines


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def departure_lines(profile: Profile, table: str) -> list[str]:
    """Every method option that this profile sets away from the method's original (its default, or the
    ``original`` its ``opt`` names), from the resolved options; what a table row sets itself (Table 5-7's
    variable) is not counted. Per dataset where they differ."""
    t = profile.table(table)
    found: dict = {}
    for row in t.methods:
        for dataset in t.cells:
            opts = registry.get(row.method, **profile.method_options(row.method, row.config, dataset)).options
            diff = ", ".join(f"`{k}` {_show(v)} (original {_show(o)})" for k, v, o in departures(opts)
                             if k not in row.config)
            if diff:
                found.setdefault((registry.label(row.method), diff), []).append(dataset)
    what = "scaled down or changed" if profile.scaled_down else "set"
    if not found:
        return ["- Methods: every option at its original value (the method's paper / released code)."]
    lines = [f"- Method options {what} away from their originals (generated from the resolved options):"]
    for (label, diff), datasets in found.items():
        datasets = list(dict.fromkeys(datasets))
        where = "" if len(datasets) == len(t.cells) else f" on {', '.join(datasets)}"
        lines.append(f"  - {label}{where}: {diff}")
    return lines


def paper_reference(title: str, head: list[str], rows: list[list[str]], note: str) -> list[str]:
    return [f"## For reference: the paper's {title}\n",
            f"These are the published numbers, not ours; {note}\n",
            report.markdown_table(head, rows)]
