"""bench_suite: a benchmark suite for active finetuning (ActiveFT and its rivals)."""

__version__ = "0.1.0"
