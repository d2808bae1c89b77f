"""Table 5: ablations of ActiveFT (c_i update manner; regularization design)."""
from bench_suite.tables.grid import runner
from bench_suite.tables.ratio_tables import markdown_for

run, markdown = runner("5"), markdown_for("5")
