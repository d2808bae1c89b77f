"""The ``activeft`` selector of the registry: validation, sharding, progress bar, Selection."""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
import torch

from bench_suite.methods.registry import register
from bench_suite import runtime as bdist
from bench_suite.activeft.optimize import Config, optimize, resolve_device
from bench_suite.errors import BadInputError
from bench_suite.methods.selection import Selection, check_budget
from bench_suite.store import NORM_TOL, FeatureStore

log = logging.getLogger(__name__)


def as_store(data) -> FeatureStore:
    """A FeatureStore as given, or an N x d array / tensor wrapped as one (rows normalised with a warning)."""
    if isinstance(data, FeatureStore):
        return data
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        if data.ndim == 2 and data.shape[0] == 0:
            raise BadInputError("feature store is empty (N = 0)")
        return FeatureStore.from_array(data, normalize=True)
    raise BadInputError(f"ActiveFT needs a FeatureStore or an N x d array, got {type(data).__name__}")


def load_local(store: FeatureStore, shard: slice) -> tuple[np.ndarray | None, str | None, int]:
    """This rank's rows as float32 (read from the memmap), checked; (array, error message, rows renormalised)."""
    raw = store.features[shard]
    arr = np.array(raw, dtype=np.float32, copy=True) if (isinstance(raw, np.memmap) or not raw.flags.writeable
                                                          or raw.dtype != np.float32) else raw
    arr = np.ascontiguousarray(arr)
    if arr.shape[0] == 0:
        return arr, None, 0
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        return None, f"features contain NaN/Inf (first at row {shard.start + int(np.flatnonzero(~finite)[0])})", 0
    norms = np.linalg.norm(arr.astype(np.float64), axis=1)
    zero = norms < 1e-12
    if zero.any():
        return None, (f"features contain {int(zero.sum())} zero-norm rows "
                      f"(first at row {shard.start + int(np.flatnonzero(zero)[0])})"), 0
    off = np.abs(norms - 1.0) > NORM_TOL
    if off.any():
        arr = (arr / norms[:, None]).astype(np.float32)
    return arr, None, int(off.sum())


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


@register
class ActiveFT:
    """ActiveFT selector; options as keyword arguments (see ``Config``), e.g. ``ActiveFT(objective="paper")``."""

    name = "activeft"

    label = "ActiveFT"
    description = "ActiveFT (CVPR'23): optimise B parameters to match the pool, snap to B unique samples (label-free)"
    label_free = True

    def __init__(self, **config):
        self.cfg = Config.from_kwargs(**config)

    def select(self, store, budget, *, seed: int = 0, oracle=None, dist=None) -> Selection:
        t0 = time.perf_counter()
        d = dist if dist is not None else bdist.current()
        store = as_store(store)
        feats = store.features
        if getattr(feats, "ndim", 0) != 2:
            raise BadInputError(f"features must be a 2-D array (N x d), got shape {getattr(feats, 'shape', None)}")
        n = int(feats.shape[0])
        if n == 0:
            raise BadInputError("feature store is empty (N = 0)")
        if np.shape(store.ids) != (n,):
            raise BadInputError(f"store ids have shape {np.shape(store.ids)} but features have {n} rows")
        budget = check_budget(budget, n)
        cfg = self.cfg
        device = resolve_device(cfg.device)
        shard = d.shard(n)
        arr, err, n_fixed = load_local(store, shard)
        errors = [e for e in d.all_gather_object(err) if e]
        if errors:
            raise BadInputError(errors[0])
        n_fixed = sum(d.all_gather_object(n_fixed))
        if n_fixed and d.is_main:
            log.warning("activeft: %d feature rows were not L2-normalised; normalised them", n_fixed)
        local = torch.from_numpy(arr).to(device)
        show = d.is_main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
        bar = _Bar(cfg.iters, f"activeft[{cfg.objective}]") if show and cfg.iters else None
        threads_before = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            res = optimize(local, shard, n, budget, cfg, seed=int(seed), dist=d, progress=bar)
        finally:
            if bar is not None:
                bar.close()
            if cfg.threads:
                torch.set_num_threads(threads_before)
        ids = np.asarray(store.ids)[res["rows"]]
        info = {
            "loss_curve": res["losses"],
            "final_loss": res["final_loss"],
            "iterations": cfg.iters,
            "world": d.world,
            "n": n,
            "dim": int(feats.shape[1]),
            "device": str(device),
            "init_ids": np.asarray(store.ids)[res["init_rows"]].tolist(),
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
        }
        config = dict(cfg.as_dict(), block_size=res["block_size"], bb_dtype=res["bb_dtype"])
        return Selection(ids, self.name, budget, int(seed), time.perf_counter() - t0, config, info)
