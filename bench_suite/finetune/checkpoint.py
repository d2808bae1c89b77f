"""Checkpoints of a finetuning, and the fingerprint that ties one to its inputs.

A checkpoint holds the trainable parameters and the buffers (the frozen weights come back from the
encoder), the optimiser and grad-scaler state, and the history so far. It carries the run's fingerprint
(recipe, selection, seed, encoder, data), and loading refuses a checkpoint made with other inputs, so a
rerun resumes only what it would itself have computed. Writes are atomic: an interrupted save leaves the
previous checkpoint intact.

A checkpoint is written at the recipe's cadence (end of an epoch), and also in the middle of an epoch when
the job is told to stop: ``StopSignals`` turns SIGUSR1 (SLURM's ``--signal=B:USR1@120`` warning before the
time limit, forwarded by the batch script) and SIGTERM (``scancel``, ``scontrol requeue``, preemption) into a
request that the training loop honours at the next optimiser step: it saves the step it reached, each
process's partial epoch (loss sums, the ids seen, its RNG state) and raises ``Preempted``. The rerun resumes
at that very step, so an interrupted finetune gives the numbers of an uninterrupted one.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch
import torch.nn as nn

from bench_suite import atomic
from bench_suite.digest import json_digest
from bench_suite.errors import BadInputError, BenchError, CorruptDataError, MissingDataError

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(BenchError):
    """The run was told to stop (a signal), saved a checkpoint and stopped; the same command resumes it."""


class StopSignals:
    """While active (a ``with`` block), SIGUSR1 and SIGTERM only set ``requested``; the loop checks it after
    each optimiser step. Outside the block the previous handlers are back (so a signal during selection or
    data loading still ends the process at once). A no-op off the main thread, where Python cannot install
    handlers."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None  # the signal number received
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's handler signature
        if self.requested is None:
            log.warning("received %s: writing a checkpoint at the next optimiser step, then stopping",
                        signal.Signals(signum).name)
        self.requested = signum

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def fingerprint(obj: dict) -> str:
    """The run's identity: a digest of everything that determines its numbers."""
    return json_digest(obj)


def _trainable_state(model: nn.Module) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(path: Path, model, optimizer, scaler, state: dict) -> None:
    blob = {"model": _trainable_state(model), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, **state}
    with atomic.atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_checkpoint(path: Path, expected_fp: str) -> dict:
    path = Path(path)
    if not path.exists():
        raise MissingDataError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CorruptDataError(f"checkpoint {path} cannot be read: {exc}") from exc
    if blob.get("fingerprint") != expected_fp:
        raise BadInputError(f"checkpoint {path} was made with different inputs (recipe, selection, seed, encoder "
                            "or data); use another --out or --no-resume")
    return blob


def restore(path: Path, expected_fp: str, model: nn.Module, optimizer, scaler) -> dict:
    """Load a checkpoint into ``model`` / ``optimizer`` / ``scaler``; returns its history, evals and epoch (the
    epochs finished), and for a checkpoint written in the middle of an epoch on a signal, ``step`` (the
    optimiser steps of the next epoch already taken) and ``partial`` (each process's partial epoch)."""
    blob = load_checkpoint(path, expected_fp)
    missing = model.load_state_dict(blob["model"], strict=False)
    if missing.unexpected_keys:
        raise CorruptDataError(f"checkpoint {path} holds unknown tensors: {missing.unexpected_keys[:3]}")
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return {"history": blob["history"], "evals": blob["evals"], "epoch": int(blob["epoch"]),
            "step": int(blob.get("step") or 0), "partial": blob.get("partial")}
