"""Benchmarks (run as modules, e.g. ``python -m bench_suite.bench.activeft_speed``); not part of the test suite."""
