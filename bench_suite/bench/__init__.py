"""Benchmarks (run as modules, e.g. ``python -m bench_suite.bench.selector``); not part of the test suite."""
