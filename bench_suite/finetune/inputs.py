"""Every check of a finetuning's inputs that can fail, done before any model is built or any step taken.

Bad input - an unknown recipe or one for the other task, an empty or malformed selection, ids that are
not in the pool, train and test shards of different datasets, a missing weights file or checkpoint -
must stop a run with a one-line error in seconds, not after an hour of training. ``check_job`` runs
them all and returns the checked ``Job``: the resolved recipe, the sorted ids, the two manifests, the
class list, the epochs for the selection ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench_suite.data import shards as wshards
from bench_suite.digest import ids_digest
from bench_suite.encoders.assets import cache_root
from bench_suite.errors import BadInputError, MissingDataError, unknown
from bench_suite.finetune.recipes import TASK_OF_KIND, epochs_for, get_recipe, resolve
from bench_suite.finetune.samples import check_ids_in_manifest
from bench_suite.methods.selection import Selection


@dataclass
class Job:
    """A finetuning's checked inputs."""

    task: str
    recipe_name: str
    recipe: dict
    ids: np.ndarray  # sorted, unique, int64
    selection: dict  # where the ids came from, their count and digest
    train_shards: Path
    test_shards: Path
    train_manifest: dict
    test_manifest: dict
    classes: list
    num_classes: int
    ratio: float  # selected / pool
    epochs: int
    encoder: object  # a registry name or an encoder object
    image_size: int | None


def selected_ids(selection) -> tuple[np.ndarray, dict]:
    """The sorted ids of a selection file, a Selection or an id list, and what is known of their origin."""
    if isinstance(selection, (str, Path)):
        sel = Selection.load(selection)
        ids, info = sel.ids, {"path": str(selection), "method": sel.method, "budget": sel.budget, "seed": sel.seed}
    elif isinstance(selection, Selection):
        ids, info = selection.ids, {"method": selection.method, "budget": selection.budget, "seed": selection.seed}
    else:
        ids, info = np.asarray(selection), {}
    ids = np.asarray(ids)
    if ids.size == 0:
        raise BadInputError("empty selection: there is nothing to finetune on")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise BadInputError(f"selection ids must be a 1-D list of integers, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if (ids < 0).any():
        raise BadInputError(f"selection holds negative ids (e.g. {ids[ids < 0][:3].tolist()})")
    if len(np.unique(ids)) != len(ids):
        raise BadInputError("selection holds duplicate ids")
    info["n"] = int(len(ids))
    info["ids_sha"] = ids_digest(ids)
    return np.sort(ids), info


def named_recipe(recipe, recipe_name: str | None, recipes_file, overrides: dict | None) -> tuple[str, dict]:
    """(name, resolved recipe) of a recipe name (catalogue + ``recipes_file``) or a recipe mapping."""
    if isinstance(recipe, str):
        return recipe, get_recipe(recipe, recipes_file, overrides)
    if isinstance(recipe, dict):
        name = recipe_name or "custom"
        return name, resolve({**recipe, **(overrides or {})}, where=f"recipe {name!r}")
    raise BadInputError(f"recipe must be a name or a mapping, got {type(recipe).__name__}")


def _check_recipe_task(name: str, recipe: dict, task: str) -> None:
    if recipe["kind"] == "linear_probe":
        raise BadInputError(f"recipe {name!r} is a linear probe on frozen features: run it through the tables "
                            "(bench_suite/finetune/linear_probe.py), not the finetuning launcher")
    if TASK_OF_KIND[recipe["kind"]] != task:
        raise BadInputError(f"recipe {name!r} (kind {recipe['kind']}) is for --task {TASK_OF_KIND[recipe['kind']]}, "
                            f"not --task {task}")


def _check_shards(task: str, train_shards, test_shards) -> tuple[dict, dict, list, int]:
    """The two manifests (of one dataset, of the task's kind), the class names and their number."""
    train_manifest = wshards.load_manifest(train_shards)
    test_manifest = wshards.load_manifest(test_shards)
    classes = list(test_manifest.get("classes") or train_manifest.get("classes") or [])
    num_classes = int(train_manifest.get("num_classes") or len(classes))
    if int(test_manifest.get("num_classes") or num_classes) != num_classes:
        raise BadInputError(f"train shards {train_shards} have {num_classes} classes but test shards {test_shards} "
                            f"have {test_manifest.get('num_classes')}: not the same dataset")
    if train_manifest.get("dataset") != test_manifest.get("dataset"):
        raise BadInputError(f"train shards are {train_manifest.get('dataset')!r} but test shards are "
                            f"{test_manifest.get('dataset')!r}")
    for m, where in ((train_manifest, train_shards), (test_manifest, test_shards)):
        if task == "seg" and m.get("task", "cls") != "seg":
            raise BadInputError(f"{where} holds a classification dataset ({m.get('dataset')}); --task seg needs "
                                "segmentation shards (e.g. seg_digits)")
    return train_manifest, test_manifest, classes, num_classes


def _check_files(weights, resume_from) -> None:
    """The weights file exists: as given, or (a bare relative name) in the cache folder, where the encoders
    look too (``encoders.checkpoints.locate``)."""
    if weights is not None and weights != "hub" and not Path(weights).exists() \
            and not (cache_root() / weights).is_file():
        raise MissingDataError(f"encoder weights not found: {weights} (nor in {cache_root()})")
    if resume_from is not None and not Path(resume_from).exists():
        raise MissingDataError(f"checkpoint not found: {resume_from} (pass an existing checkpoint.pt to --resume)")


def check_job(task: str, train_shards, test_shards, selection, recipe, *, recipe_name=None, recipes_file=None,
              overrides=None, encoder=None, weights=None, image_size=None, resume_from=None) -> Job:
    """Check everything ``finetune`` is given (see the module docstring); the first problem raises."""
    if task not in ("cls", "seg"):
        raise unknown("task", task, ["cls", "seg"])
    name, rcp = named_recipe(recipe, recipe_name, recipes_file, overrides)
    _check_recipe_task(name, rcp, task)
    ids, sel_info = selected_ids(selection)
    train_manifest, test_manifest, classes, num_classes = _check_shards(task, train_shards, test_shards)
    check_ids_in_manifest(train_manifest, ids, train_shards)
    encoder = encoder or rcp.get("encoder")
    if not encoder:
        raise BadInputError("no encoder: pass --encoder NAME (or set `encoder:` in the recipe)")
    _check_files(weights, resume_from)
    ratio = len(ids) / max(1, int(train_manifest["count"]))
    return Job(task, name, rcp, ids, sel_info, Path(train_shards), Path(test_shards), train_manifest, test_manifest,
               classes, num_classes, ratio, epochs_for(rcp, ratio), encoder, image_size or rcp["image_size"])
