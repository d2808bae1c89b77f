"""One module per paper table: its grid of cells, and its markdown."""

TABLES = {n: f"bench_suite.tables.table{n}" for n in ("1", "2", "3", "4", "5", "6", "7")}
