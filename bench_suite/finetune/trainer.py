"""The finetuning engine as a task-model trainer for other plug-ins (registered as ``"finetune"`` in
``bench_suite.trainers``; the active-learning baselines retrain their task model with it every round).

It is the same engine as a table's finetuning - the recipe resolver (``recipes``), the classifier (the
encoder's backbone + a fresh linear head, ``classification``), the training loop (``loop``: epochs, optimiser
steps, micro batches, amp, crop / flip) - run in memory: the samples are given as images (no shards, no test
split, no checkpoints), and the trained model is returned instead of a metrics file.

- ``recipe(name, overrides=None)``: the catalogue's recipe ``name`` resolved (defaults filled, checked);
- ``build(encoder, recipe, num_classes, seed=)``: a fresh classifier from a fresh copy of the encoder's
  pretrained backbone, its head drawn from ``seed``; ``(model, info)``;
- ``fit(model, encoder, ids, labels, images, recipe, seed=, device=, task_wrapper=None)``: train ``model`` on
  the samples (``images[i]`` a uint8 array of id ``ids[i]`` with label ``labels[i]``) for the recipe's
  epochs; ``task_wrapper(cls_task)`` may replace the loop's task (e.g. LearnLoss's joint loss over a model
  whose forward returns ``(logits, predicted loss)``); returns the loop's history and timings;
- ``preprocess(encoder, images)``: the encoder's own preprocessing of a list of uint8 images.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench_suite.finetune.classification import ClsTask, build_classifier, preprocess
from bench_suite.finetune.loop import train
from bench_suite.finetune.recipes import resolve_named
from bench_suite.finetune.samples import Samples
from bench_suite.runtime import Runtime
from bench_suite.trainers import register


@register
class FinetuneTrainer:
    name = "finetune"

    @staticmethod
    def recipe(name: str, overrides: dict | None = None) -> dict:
        return resolve_named(name, None, overrides)

    @staticmethod
    def build(encoder, recipe: dict, num_classes: int, *, seed: int):
        torch.manual_seed(int(seed))
        return build_classifier(encoder, recipe, int(num_classes))

    @staticmethod
    def preprocess(encoder, images: list) -> torch.Tensor:
        return preprocess(encoder, images)

    @staticmethod
    def fit(model, encoder, ids, labels, images: list, recipe: dict, *, seed: int, device, num_classes: int,
            task_wrapper=None, progress: bool = False) -> dict:
        t0 = time.perf_counter()
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        pool = Samples(ids[order], np.asarray(labels, dtype=np.int64)[order], [images[i] for i in order], None,
                       encoded=False)
        test = Samples(np.zeros(0, np.int64), np.zeros(0, np.int64), [], None, encoded=False)
        ctx = Runtime(0, 1, torch.device(device))
        task = ClsTask(encoder, recipe, int(num_classes), [str(c) for c in range(int(num_classes))])
        model.to(ctx.device)
        prefix = False
        if task_wrapper is None:
            prefix = task.use_prefix(model, pool, ctx.device)
        else:
            task.device = ctx.device
            task = task_wrapper(task)
        res = train(task, model, pool, test, recipe, epochs=int(recipe["epochs"]), seed=int(seed), ctx=ctx,
                    ckpt_path=None, fp="", progress=progress)
        model.eval()
        last = res.history[-1] if res.history else {}
        return {"epochs": res.epochs, "steps_per_epoch": res.plan["steps_per_epoch"], "amp": res.amp,
                "frozen_prefix_cache": bool(prefix), "final_loss": last.get("loss"),
                "train_acc": last.get("train_acc"), "history": res.history,
                "seconds": time.perf_counter() - t0}
