"""Table 6: the temperature of ActiveFT."""
from bench_suite.tables.grid import runner
from bench_suite.tables.ratio_tables import markdown_for

run, markdown = runner("6"), markdown_for("6")
