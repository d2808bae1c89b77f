"""Finetune on a selection and evaluate on the test split: classification (top-1) or segmentation (mIoU).

    python -m launchers.finetune --task cls --dataset mnist --selection sel.json --recipe cpu_finetune \\
        --seed 0 --out runs/mnist-s0          # the cpu profile's MNIST pool/test shards, made under work_dirs/
    python -m launchers.finetune --task cls --dataset-shards work/mnist-train --test-shards work/mnist-test \\
        --selection sel.json --recipe cpu_finetune --encoder dinov2_vits14 --seed 0 --out runs/mnist-s0
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m launchers.finetune ...   # 2 CPU processes
    accelerate launch --multi_gpu --num_processes 8 -m launchers.finetune ... --recipes-file paper   # 8 GPUs

Writes ``OUT/metrics.json`` atomically (top-1 or mIoU, per-class numbers, epochs, wall time, recipe, seed,
evaluation history) and ``OUT/checkpoint.pt`` every ``checkpoint_every`` epochs; a rerun with the same
inputs resumes from it. Recipes are data: ``bench_suite/finetune/recipes.yaml``, overridden field by field
by a profile's ``recipes:`` (``--recipes-file cpu|paper|FILE.yaml``), then by ``--set key=value``. Bad input
(unknown recipe, empty selection, ids that are not in the dataset, a missing checkpoint or weights file)
stops with a one-line error before any training.

This is only the command line; the library is ``bench_suite.finetune`` (``launch.finetune``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path

from bench_suite.cli import main_guard, setup_logging
from bench_suite.data import shards as wshards
from bench_suite.errors import BadInputError
from bench_suite.finetune.launch import METRICS, finetune
from bench_suite.options import parse_set
from bench_suite.profiles import load_profile
from bench_suite.runtime import exit_process

log = logging.getLogger(__name__)


def _shard_folders(args) -> tuple[Path, Path]:
    """``--dataset NAME`` (shards made from the profile's split settings) or the two shard folders."""
    if args.dataset:
        if args.dataset_shards or args.test_shards:
            raise BadInputError("give --dataset NAME or --dataset-shards/--test-shards, not both")
        settings = load_profile(args.profile).dataset(args.dataset)
        writer = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
        folders = [wshards.ensure_shards(args.dataset, part, dataclasses.asdict(getattr(settings, part)),
                                         Path(args.work), args.source, write=writer) for part in ("pool", "test")]
        for folder in folders:  # the other ranks wait for rank 0's shards
            deadline = time.monotonic() + 3600
            while not (folder / wshards.MANIFEST).exists() and time.monotonic() < deadline:
                time.sleep(2)
        return folders[0], folders[1]
    if not (args.dataset_shards and args.test_shards):
        raise BadInputError("give --dataset NAME, or both --dataset-shards DIR and --test-shards DIR")
    return Path(args.dataset_shards), Path(args.test_shards)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launchers.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["cls", "seg"], default="cls")
    p.add_argument("--dataset", help="a dataset of --profile: its pool and test shards are made under --work if "
                                      "missing (the same folders the tables use)")
    p.add_argument("--profile", default="cpu", help="profile for --dataset (cpu, paper, or a YAML file)")
    p.add_argument("--source", help="local copy of a paper dataset for --dataset (cifar10, cifar100, imagenet)")
    p.add_argument("--work", default=os.environ.get("BENCH_SUITE_WORK", "work_dirs"), help="cache folder for --dataset")
    p.add_argument("--dataset-shards", help="train split shard folder (the pool the selection indexes)")
    p.add_argument("--test-shards", help="test split shard folder (evaluation)")
    p.add_argument("--selection", required=True, help="selection JSON (bench_suite.methods.selection.Selection)")
    p.add_argument("--recipe", required=True, help="recipe name (bench_suite/finetune/recipes.yaml or --recipes-file)")
    p.add_argument("--recipes-file", help="profile name (cpu, paper) or YAML file whose `recipes:` override the "
                                          "catalogue field by field")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one recipe field, e.g. --set epochs=3")
    p.add_argument("--encoder", help="encoder registry name (default: the recipe's `encoder`)")
    p.add_argument("--weights", help="local checkpoint for encoders that need one (dino_vits16)")
    p.add_argument("--image-size", type=int, help="override the recipe's image size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder: metrics.json, checkpoint.pt")
    p.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint (default: OUT/checkpoint.pt if present)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/checkpoint.pt exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@main_guard
def _run(argv) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    train_shards, test_shards = _shard_folders(args)
    m = finetune(args.task, train_shards, test_shards, args.selection, args.recipe,
                 recipes_file=args.recipes_file, overrides=parse_set(args.set), encoder=args.encoder,
                 weights=args.weights, image_size=args.image_size, seed=args.seed, out=args.out,
                 resume=not args.no_resume, resume_from=args.resume, progress=not args.quiet)
    log.info("%s %s = %.2f (%s of %d evaluation(s)), %d samples, %d epochs, %.0f s -> %s",
             m["task"], m["metric"], m[m["metric"]], m["reported"], len(m["evals"]), m["n_train"],
             m["epochs"], m["wall_seconds"], Path(args.out) / METRICS)
    return exit_process(0)  # ends a distributed run without the gloo-at-exit abort


def main(argv=None) -> int:
    return _run(argv)


if __name__ == "__main__":
    main()
