"""Table 3: the wall time each method needs to select its samples (active-learning methods include their
rounds of retraining), one line per sampling ratio; top-1 of the same selections beside it."""

from __future__ import annotations

from bench_suite import report
from bench_suite.profiles import Profile
from bench_suite.tables import grid
from bench_suite.tables.registry import TableSpec, register

TABLE = "3"

# The paper's Table 3: selection time on the CIFAR100 training set (rows: ratio).
PAPER_COLUMNS = ["K-Means", "CoreSet", "VAAL", "LearnLoss", "ActiveFT (ours)"]
PAPER_ROWS = {"2%": ["16.6s", "1h57m", "7h52m", "20m", "12.6s"],
              "5%": ["37.0s", "7h44m", "12h13m", "1h37m", "21.9s"],
              "10%": ["70.2s", "20h38m", "36h24m", "9h09m", "37.3s"]}


def markdown(profile: Profile, prov: dict, out: dict) -> str:
    cells = out["cells"]
    head = grid.header(profile, TABLE, cells)
    secs = grid.metric_rows(profile, TABLE, cells, grid.seconds)
    acc = report.bold_best(grid.metric_rows(profile, TABLE, cells, grid.top1), list(range(1, len(head))))
    return "\n".join([
        f"# Table 3 - data selection efficiency ({profile.name} profile)\n",
        report.provenance_markdown(prov, scaled_down=profile.scaled_down),
        *grid.setting_lines(profile, TABLE, out, "used for the accuracy table and for the active-learning "
                            "methods' retraining rounds."),
        "Times are the selection's wall time on the hardware above, mean over seeds: for the active-learning "
        "methods they include every round of training on the labels bought so far (as in the paper); the "
        "one-shot methods never train. Feature extraction, shared by all methods, is not counted.\n",
        "## Selection time\n",
        report.markdown_table(*grid.transpose(head, secs)),
        "## Top-1 accuracy (%) of the same selections\n",
        report.markdown_table(*grid.transpose(head, acc)),
        "\"-\": the budget does not exceed the active-learning method's random initial set.\n"
        if any(c.get("skipped") for c in cells) else "",
        *grid.paper_reference("Table 3 (CIFAR100 training set, GPU)", ["Sel. Ratio"] + PAPER_COLUMNS,
                              [[r] + v for r, v in PAPER_ROWS.items()],
                              "different hardware and pool size; compare ratios between methods, not seconds."),
    ])


SPEC = register(TableSpec(TABLE, "selection time", grid.runner(TABLE), markdown, PAPER_COLUMNS, PAPER_ROWS,
                          headline_metric=("selection_seconds", False)))
