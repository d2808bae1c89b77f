"""The registry of task-model trainers: how one plug-in trains a model with another plug-in's engine.

The active-learning baselines (``baselines/``, a plug-in) retrain a task model in every round; in the paper
profile that model is the encoder's backbone finetuned by the finetuning engine (``bench_suite/finetune/``,
another plug-in). Plug-ins never import each other (ARCHITECTURE.md), so - as BiLAF reaches ActiveFT through
the method registry - the engine registers a trainer here and the baselines look it up by name:
``trainers.get("finetune")``. Discovery is the one registry shape of ``bench_suite.plugins``: the entry-point
group ``bench_suite.trainers`` (pyproject.toml) names the module that registers it.

A trainer is an object with a ``name`` and the methods its callers use; the finetuning engine's
(``bench_suite/finetune/trainer.py``) documents them: ``recipe(name)``, ``build(encoder, recipe, num_classes,
seed=)``, ``fit(model, encoder, ids, labels, images, recipe, seed=, device=)`` and ``preprocess(encoder, images)``.
"""

from __future__ import annotations

from bench_suite.plugins import Registry

REGISTRY: Registry[object] = Registry("task-model trainer", "bench_suite.trainers")


def register(item):
    """Add a trainer (an object or class with a ``name``); usable as a class decorator."""
    return REGISTRY.register(item)


def get(name: str):
    """The trainer called ``name`` (an unknown name is an error listing the known ones)."""
    return REGISTRY.get(name)


def names() -> list[str]:
    return sorted(REGISTRY.names())
