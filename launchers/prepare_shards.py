"""``python -m launchers.prepare_shards``: a dataset split -> WebDataset shards + manifest.

    python -m launchers.prepare_shards --dataset fashion_mnist --split train --limit 10000 --out data/fmnist/train
    python -m launchers.prepare_shards --dataset cifar10 --source ~/cifar-10-python.tar.gz --split train --out ...
"""

from __future__ import annotations

import argparse
import logging

from bench_suite.cli import main_guard, setup_logging
from bench_suite.data.registry import dataset_names, get_dataset
from bench_suite.data.shards import write_shards

log = logging.getLogger("launchers.prepare_shards")


@main_guard
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launchers.prepare_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(dataset_names())}")
    p.add_argument("--split", default="train")
    p.add_argument("--source", help="local path for datasets that convert from a user copy (cifar10/100, imagenet)")
    p.add_argument("--limit", type=int, help="keep a seeded random subset of this many samples (ids stay global)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    setup_logging()
    get_dataset(args.dataset)
    manifest = write_shards(args.dataset, args.split, args.out, source=args.source, limit=args.limit,
                            subset_seed=args.subset_seed, shard_size=args.shard_size)
    log.info("wrote %d samples in %d shards to %s", manifest["count"], len(manifest["shards"]), args.out)
    return 0


if __name__ == "__main__":
    main()
