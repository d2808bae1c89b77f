"""Command lines and batch scripts (orchestration): shard preparation, finetuning, mmsegmentation, SLURM.

The library they drive lives in ``bench_suite`` (``bench_suite.finetune`` for finetuning).
"""
