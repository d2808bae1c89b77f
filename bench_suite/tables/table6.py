"""Table 6: the temperature of ActiveFT."""

from bench_suite.tables.grid import runner
from bench_suite.tables.plots import plotted
from bench_suite.tables.ratio_tables import markdown_for, plotter
from bench_suite.tables.registry import TableSpec, register

TABLE = "6"
TITLE = "Table 6 - effect of the temperature tau"
ABOUT = ("ActiveFT with only the temperature changed.")
PAPER_TITLE = "Table 6 (CIFAR10, DINO DeiT-S)"
# The paper's Table 6: temperature, CIFAR10, DeiT-S.
PAPER_COLUMNS = ["tau = 0.04", "tau = 0.07", "tau = 0.2", "tau = 0.5"]
PAPER_ROWS = {"0.5%": ["85.6", "85.0", "84.1", "83.5"],
              "1%": ["87.4", "88.2", "85.3", "86.1"],
              "2%": ["90.3", "90.1", "89.6", "89.0"]}

PLOT = plotter(TABLE, "temperature", "temperature tau (log scale)", TITLE, logx=True)  # results/table6.png

SPEC = register(TableSpec(TABLE, "temperature", plotted(runner(TABLE), TABLE, PLOT),
                          markdown_for(TABLE, TITLE, ABOUT, PAPER_TITLE, PAPER_COLUMNS, PAPER_ROWS,
                                       "Top-1 accuracy against the temperature tau"),
                          PAPER_COLUMNS, PAPER_ROWS))
