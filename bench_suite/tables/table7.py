"""Table 7: the number of ActiveFT iterations (appendix A)."""

from bench_suite.tables.grid import runner
from bench_suite.tables.plots import plotted
from bench_suite.tables.ratio_tables import markdown_for, plotter
from bench_suite.tables.registry import TableSpec, register

TABLE = "7"
TITLE = "Table 7 - effect of the number of iterations T"
ABOUT = ("ActiveFT stopped after T iterations; T = 0 snaps the random initial parameters to their "
         "nearest samples (the paper: 'same as random selection').")
PAPER_TITLE = "Table 7 (appendix A; ImageNet 1%, DINO DeiT-S)"
# The paper's Table 7 (appendix A): iteration number T, ImageNet 1%, DINO DeiT-S; T = 0 is random selection.
PAPER_COLUMNS = ["0", "50", "75", "100", "200", "300"]
PAPER_ROWS = {"1%": ["45.1", "46.7", "48.4", "50.2", "50.1", "50.1"]}

PLOT = plotter(TABLE, "iters", "iterations T", TITLE, logx=False)  # results/table7.png

SPEC = register(TableSpec(TABLE, "iterations", plotted(runner(TABLE), TABLE, PLOT),
                          markdown_for(TABLE, TITLE, ABOUT, PAPER_TITLE, PAPER_COLUMNS, PAPER_ROWS,
                                       "Top-1 accuracy against the number of iterations T"),
                          PAPER_COLUMNS, PAPER_ROWS))
