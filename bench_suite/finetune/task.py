"""The interface between the training loop and a task (classification or segmentation).

The loop knows batches, losses and optimiser steps; a ``Task`` knows how to turn samples into model
inputs and targets, the per-sample loss, and how to evaluate on the test split. ``ClsTask``
(``classification``) and ``SegTask`` (``segmentation``) implement it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from bench_suite.finetune.samples import Samples
from bench_suite.runtime import Runtime


class Task:
    """What differs between classification and segmentation. ``model`` maps (B,3,S,S) -> outputs."""

    name = "task"
    metric = "metric"

    def use_prefix(self, model: nn.Module, pool: Samples, device) -> bool:
        """Cache the frozen first blocks' output per sample (when possible); True if it will."""
        return False

    def set_epoch(self, seed: int, epoch: int) -> None:
        """The run's seed and the epoch of the training batches that follow (for per-sample random draws a
        task makes itself, as segmentation's mmseg pipeline does)."""

    def inputs(self, pool: Samples, idx: np.ndarray, aug: np.ndarray | None, device) -> tuple:
        raise NotImplementedError

    def per_sample_loss(self, out, target) -> torch.Tensor:
        raise NotImplementedError

    def n_correct(self, out, target) -> float:
        return 0.0

    def evaluate(self, model: nn.Module, test: Samples, ctx: Runtime, amp: str, batch: int) -> dict:
        raise NotImplementedError
