"""Table 1: classification accuracy of each selection method at several sampling ratios, over seeds."""

from __future__ import annotations

from bench_suite import report
from bench_suite.tables import grid, paper_numbers

TABLE = "1"


run = grid.runner(TABLE)


def markdown(profile: dict, prov: dict, out: dict) -> str:
    cells = out["cells"]
    head = grid.header(profile, TABLE, cells)
    acc = grid.metric_rows(profile, TABLE, cells, grid.top1)
    parts = [f"# Table 1 - image classification ({profile['name']} profile)\n",
             report.provenance_markdown(prov, scaled_down=profile.get("scaled_down", True)),
             *grid.setting_lines(profile, TABLE, out, "the number in each cell is top-1 (%) of this recipe trained "
                                 "on the selected samples only, on the held-out test split."),
             "## Top-1 accuracy (%)\n",
             report.markdown_table(head, acc, bold_max_cols=list(range(1, len(head)))),
             "\"-\": the budget does not exceed the active-learning method's random initial set, as in the paper.\n"
             if any(c.get("skipped") for c in cells) else "",
             "## Selection quality: Eq. 16 EMD between pool and selection (lower = closer cover)\n",
             report.markdown_table(head, grid.metric_rows(profile, TABLE, cells, grid.emd)),
             "## Selection wall time (mean over seeds)\n",
             report.markdown_table(head, grid.metric_rows(profile, TABLE, cells, grid.seconds))]
    prow = [[name] + [v or "-" for v in vals] for name, vals in paper_numbers.TABLE1.items()]
    parts += grid.paper_reference("Table 1 (DINO DeiT-S, full finetuning, 224 px)",
                                  ["Methods"] + [f"{d} {r}" for d, r in paper_numbers.TABLE1_COLUMNS], prow,
                                  "the datasets, encoder and recipe above differ.")
    return "\n".join(p for p in parts if p is not None)
