"""Launchers: shard preparation, finetuning / probing recipes, SLURM scripts."""
