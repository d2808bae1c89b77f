"""How a finetuning steps: the optimiser and its parameter groups, the learning-rate schedule, mixed precision.

Weight decay skips biases, norms, position embeddings and class tokens (timm's rule). The learning rate
is set per optimiser step: linear warm-up from ``warmup_lr``, then cosine or poly decay to ``min_lr``, or
constant. ``amp: auto`` is bf16 on CUDA GPUs that have it and fp32 elsewhere (mixed precision on a CPU is
refused with a warning rather than silently emulated).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn as nn

from bench_suite.errors import BadInputError

log = logging.getLogger(__name__)

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "cls_emb")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, recipe: dict) -> torch.optim.Optimizer:
    groups = param_groups(model, recipe["weight_decay"])
    if not any(g["params"] for g in groups):
        raise BadInputError("the recipe leaves no parameter trainable")
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"])
    return torch.optim.AdamW(groups, lr=recipe["lr"])


def lr_at(step: int, total: int, warmup: int, recipe: dict) -> float:
    base, lo = recipe["lr"], recipe["min_lr"]
    if step < warmup:
        return recipe["warmup_lr"] + (base - recipe["warmup_lr"]) * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if recipe["schedule"] == "cosine":
        return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * t))
    if recipe["schedule"] == "poly":
        return lo + (base - lo) * (1 - t) ** recipe["poly_power"]
    return base


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def resolve_amp(amp: str, device: torch.device) -> str:
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            log.warning("amp=%s requested on %s: mixed precision needs a GPU here, running fp32", amp, device)
        return "no"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return amp


def autocast(amp: str, device: torch.device):
    if amp == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
