"""Table 6: the temperature of ActiveFT."""
from bench_suite.tables.ratio_tables import markdown_for, runner

run, markdown = runner("6"), markdown_for("6")
