"""Checkpoints of a finetuning, and the fingerprint that ties one to its inputs.

A checkpoint holds the trainable parameters and the buffers (the frozen weights come back from the
encoder), the optimiser and grad-scaler state, and the history so far. It carries the run's fingerprint
(recipe, selection, seed, encoder, data), and loading refuses a checkpoint made with other inputs, so a
rerun resumes only what it would itself have computed. Writes are atomic: an interrupted save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from bench_suite import atomic
from bench_suite.digest import json_digest
from bench_suite.errors import BadInputError, CorruptDataError, MissingDataError


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
    """Load a checkpoint into ``model`` / ``optimizer`` / ``scaler``; returns its history, evals and epoch."""
    blob = load_checkpoint(path, expected_fp)
    missing = model.load_state_dict(blob["model"], strict=False)
    if missing.unexpected_keys:
        raise CorruptDataError(f"checkpoint {path} holds unknown tensors: {missing.unexpected_keys[:3]}")
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return {"history": blob["history"], "evals": blob["evals"], "epoch": int(blob["epoch"])}
