"""bench_suite: a benchmark suite for active finetuning (ActiveFT and its rivals).

Three layers, imports only pointing down (ARCHITECTURE.md, checked by tests/test_architecture.py):
core (store, methods/ registry + Selector base, runtime, options, plugins, data/, encoders/, extract,
profiles/), plug-ins (activeft/, finetune/, and the top-level ``baselines`` package), orchestration (run.py,
tables/, cli/, report, bench/, and the top-level ``launchers`` package).
"""

__version__ = "0.1.0"
