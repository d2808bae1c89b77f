"""The training loop shared by classification and segmentation: epochs, optimiser steps, evaluation, checkpoints.

Data order: each epoch draws one permutation from (seed, epoch) - the same on every process - cuts it into
optimiser steps of the global batch, and gives each process a contiguous part of every step: every
selected sample is seen exactly once per epoch, by exactly one process (checked after each epoch), and the
data order does not depend on the number of processes. With repeated augmentation (``repeated_aug: 3``, the
released DeiT code's default) each sample comes 3 times in a row, cut to DeiT's ``RASampler`` epoch length.
The samples are deliberately NOT passed through ``accelerate.prepare`` (that would split the data a second
time and lose half of it, measured).

Gradients: each process sums per-sample losses over its micro batches (``no_sync`` until the last) and
divides by the step's GLOBAL sample count (times the world size, which DDP's averaging divides out), so
the update equals one process taking the whole step - 1 and N processes agree within float reduction order
(models without batch-norm; batch-norm statistics are per process).

Evaluation runs every ``eval_every`` epochs and after the last; a checkpoint is written every
``checkpoint_every`` epochs and after the last, and a run resumes from one (``resume_from``).

Stopping on a signal (SLURM's time-limit warning SIGUSR1, or SIGTERM from scancel / requeue / preemption):
while ``train`` runs, ``checkpoint.StopSignals`` turns them into a request that is checked after every
optimiser step (all processes agree through one all-reduce of the flag); the loop then writes a checkpoint
of the step it reached, with each process's partial epoch (loss sums, ids seen, RNG state), and raises
``checkpoint.Preempted``. Resuming from it continues at that step with the same data order and random
draws, so the result equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from bench_suite import atomic
from bench_suite.finetune.augment import crop_flip_params
from bench_suite.finetune.backbone import freeze_frozen_modules
from bench_suite.finetune.checkpoint import Preempted, StopSignals, restore, save_checkpoint
from bench_suite.finetune.optim import autocast, lr_at, make_optimizer, resolve_amp, set_lr
from bench_suite.finetune.recipes import plan_batches, step_bounds
from bench_suite.finetune.samples import Samples
from bench_suite.finetune.task import Task
from bench_suite.progress import Tracker
from bench_suite.errors import BadInputError
from bench_suite.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    history: list
    evals: list
    epochs: int
    resumed_from: int | None
    plan: dict
    amp: str
    seconds_train: list
    model: nn.Module


@dataclass
class _Run:
    """Everything one training carries from epoch to epoch."""

    task: Task
    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    pool: Samples
    test: Samples
    recipe: dict
    ctx: Runtime
    seed: int
    epochs: int
    plan: dict
    amp: str
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    bounds: list
    ckpt_path: Path | None
    fp: str
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    seconds_train: list = field(default_factory=list)
    stop: StopSignals | None = None  # set while train() runs: a signal asks for a checkpoint and a stop
    resume_step: int = 0  # a checkpoint written mid-epoch: the optimiser steps of that epoch already taken
    partial: list | None = None  # ... and each process's partial epoch (see _stop_mid_epoch)

    @property
    def is_ddp(self) -> bool:
        return isinstance(self.net, nn.parallel.DistributedDataParallel)


def _setup(task, model, pool, test, recipe, *, epochs, seed, ctx, ckpt_path, fp,
           resume_from) -> tuple[_Run, int | None]:
    """The run's state (optimiser, scaler, step plan), restored from ``resume_from`` when given, the model
    wrapped in DDP over several processes; returns it and the epoch it resumed from (None: a fresh start)."""
    model.to(ctx.device)
    plan = plan_batches(recipe, len(pool), ctx.world)
    amp = resolve_amp(recipe["amp"], ctx.device)
    run = _Run(task, model, model, pool, test, recipe, ctx, seed, epochs, plan, amp,
               optimizer=make_optimizer(model, recipe),
               scaler=torch.amp.GradScaler("cuda") if amp == "fp16" else None,
               bounds=step_bounds(epoch_length(len(pool), recipe["repeated_aug"]), plan["global_batch"], ctx.world),
               ckpt_path=ckpt_path, fp=fp)
    resumed_from = None
    if resume_from is not None:
        state = restore(resume_from, fp, model, run.optimizer, run.scaler)
        run.history, run.evals, resumed_from = state["history"], state["evals"], state["epoch"]
        run.resume_step, run.partial = state["step"], state["partial"]
        if run.partial is not None and len(run.partial) != ctx.world:
            raise BadInputError(f"checkpoint {resume_from} was written in the middle of an epoch by "
                                f"{len(run.partial)} process(es): resume it with as many (not {ctx.world})")
        log.info("resumed from %s at epoch %d%s", resume_from, resumed_from,
                 f", step {run.resume_step}" if run.resume_step else "")
    if ctx.world > 1:
        run.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return run, resumed_from


def epoch_length(n: int, repeats: int) -> int:
    """Samples in an epoch: ``n``, or with repeated augmentation DeiT's ``RASampler`` count - each sample
    ``repeats`` times, cut to ``max(1, n // 256) * 256`` (and to the ``repeats * n`` there are)."""
    return n if repeats <= 1 else min(n * repeats, max(1, n // 256) * 256)


def epoch_order(n: int, seed: int, epoch: int, repeats: int) -> np.ndarray:
    """The epoch's sample positions, the same on every process: a permutation drawn from (seed, epoch); with
    repeated augmentation each position ``repeats`` times in a row (each copy gets its own random crop and
    flip), cut to ``epoch_length`` as DeiT's ``RASampler`` does."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if repeats <= 1:
        return perm
    return np.repeat(perm, repeats)[:epoch_length(n, repeats)]


def _check_epoch_coverage(seen: list, ids: np.ndarray, ctx: Runtime, epoch: int) -> list[int]:
    """Every id of this epoch's order (``ids``, sorted; each selected id once without repeated augmentation)
    trained on exactly as often as it appears, over all processes; returns per-process counts.

    ``BENCH_SUITE_TRACE_IDS=DIR`` also writes each process's ids (``DIR/rank{r}-epoch{e}.json``) for tests.
    """
    mine = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    trace = os.environ.get("BENCH_SUITE_TRACE_IDS")
    if trace:
        atomic.write_json(Path(trace) / f"rank{ctx.rank}-epoch{epoch + 1}.json", mine.tolist())
    parts = ctx.all_gather_object(mine)
    allseen = np.sort(np.concatenate(parts))
    if len(allseen) != len(ids) or not np.array_equal(allseen, ids):
        raise AssertionError(f"epoch {epoch + 1}: the processes trained on {len(allseen)} samples "
                             f"({len(np.unique(allseen))} distinct) but the epoch has {len(ids)}")
    return [int(len(p)) for p in parts]


def _micro_batch(run: _Run, mb: np.ndarray, scale: float, epoch: int, sync: bool):
    """Forward and backward of one micro batch; the loss is scaled by ``scale`` (0 for a placeholder)."""
    cm = run.net.no_sync() if (not sync and run.is_ddp) else contextlib.nullcontext()
    with cm:
        ids = run.pool.ids[mb]
        aug = crop_flip_params(ids, run.seed, epoch, run.recipe["crop_scale"], run.recipe["hflip"])
        run.task.set_epoch(run.seed, epoch)  # for draws a task makes itself (segmentation's mmseg pipeline)
        x, target = run.task.inputs(run.pool, mb, aug, run.ctx.device)
        with autocast(run.amp, run.ctx.device):
            out = run.net(x)
            losses = run.task.per_sample_loss(out, target).float()
        loss = losses.sum() * scale
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
        else:
            loss.backward()
    return ids, losses, out, target


def _optimizer_step(run: _Run) -> None:
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if run.recipe["clip_grad"]:
        nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], run.recipe["clip_grad"])
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _train_step(run: _Run, chunk: np.ndarray, epoch: int, stats: torch.Tensor, seen: list) -> None:
    """One optimiser step over ``chunk`` (the step's global sample positions): this process's part, in micro
    batches. A process whose part is short still runs every micro batch (a zero-weight sample), so every
    process enters the same number of gradient all-reduces."""
    ctx, n_step = run.ctx, len(chunk)
    part = np.array_split(chunk, ctx.world)[ctx.rank]
    k = max(1, math.ceil(math.ceil(n_step / ctx.world) / run.plan["micro_batch"]))
    for j, mb in enumerate(np.array_split(part, k)):
        weight = 1.0
        if len(mb) == 0:  # keep the collective count equal: a zero-weight sample
            mb, weight = chunk[:1], 0.0
        ids, losses, out, target = _micro_batch(run, mb, weight * ctx.world / n_step, epoch,
                                                sync=j == k - 1 or ctx.world == 1)
        if weight:
            seen.append(ids)
            stats += torch.tensor([float(losses.detach().sum()), len(mb), run.task.n_correct(out, target)],
                                  dtype=torch.float64)
    _optimizer_step(run)


def _stop_requested(run: _Run) -> bool:
    """Whether a stop signal reached any process (every process gets the same answer: one all-reduce)."""
    if run.stop is None:
        return False
    if run.ctx.world == 1:
        return run.stop.requested is not None
    flag = torch.tensor([0.0 if run.stop.requested is None else 1.0])
    return bool(run.ctx.all_reduce(flag, op="max")[0] > 0)


def _stop_mid_epoch(run: _Run, epoch: int, step: int, stats: torch.Tensor, seen: list, elapsed: float):
    """Checkpoint the ``step`` optimiser steps taken of ``epoch`` (with each process's partial epoch), then
    raise Preempted."""
    cuda = run.ctx.device.type == "cuda"
    mine = {"stats": stats.tolist(), "seen": [np.asarray(a).tolist() for a in seen], "elapsed": elapsed,
            "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(run.ctx.device) if cuda else None}
    partial = run.ctx.all_gather_object(mine)
    if run.ctx.is_main:
        save_checkpoint(run.ckpt_path, run.model, run.optimizer, run.scaler,
                        {"epoch": epoch, "step": step, "partial": partial, "history": run.history,
                         "evals": run.evals, "fingerprint": run.fp})
    run.ctx.barrier()
    raise Preempted(f"finetuning stopped on a signal at epoch {epoch + 1}, step {step} of {len(run.bounds)}: "
                    f"checkpoint written to {run.ckpt_path}; the same command resumes from it")


def _resume_partial(run: _Run) -> tuple[int, torch.Tensor | None, list, float]:
    """The steps already taken of this epoch, and this process's partial epoch (loss sums, ids seen, time),
    its RNG state restored, when resuming from a checkpoint written on a signal; else (0, None, [], 0)."""
    start, run.resume_step = run.resume_step, 0
    if not start:
        return 0, None, [], 0.0
    mine, run.partial = run.partial[run.ctx.rank], None
    torch.set_rng_state(mine["rng"])
    if mine.get("cuda_rng") is not None and run.ctx.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda_rng"], run.ctx.device)
    return (start, torch.tensor(mine["stats"], dtype=torch.float64),
            [np.asarray(a, dtype=np.int64) for a in mine["seen"]], float(mine["elapsed"]))


def _train_epoch(run: _Run, epoch: int) -> dict:
    """Every selected sample once, in optimiser steps; returns the epoch's history row. Resuming from a
    checkpoint written mid-epoch, the steps it had taken are skipped and its partial epoch restored."""
    t0 = time.perf_counter()
    ctx, n_steps = run.ctx, len(run.bounds)
    torch.manual_seed(run.seed * 100_003 + epoch * 1_009 + ctx.rank)  # dropout / drop-path
    run.net.train()
    freeze_frozen_modules(run.model)
    perm = epoch_order(len(run.pool), run.seed, epoch, run.recipe["repeated_aug"])
    stats = torch.zeros(3, dtype=torch.float64)  # loss sum, samples, correct
    seen = []  # ids this process trained on this epoch
    start, partial_stats, partial_seen, elapsed = _resume_partial(run)
    if start:
        stats, seen, t0 = partial_stats, partial_seen, t0 - elapsed
    lr = run.recipe["lr"]
    for s, (lo, hi) in enumerate(run.bounds):
        if s < start:
            continue
        lr = lr_at(epoch * n_steps + s, run.epochs * n_steps, run.recipe["warmup_epochs"] * n_steps, run.recipe)
        set_lr(run.optimizer, lr)
        _train_step(run, perm[lo:hi], epoch, stats, seen)
        if s + 1 < n_steps and _stop_requested(run):
            _stop_mid_epoch(run, epoch, s + 1, stats, seen, time.perf_counter() - t0)
    stats = ctx.all_reduce(stats)
    per_process = _check_epoch_coverage(seen, np.sort(run.pool.ids[perm]), ctx, epoch)
    run.seconds_train.append(time.perf_counter() - t0)
    row = {"epoch": epoch + 1, "loss": float(stats[0] / max(1, stats[1])), "samples": int(stats[1]),
           "train_acc": float(stats[2] / max(1, stats[1]) * 100), "lr": lr,
           "seconds": run.seconds_train[-1], "per_process": per_process}
    run.history.append(row)
    return row


def _due(epoch: int, epochs: int, every: int) -> bool:
    """After the last epoch, and every ``every`` epochs (0: only after the last)."""
    return epoch + 1 == epochs or bool(every and (epoch + 1) % every == 0)


def _evaluate(run: _Run, epoch: int, on_eval: Callable | None) -> None:
    te = time.perf_counter()
    run.model.eval()
    res = run.task.evaluate(run.model, run.test, run.ctx, run.amp, max(1, run.plan["micro_batch"] * 2))
    res.update(epoch=epoch + 1, seconds=time.perf_counter() - te)
    run.evals.append(res)
    if on_eval:
        on_eval(res)
    log.debug("epoch %d: %s %.2f", epoch + 1, run.task.metric, res[run.task.metric])


def _checkpoint(run: _Run, epoch: int) -> None:
    if run.ctx.is_main:
        save_checkpoint(run.ckpt_path, run.model, run.optimizer, run.scaler,
                        {"epoch": epoch + 1, "history": run.history, "evals": run.evals, "fingerprint": run.fp})
    run.ctx.barrier()


def _describe(run: _Run, row: dict, epoch: int) -> str:
    task = run.task
    desc = f"{task.name} ep {epoch + 1}/{run.epochs} loss {row['loss']:.3f} train {row['train_acc']:.1f}%"
    if run.evals and run.evals[-1]["epoch"] == epoch + 1:
        desc += f" test {task.metric} {run.evals[-1][task.metric]:.2f}"
    return desc


def train(task: Task, model: nn.Module, pool: Samples, test: Samples, recipe: dict, *, epochs: int, seed: int,
          ctx: Runtime, ckpt_path: Path | None, fp: str, resume_from: Path | None = None,
          progress: bool = True, on_eval: Callable | None = None, last_checkpoint: bool = True) -> TrainResult:
    """Train ``model`` on ``pool`` for ``epochs`` epochs (from ``resume_from``'s epoch when given), evaluating
    on ``test`` and checkpointing to ``ckpt_path`` at the recipe's cadence (``last_checkpoint=False``: not
    after the last epoch, for a caller that keeps only the metrics)."""
    run, resumed_from = _setup(task, model, pool, test, recipe, epochs=epochs, seed=seed, ctx=ctx,
                               ckpt_path=ckpt_path, fp=fp, resume_from=resume_from)
    start_epoch = resumed_from or 0
    bar = Tracker(f"{task.name} finetune", epochs - start_epoch, enabled=progress and ctx.is_main, unit="epochs")
    # with somewhere to write a checkpoint, SIGUSR1 / SIGTERM stop the loop at the next step, checkpointed
    with StopSignals(enabled=ckpt_path is not None) as stop:
        run.stop = stop
        try:
            for epoch in range(start_epoch, epochs):
                row = _train_epoch(run, epoch)
                if _due(epoch, epochs, recipe["eval_every"]):
                    _evaluate(run, epoch, on_eval)
                due = _due(epoch, epochs, recipe["checkpoint_every"]) and (last_checkpoint or epoch + 1 < epochs)
                if ckpt_path is not None and due:
                    _checkpoint(run, epoch)
                bar.advance(1, _describe(run, row, epoch))
                if epoch + 1 < epochs and _stop_requested(run):  # between epochs: an end-of-epoch checkpoint
                    if not due:
                        _checkpoint(run, epoch)
                    raise Preempted(f"finetuning stopped on a signal after epoch {epoch + 1}: checkpoint "
                                    f"written to {ckpt_path}; the same command resumes from it")
        finally:
            run.stop = None
            bar.close()
    return TrainResult(run.history, run.evals, epochs, resumed_from, run.plan, run.amp, run.seconds_train, model)
