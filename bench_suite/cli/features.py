"""``python -m bench_suite.cli.features --shards DIR --encoder NAME --out DIR``: WebDataset shards ->
L2-normalised FeatureStore, split over the processes of ``accelerate launch`` and, within each, over
DataLoader workers (``--workers``); streamed to the store shard by shard, and resumable: after a kill the
same command starts at the first unfinished shard (bench_suite.extract)."""

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
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default: on a GPU the process's "
                   "cores less one; on the CPU none up to 2 cores)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast (the store records the first batch's min cosine to fp32)")
    p.add_argument("--decode", choices=["cpu", "reduced", "device"], default="cpu",
                   help="reduced: the workers decode JPEGs at 1/2-1/8 scale, keeping twice the input size (much "
                   "faster for photos far larger than the input; features within cosine ~0.999); device: JPEGs "
                   "decoded on the encoder's device (nvJPEG on a GPU)")
    p.add_argument("--threads", type=int, help="torch threads per process on the CPU (default: cores / processes)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="re-extract even if cached")
    return p


@main_guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    store = extract_features(args.shards, args.out, encoder=args.encoder, pooling=args.pooling,
                             image_size=args.image_size, batch_size=args.batch_size, weights=args.weights,
                             force=args.force, num_workers=args.workers, precision=args.precision,
                             decode=args.decode, threads=args.threads)
    log.info("%s: %d x %d", args.out, len(store), store.dim)
    return runtime.exit_process(0)  # ends a distributed run without the gloo-at-exit abort


if __name__ == "__main__":
    main()
