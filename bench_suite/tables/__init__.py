"""One module per paper table: its grid of cells, and its markdown."""

TABLES = {"1": "bench_suite.tables.table1"}
