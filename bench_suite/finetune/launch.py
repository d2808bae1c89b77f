"""One finetuning run, end to end: ``finetune()``; and ``recipe_fn()``, the tables' recipe protocol over it.

``finetune`` checks every input first (``inputs.check_job``), then builds the encoder and the task's model
(classification: backbone + linear head; segmentation: Segmenter), reads the selected samples and the test
split, trains (``loop.train``), and reports the last or best evaluation as one metrics record, written
atomically to ``OUT/metrics.json``. Checkpoints go to ``OUT/checkpoint.pt``; a rerun with the same inputs
(same fingerprint) resumes from it, a checkpoint of other inputs is refused before training.

The CLI (``python -m launchers.finetune``) and the tables (through ``recipe_fn``) both call it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench_suite import atomic
from bench_suite.digest import ids_digest, json_digest
from bench_suite.encoders import get_encoder
from bench_suite.errors import BadInputError
from bench_suite.finetune.checkpoint import fingerprint, load_checkpoint
from bench_suite.finetune.classification import ClsTask, build_classifier
from bench_suite.finetune.inputs import Job, check_job
from bench_suite.finetune.linear_probe import linear_probe
from bench_suite.finetune.loop import TrainResult, train
from bench_suite.finetune.recipes import TASK_OF_KIND, plan_batches, resolve
from bench_suite.finetune.samples import load_samples
from bench_suite.finetune.segmentation import SegTask, build_segmenter
from bench_suite.profiles import EncoderRef
from bench_suite.runtime import Runtime, make_accelerator

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
NOT_IN_FINGERPRINT = ("eval_every", "checkpoint_every")  # cadence only: changing them keeps a checkpoint valid


def _runtime(accelerator, distributed: bool) -> Runtime:
    """Rank/world/device of this run. ``distributed=False``: a one-process run even inside a process group
    (the tables give each process its own cells)."""
    if accelerator is None and distributed:
        accelerator = make_accelerator()
    return Runtime() if accelerator is None else Runtime.of_accelerator(accelerator, distributed=distributed)


def _share_cores(ctx: Runtime) -> None:
    """On CPUs, the processes of a run share the cores (unless OMP_NUM_THREADS says otherwise)."""
    if ctx.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.world)))


def _encoder(job: Job, weights, cache_dir, ctx: Runtime) -> tuple[object, dict, int | None]:
    """The encoder object (built from its registry name, or as given), its metadata and the image size."""
    if isinstance(job.encoder, str):
        enc = get_encoder(job.encoder, image_size=job.image_size, weights=weights, cache_dir=cache_dir,
                          device=str(ctx.device))
    else:  # an encoder object (preprocess, backbone_for_finetune, dim, model), e.g. from an in-process caller
        enc = job.encoder
    meta = dict(getattr(enc, "meta", None) or {"name": str(getattr(enc, "name", job.encoder))})
    return enc, meta, job.image_size or getattr(enc, "image_size", None)


def _fingerprint(job: Job, enc_meta: dict, size, seed: int) -> str:
    recipe = {k: v for k, v in job.recipe.items() if k not in NOT_IN_FINGERPRINT}
    return fingerprint({"task": job.task, "recipe": recipe,
                        "epochs": job.epochs, "ids": job.selection["ids_sha"], "seed": seed, "encoder": enc_meta,
                        "image_size": size, "train": job.train_manifest["checksum"],
                        "test": job.test_manifest["checksum"]})


def _resume_from(out: Path | None, resume: bool, resume_from, fp: str):
    """The checkpoint to resume from (``resume_from``, else ``out/checkpoint.pt`` when ``resume`` and present),
    checked to be of these inputs; None for a fresh start."""
    ckpt_path = out / CHECKPOINT if out is not None else None
    if resume_from is None and resume and ckpt_path is not None and ckpt_path.exists():
        resume_from = ckpt_path
    if resume_from is not None:
        load_checkpoint(resume_from, fp)  # a checkpoint of other inputs fails here, before training
    return resume_from


def _build(job: Job, enc, pool, ctx: Runtime, seed: int):
    """The task's model (fresh head / decoder drawn from ``seed``: identical on every process) and its Task."""
    torch.manual_seed(seed)
    if job.task == "cls":
        model, info = build_classifier(enc, job.recipe, job.num_classes)
        task = ClsTask(enc, job.recipe, job.num_classes, job.classes)
    else:
        model, info = build_segmenter(enc, job.recipe, job.num_classes)
        task = SegTask(enc, job.recipe, job.num_classes, job.classes)
    model.to(ctx.device)
    info["frozen_prefix_cache"] = task.use_prefix(model, pool, ctx.device)
    return model, info, task


def _reported(res: TrainResult, metric: str, best_or_last: str) -> dict:
    """The reported evaluation (last or best), the last and the best, and the evaluation history."""
    last = res.evals[-1]
    best = max(res.evals, key=lambda e: e[metric])
    chosen = best if best_or_last == "best" else last
    out = {metric: chosen[metric], "reported": best_or_last, "reported_epoch": chosen["epoch"],
           "per_class": chosen["per_class"], f"{metric}_last": last[metric], f"{metric}_best": best[metric],
           "best_epoch": best["epoch"],
           "evals": [{k: v for k, v in e.items() if k not in ("per_class", "per_class_acc", "confusion")}
                     for e in res.evals]}
    if "confusion" in chosen:  # segmentation: pixel accuracy, per-class accuracy, the confusion matrix
        out.update(aacc=chosen["aacc"], per_class_acc=chosen["per_class_acc"], confusion=chosen["confusion"])
    return out


def _metrics(job: Job, res: TrainResult, metric: str, *, n_train: int, seed: int, enc_meta: dict, size,
             ctx: Runtime, plan: dict, model_info: dict, fp: str, seconds: float) -> dict:
    """The run's metrics record (metrics.json)."""
    trained = res.seconds_train
    return {
        "task": job.task, "metric": metric, **_reported(res, metric, job.recipe["best_or_last"]),
        "epochs": job.epochs, "epochs_this_run": len(trained), "resumed_from_epoch": res.resumed_from,
        "wall_seconds": seconds, "seconds_per_epoch": float(np.mean(trained)) if trained else None,
        "eval_seconds": float(sum(e["seconds"] for e in res.evals)),
        "history": res.history, "recipe_name": job.recipe_name, "recipe": job.recipe, "seed": seed,
        "n_train": n_train, "n_test": res.evals[-1]["n_test"], "ratio": job.ratio, "classes": job.classes,
        "encoder": enc_meta, "image_size": size, "processes": ctx.world, "device": str(ctx.device), "amp": res.amp,
        **plan, "model": model_info, "selection": job.selection,
        "train_shards": {"path": str(job.train_shards), "dataset": job.train_manifest.get("dataset"),
                         "checksum": job.train_manifest["checksum"]},
        "test_shards": {"path": str(job.test_shards), "checksum": job.test_manifest["checksum"]},
        "fingerprint": fp, "versions": {"torch": torch.__version__, "timm": importlib.metadata.version("timm")},
    }


def finetune(task: str, train_shards, test_shards, selection, recipe, *, encoder=None, seed: int = 0,
             out=None, recipe_name: str | None = None, recipes_file=None, overrides: dict | None = None,
             weights=None, cache_dir=None, image_size: int | None = None, accelerator=None,
             distributed: bool = True, resume: bool = True, resume_from=None, progress: bool = True,
             last_checkpoint: bool = True) -> dict:
    """Finetune on ``selection`` (a selection file, a Selection or ids) and evaluate on ``test_shards``.

    ``recipe``: a recipe name (catalogue + ``recipes_file``) or a recipe mapping. ``encoder``: a registry name
    or an encoder object (``preprocess``, ``backbone_for_finetune``, ``dim``, ``model``). ``distributed=False``
    keeps the run in this process even inside a process group. Returns the metrics; with ``out`` also
    writes ``out/metrics.json`` and checkpoints (``resume``: continue from ``out/checkpoint.pt``;
    ``last_checkpoint=False``: none after the last epoch).
    """
    t_start = time.perf_counter()
    job = check_job(task, train_shards, test_shards, selection, recipe, recipe_name=recipe_name,
                    recipes_file=recipes_file, overrides=overrides, encoder=encoder, weights=weights,
                    image_size=image_size, resume_from=resume_from)
    ctx = _runtime(accelerator, distributed)
    _share_cores(ctx)
    enc, enc_meta, size = _encoder(job, weights, cache_dir, ctx)
    fp = _fingerprint(job, enc_meta, size, seed)
    out = Path(out) if out is not None else None
    resume_from = _resume_from(out, resume, resume_from, fp)
    # data: each process reads its shards; ids that are not there fail here, still before training
    pool = load_samples(job.train_shards, ctx, ids=job.ids, share=False, need_masks=task == "seg")
    test = load_samples(job.test_shards, ctx, ids=None, share=True, need_masks=task == "seg")
    if int(pool.labels.max()) >= job.num_classes:
        raise BadInputError(f"labels up to {int(pool.labels.max())} but the manifest lists {job.num_classes} classes")
    model, model_info, task_impl = _build(job, enc, pool, ctx, seed)
    plan = plan_batches(job.recipe, len(pool), ctx.world)
    if ctx.is_main:
        log.info("finetune %s: %d samples, recipe %s, %d epochs x %d steps (global batch %d = %d process(es) x "
                 "%d x %d accumulation), %s trainable of %s parameters", task, len(pool), job.recipe_name,
                 job.epochs, plan["steps_per_epoch"], plan["global_batch"], ctx.world, plan["micro_batch"],
                 plan["accum_steps"], f"{model_info['trainable_params']:,}", f"{model_info['total_params']:,}")
    res = train(task_impl, model, pool, test, job.recipe, epochs=job.epochs, seed=seed, ctx=ctx,
                ckpt_path=out / CHECKPOINT if out is not None else None, fp=fp, resume_from=resume_from,
                progress=progress, last_checkpoint=last_checkpoint)
    metrics = _metrics(job, res, task_impl.metric, n_train=len(pool), seed=seed, enc_meta=enc_meta, size=size,
                       ctx=ctx, plan=plan, model_info=model_info, fp=fp, seconds=time.perf_counter() - t_start)
    if out is not None and ctx.is_main:
        atomic.write_json(out / METRICS, metrics)
    ctx.barrier()
    return metrics


def recipe_fn(recipe_name: str, recipe: dict, *, encoder: EncoderRef, work_dir, progress: bool = False):
    """The tables' recipe protocol: ``fn(train_store, ids, test_store, seed) -> metrics`` for a resolved recipe.

    A ``linear_probe`` recipe fits on the stores' features. A finetuning recipe (the task follows its kind)
    reads the shard folders from the feature stores' meta (``shards``) and starts from ``encoder`` (the
    profile's or the table's: name, image_size, weights; the recipe's own image_size wins). Each call is one
    process's work (``distributed=False``); its checkpoints go under ``work_dir/<digest>`` so an interrupted
    cell resumes. A finished cell keeps its ``metrics.json`` and no checkpoint (none is written after the last
    epoch; an earlier one is removed): the cell's result is cached by the table, and a DeiT-S checkpoint with
    its optimiser state is 173 MB (42 GB over Table 1's 243 paper cells).
    """
    recipe = resolve(recipe, where=f"recipe {recipe_name!r}")  # a no-op for a recipe resolve_named gave
    if recipe["kind"] == "linear_probe":
        options = {k: v for k, v in recipe.items() if k != "kind"}
        return lambda train_store, ids, test_store, seed: linear_probe(train_store, ids, test_store, seed=seed,
                                                                       **options)
    task = TASK_OF_KIND[recipe["kind"]]

    def fn(train_store, ids, test_store, seed):
        train_dir, test_dir = train_store.meta.get("shards"), test_store.meta.get("shards")
        if not train_dir or not test_dir:
            raise BadInputError("the feature stores do not record their shard folders (meta 'shards')")
        ids = np.asarray(ids, dtype=np.int64)
        key = json_digest({"recipe_name": recipe_name, "recipe": recipe, "encoder": dataclasses.asdict(encoder),
                           "train": train_dir, "test": test_dir, "seed": seed, "ids": ids_digest(ids)})
        out = Path(work_dir) / key
        metrics = finetune(task, train_dir, test_dir, ids, recipe, recipe_name=recipe_name, encoder=encoder.name,
                           image_size=recipe.get("image_size") or encoder.image_size, weights=encoder.weights,
                           seed=seed, out=out, distributed=False, progress=progress, last_checkpoint=False)
        (out / CHECKPOINT).unlink(missing_ok=True)
        return metrics
    return fn
