"""The table registry: one paper table is one module in ``bench_suite/tables/`` that registers a TableSpec.

The registry finds them (``bench_suite.plugins``, entry-point group ``bench_suite.tables``); ``run.py``
knows tables only through it. A spec carries its title and the paper's numbers that its report quotes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from bench_suite.plugins import Registry


@dataclass(frozen=True)
class TableSpec:
    name: str  # the paper's table number, "1".."7"
    title: str  # a few words: "classification"
    run: Callable  # run(ctx, progress_factory) -> out (JSON-able: cells, stores, ...)
    markdown: Callable  # markdown(profile, provenance, out) -> str
    paper_columns: list = field(default_factory=list)  # the paper's numbers, as its report quotes them
    paper_rows: dict = field(default_factory=dict)
    # the number the results index sums the table up by: (cell field, True if higher is better)
    headline_metric: tuple = ("top1", True)


REGISTRY: Registry[TableSpec] = Registry("table", "bench_suite.tables")


def register(spec: TableSpec) -> TableSpec:
    return REGISTRY.register(spec)


def table_names() -> list[str]:
    return sorted(REGISTRY.names(), key=lambda n: (len(n), n))


def get_table(name: str) -> TableSpec:
    return REGISTRY.get(str(name))
