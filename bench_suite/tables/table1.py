"""Table 1: classification accuracy of each selection method at several sampling ratios, over seeds."""

from __future__ import annotations

from bench_suite import report
from bench_suite.profiles import Profile
from bench_suite.tables import grid, plots
from bench_suite.tables.registry import TableSpec, register

TABLE = "1"

# The paper's Table 1: top-1 accuracy (%) mean±std over three trials; None = "-" in the paper.
PAPER_COLUMNS = [("CIFAR10", "0.5%"), ("CIFAR10", "1%"), ("CIFAR10", "2%"), ("CIFAR100", "1%"), ("CIFAR100", "2%"),
                 ("CIFAR100", "5%"), ("CIFAR100", "10%"), ("ImageNet", "1%"), ("ImageNet", "5%")]
PAPER_ROWS = {
    "Random": ["77.3±2.6", "82.2±1.9", "88.9±0.4", "14.9±1.9", "24.3±2.0", "50.8±3.4", "69.3±0.7", "45.1±0.8", "64.3±0.3"],
    "FDS": ["64.5±1.5", "73.2±1.2", "81.4±0.7", "8.1±0.6", "12.8±0.3", "16.9±1.4", "52.3±1.9", "26.7±0.6", "55.5±0.1"],
    "K-Means": ["83.0±3.5", "85.9±0.8", "89.6±0.6", "17.6±1.1", "31.9±0.1", "42.4±1.0", "70.7±0.3", None, None],
    "CoreSet": [None, "81.6±0.3", "88.4±0.2", None, "30.6±0.4", "48.3±0.5", "62.9±0.6", None, "61.7±0.2"],
    "VAAL": [None, "80.9±0.5", "88.8±0.3", None, "24.6±1.1", "46.4±0.8", "70.1±0.4", None, "64.0±0.3"],
    "LearnLoss": [None, "81.6±0.6", "86.7±0.4", None, "19.2±2.2", "38.2±2.8", "65.7±1.1", None, "63.2±0.4"],
    "TA-VAAL": [None, "82.6±0.4", "88.7±0.2", None, "34.7±0.7", "46.4±1.1", "66.8±0.5", None, "64.3±0.2"],
    "ALFA-Mix": [None, "83.4±0.3", "89.6±0.2", None, "35.3±0.8", "50.4±0.9", "69.9±0.6", None, "64.5±0.2"],
    "ActiveFT (ours)": ["85.0±0.4", "88.2±0.4", "90.1±0.2", "26.1±2.6", "40.7±0.9", "54.6±2.3", "71.0±0.5", "50.1±0.3",
                        "65.3±0.1"],
}


def markdown(profile: Profile, prov: dict, out: dict) -> str:
    cells = out["cells"]
    head = grid.header(profile, TABLE, cells)
    acc = grid.metric_rows(profile, TABLE, cells, grid.top1)
    parts = [f"# Table 1 - image classification ({profile.name} profile)\n",
             report.provenance_markdown(prov, scaled_down=profile.scaled_down),
             *grid.setting_lines(profile, TABLE, out, "the number in each cell is top-1 (%) of this recipe trained "
                                 "on the selected samples only, on the held-out test split."),
             "## Top-1 accuracy (%)\n",
             report.markdown_table(head, acc, bold_max_cols=list(range(1, len(head)))),
             plots.embed(out, "Top-1 accuracy against the sampling ratio, per method"),
             "\"-\": the budget does not exceed the active-learning method's random initial set, as in the paper.\n"
             if any(c.get("skipped") for c in cells) else "",
             "## Selection quality: Eq. 16 EMD between pool and selection (lower = closer cover)\n",
             report.markdown_table(head, grid.metric_rows(profile, TABLE, cells, grid.emd)),
             "## Selection wall time (mean over seeds)\n",
             report.markdown_table(head, grid.metric_rows(profile, TABLE, cells, grid.seconds))]
    prow = [[name] + [v or "-" for v in vals] for name, vals in PAPER_ROWS.items()]
    parts += grid.paper_reference("Table 1 (DINO DeiT-S, full finetuning, 224 px)",
                                  ["Methods"] + [f"{d} {r}" for d, r in PAPER_COLUMNS], prow,
                                  "the datasets, encoder and recipe above differ.")
    return "\n".join(p for p in parts if p is not None)


def draw(profile: Profile, out: dict, path) -> None:
    """results/table1.png: top-1 against the budget, one line per method, one panel per dataset."""
    plots.budget_plot(path, out["cells"], lambda d: plots.dataset_label(profile, d),
                      title=f"Table 1 - top-1 against the budget ({profile.name} profile)")


SPEC = register(TableSpec(TABLE, "classification", plots.plotted(grid.runner(TABLE), TABLE, draw), markdown,
                          PAPER_COLUMNS, PAPER_ROWS))
