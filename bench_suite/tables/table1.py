"""Table 1: classification accuracy of each selection method at several sampling ratios, over seeds."""

from __future__ import annotations

import logging

import numpy as np

from bench_suite import report
from bench_suite.tables import paper_numbers
from bench_suite.tables.common import Context, prepare_split, run_cells

log = logging.getLogger(__name__)


def fmt_ratio(r: float) -> str:
    return f"{r * 100:g}%"


def build_cells(profile: dict) -> list[dict]:
    t = profile["tables"]["1"]
    cells = []
    for dataset, ratios in t["cells"].items():
        for ratio in ratios:
            for method in t["methods"]:
                for seed in profile["seeds"]:
                    cells.append({"dataset": dataset, "ratio": float(ratio), "method": method, "seed": int(seed),
                                  "method_config": profile.get("methods", {}).get(method) or {},
                                  "recipe": t["recipe"]})
    return cells


def run(ctx: Context, progress_factory=None) -> dict:
    profile = ctx.profile
    t = profile["tables"]["1"]
    stores = {d: (prepare_split(ctx, d, "pool"), prepare_split(ctx, d, "test")) for d in t["cells"]}
    cells = build_cells(profile)
    progress = progress_factory(len(cells)) if progress_factory else None
    results = run_cells(ctx, "table1", cells, stores, progress)
    return {"cells": results, "stores": {d: {"pool": len(s[0]), "test": len(s[1]), "pool_meta": s[0].meta}
                                         for d, s in stores.items()}}


def markdown(profile: dict, prov: dict, out: dict) -> str:
    t = profile["tables"]["1"]
    cells = out["cells"]
    cols = [(d, r) for d, ratios in t["cells"].items() for r in ratios]
    label = paper_numbers.METHOD_LABELS

    def pick(d, r, m):
        return [c for c in cells if c["dataset"] == d and abs(c["ratio"] - r) < 1e-12 and c["method"] == m]

    dnames = {d: profile["datasets"][d].get("label", d) for d in t["cells"]}
    header = ["Methods"] + [f"{dnames[d]} {fmt_ratio(r)} (B={pick(d, r, t['methods'][0])[0]['budget']})" for d, r in cols]
    acc_rows = [[label.get(m, m)] + [report.mean_std([c["top1"] for c in pick(d, r, m)]) for d, r in cols]
                for m in t["methods"]]
    emd_rows = [[label.get(m, m)] + [f"{np.mean([c['emd'] for c in pick(d, r, m)]):.4f}" for d, r in cols]
                for m in t["methods"]]
    sec_rows = [[label.get(m, m)] + [f"{np.mean([c['selection_seconds'] for c in pick(d, r, m)]):.2f}" for d, r in cols]
                for m in t["methods"]]
    enc = out["stores"][next(iter(t["cells"]))]["pool_meta"].get("encoder", {})
    recipe = profile["recipes"][t["recipe"]]
    parts = [
        f"# Table 1 - image classification ({profile['name']} profile)\n",
        report.provenance_markdown(prov, scaled_down=profile.get("scaled_down", True)),
        "## Setting\n",
        f"- Encoder: `{enc.get('name')}` ({enc.get('arch')}, {enc.get('image_size')} px, pooling "
        f"`{profile['encoder'].get('pooling') or enc.get('pooling')}`). {enc.get('note', '')}",
        f"- Evaluation recipe: `{t['recipe']}` ({recipe}) - the number in each cell is top-1 (%) of this recipe "
        "trained on the selected samples only, on the held-out test split.",
    ]
    for d in t["cells"]:
        dc = profile["datasets"][d]
        st = out["stores"][d]
        parts.append(f"- `{d}` plays the role of {dc.get('role', '-')}: pool = {st['pool']} images of the "
                     f"`{dc['pool'].get('split', 'train')}` split, test = {st['test']} images. {dc.get('why', '')}")
    parts.append(f"- Seeds: {profile['seeds']} (the seed drives the selection and the probe); mean±std over seeds.\n")
    parts += ["## Top-1 accuracy (%)\n", report.markdown_table(header, acc_rows, bold_max_cols=list(range(1, len(header)))),
              "## Selection quality: Eq. 16 EMD between pool and selection (lower = closer cover)\n",
              report.markdown_table(header, emd_rows),
              "## Selection wall time (s, mean over seeds)\n", report.markdown_table(header, sec_rows)]
    pcols = paper_numbers.TABLE1_COLUMNS
    prow = [[name] + [v or "-" for v in vals] for name, vals in paper_numbers.TABLE1.items()]
    parts += ["## For reference: the paper's Table 1 (DINO DeiT-S, full finetuning, 224 px)\n",
              "These are the published numbers, not ours; the datasets, encoder and recipe above differ.\n",
              report.markdown_table(["Methods"] + [f"{d} {r}" for d, r in pcols], prow)]
    return "\n".join(parts)
