"""``python -m bench_suite.cli.features --shards DIR --encoder NAME --out DIR``: WebDataset shards ->
L2-normalised FeatureStore, split over the processes of ``accelerate launch`` (bench_suite.extract)."""

from __future__ import annotations

import argparse
import logging

from bench_suite import runtime
from bench_suite.cli import main_guard, setup_logging
from bench_suite.extract import extract_features

log = logging.getLogger("bench_suite.cli.features")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench_suite.cli.features", description=__doc__)
    p.add_argument("--shards", required=True)
    p.add_argument("--encoder", required=True)
    p.add_argument("--pooling", choices=["cls", "cls+mean", "gap"])
    p.add_argument("--image-size", type=int)
    p.add_argument("--weights", help="local checkpoint for encoders that need one (dino_vits16)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="re-extract even if cached")
    return p


@main_guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    store = extract_features(args.shards, args.out, encoder=args.encoder, pooling=args.pooling,
                             image_size=args.image_size, batch_size=args.batch_size, weights=args.weights,
                             force=args.force)
    log.info("%s: %d x %d", args.out, len(store), store.dim)
    return runtime.exit_process(0)  # ends a distributed run without the gloo-at-exit abort


if __name__ == "__main__":
    main()
