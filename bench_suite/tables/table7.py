"""Table 7: the number of ActiveFT iterations."""
from bench_suite.tables.grid import runner
from bench_suite.tables.ratio_tables import markdown_for

run, markdown = runner("7"), markdown_for("7")
