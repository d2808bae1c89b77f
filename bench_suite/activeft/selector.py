"""The ``activeft`` selector of the registry: a distributed ``Selector`` over ``optimize``.

The base class checks the options, the pool, the budget and the seed and resolves the device; here every
rank reads and checks its own rows of the pool (``store.check_rows``), runs the loop with a rich progress
bar on rank 0, and returns the same global rows as every other rank.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import numpy as np
import torch

from bench_suite.activeft.optimize import optimize
from bench_suite.activeft.options import ALIASES, Options, fold_no_update
from bench_suite.errors import BadInputError
from bench_suite.methods.base import Pool, Selector
from bench_suite.methods.registry import register
from bench_suite.store import FeatureStore, check_rows

log = logging.getLogger(__name__)


def load_shard(store: FeatureStore, shard: slice, dist) -> tuple[np.ndarray, int]:
    """This rank's rows as float32 (read from the memmap), checked and renormalised where needed.

    Returns (rows, number of rows renormalised on all ranks). A bad row on any rank is the same
    BadInputError on every rank (the lowest rank's message), so no rank waits for the others.
    """
    raw = store.features[shard]
    copy = isinstance(raw, np.memmap) or not raw.flags.writeable or raw.dtype != np.float32
    arr = np.ascontiguousarray(np.array(raw, dtype=np.float32, copy=True) if copy else raw)
    err, n_fixed = None, 0
    try:
        arr, n_fixed = check_rows(arr, normalize=True, first_row=shard.start)
    except BadInputError as exc:
        err = str(exc)
    parts = dist.all_gather_object((err, n_fixed))
    errors = [e for e, _ in parts if e]
    if errors:
        raise BadInputError(errors[0])
    return arr, sum(n for _, n in parts)


class _Bar:
    """rich progress bar with the loss (rank 0 only)."""

    def __init__(self, total: int, label: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
        self.task = self.progress.add_task(label, total=total, loss="-")
        self.progress.start()

    def __call__(self, it: int, loss: float) -> None:
        self.progress.update(self.task, completed=it, loss=f"{loss:.5f}")

    def close(self) -> None:
        self.progress.stop()


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` for the duration (0: leave torch's setting)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


@register
class ActiveFT(Selector):
    """ActiveFT; options as keyword arguments (``Options``), e.g. ``ActiveFT(objective="paper")``."""

    name = "activeft"
    label = "ActiveFT"
    description = "ActiveFT (CVPR'23): optimise B parameters to match the pool, snap to B unique samples (label-free)"
    label_free = True
    distributed = True
    Options = Options
    aliases = ALIASES
    quick_options = {"iters": 20}  # for the registry's contract tests
    # 2: the exact similarities to assigned / candidate parameters come from one SDDMM on a CPU (their float32
    # rounding can differ in the last bit from version 1's gathered row dots); 3: the official repulsion in
    # symmetric blocks with one shift (objectives.official_repulsion: float32 rounding differs from version 2's)
    version = 3

    def __init__(self, **options):
        super().__init__(**fold_no_update(options, self.name))

    def choose(self, pool: Pool) -> tuple[np.ndarray, dict]:
        cfg, d = self.options, pool.dist
        shard = d.shard(pool.n)
        arr, n_fixed = load_shard(pool.store, shard, d)
        if n_fixed and d.is_main:
            log.warning("activeft: %d feature rows were not L2-normalised; normalised them", n_fixed)
        local = torch.from_numpy(arr).to(pool.device)
        with torch_threads(cfg.threads), self._progress_bar(d) as bar:
            res = optimize(local, shard, pool.n, pool.budget, cfg, seed=pool.seed, dist=d, progress=bar)
        ids = np.asarray(pool.store.ids)
        info = {
            "loss_curve": res["losses"],
            "final_loss": res["final_loss"],
            "iterations": cfg.iters,
            "world": d.world,
            "n": pool.n,
            "dim": int(arr.shape[1]),
            "device": str(pool.device),
            "init_ids": ids[res["init_rows"]].tolist(),
            "empty_params": res["empty_params"],
            "assign_stats": res["assign_stats"],
            "refreshed_per_iter": res["refreshed_per_iter"],
            "seconds_init": res["seconds_init"],
            "seconds_optimize": res["seconds_optimize"],
            "seconds_snap": res["seconds_snap"],
            "seconds_per_iter": res["seconds_per_iter_mean"],
            "samples_per_iter": res["n_active"],
            "snap_fallbacks": res["snap_fallbacks"],
            "snap_collisions": res["snap_collisions"],
            "renormalised_rows": n_fixed,
            "block_size": res["block_size"],  # as resolved (the option's 0 = auto)
            "pruned": res["pruned"],  # as resolved (the option's None = auto)
            "bb_dtype": res["bb_dtype"],
            "screen": res["screen"],  # as resolved (the option's auto: bf16 on a GPU, fp32 on a CPU)
            "loop": res["loop"],  # as run: eager | static | graph (the option's auto resolved)
            "loop_fallback": res["loop_fallback"],  # why a graph was not used after all (None: no fallback)
            "loop_redone": res.get("loop_redone", 0),
        }
        return res["rows"], info

    @contextlib.contextmanager
    def _progress_bar(self, dist):
        """The bar on rank 0 when ``progress`` says so (None: when stderr is a terminal), else None."""
        cfg = self.options
        show = dist.is_main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
        bar = _Bar(cfg.iters, f"activeft[{cfg.objective}]") if show and cfg.iters else None
        try:
            yield bar
        finally:
            if bar is not None:
                bar.close()
