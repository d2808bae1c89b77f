"""``python -m bench_suite.cli.select``: run any registered selection method on a feature store.

    python -m bench_suite.cli.select --features STORE_DIR_OR_NPY (--budget B | --ratio R) --method NAME \
        [--seed S] [--objective official|paper] [--set key=value ...] [--labels FILE] --out sel.json
    python -m bench_suite.cli.select --list
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from bench_suite.methods import registry
from bench_suite import runtime as bdist
from bench_suite.cli import main_guard, setup_logging
from bench_suite.options import parse_set
from bench_suite.errors import BadInputError, MissingDataError
from bench_suite.methods import budget_from_ratio, check_budget, run_selection
from bench_suite.store import FeatureStore

log = logging.getLogger("bench_suite.cli.select")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench_suite.cli.select", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", help="FeatureStore folder or an N x d .npy")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=int)
    g.add_argument("--ratio", type=float)
    p.add_argument("--method", default="activeft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", choices=None, help="ActiveFT objective: official | paper")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="method options, e.g. --set iters=300 temperature=0.07")
    p.add_argument("--labels", help="labels for the AL methods' oracle: an .npy (N,) or 'store'")
    p.add_argument("--out", help="where to write the selection JSON")
    p.add_argument("--list", action="store_true", help="list the registered methods and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load_labels(spec: str | None, store: FeatureStore):
    if spec is None:
        return None
    if spec == "store":
        if store.labels is None:
            raise BadInputError("--labels store: this feature store has no labels.npy")
        return np.asarray(store.labels)
    path = Path(spec)
    if not path.exists():
        raise MissingDataError(f"labels file not found: {path}")
    labels = np.load(path)
    if labels.shape != (store.total_rows,):
        raise BadInputError(f"labels {path} have shape {labels.shape}, the store has {store.total_rows} rows")
    return labels[store.row_offset:store.row_offset + len(store)]


@main_guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.list:
        from rich.console import Console
        from rich.table import Table

        table = Table("method", "label-free", "description")
        for name in registry.names():
            cls = registry.selector_class(name)
            table.add_row(name, "yes" if cls.label_free else "no (oracle)", cls.description)
        Console().print(table)
        return 0
    if not args.features:
        raise BadInputError("--features is required (a FeatureStore folder or an .npy)")
    if args.budget is None and args.ratio is None:
        raise BadInputError("give --budget B or --ratio R")
    if not args.out:
        raise BadInputError("--out is required")
    registry.selector_class(args.method)  # unknown name -> error before any work
    d = bdist.init_from_env()
    store = FeatureStore.open(args.features)
    n = store.total_rows
    budget = check_budget(args.budget, n) if args.budget is not None else budget_from_ratio(args.ratio, n)
    config = parse_set(args.set)
    if args.objective:
        config["objective"] = args.objective
    labels = load_labels(args.labels, store)
    sel = run_selection(store, args.method, budget, args.seed, config, labels, dist=d)
    if d.is_main:
        sel.save(args.out)
        log.info("%s selected %d ids in %.2fs -> %s", args.method, budget, sel.seconds, args.out)
    return bdist.exit_process(0)  # ends a distributed run without the gloo-at-exit abort


if __name__ == "__main__":
    main()
