"""Finetune on a selection and evaluate on the test split: classification (top-1) or segmentation (mIoU).

    python -m launchers.finetune --task cls --dataset mnist --selection sel.json --recipe cpu_finetune \\
        --seed 0 --out runs/mnist-s0          # the cpu profile's MNIST pool/test shards, made under work_dirs/
    python -m launchers.finetune --task cls --dataset-shards work/mnist-train --test-shards work/mnist-test \\
        --selection sel.json --recipe cpu_finetune --encoder dinov2_vits14 --seed 0 --out runs/mnist-s0
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m launchers.finetune ...   # 2 CPU processes
    accelerate launch --multi_gpu --num_processes 8 -m launchers.finetune ... --recipes-file paper   # 8 GPUs

Writes ``OUT/metrics.json`` atomically (top-1 or mIoU, per-class numbers, epochs, wall time, recipe, seed,
evaluation history) and ``OUT/checkpoint.pt`` every ``checkpoint_every`` epochs; a rerun with the same
inputs resumes from it. Recipes are data: ``launchers/recipes.yaml`` plus a profile's ``recipes:``
(``--recipes-file cpu|paper|FILE.yaml``). Bad input (unknown recipe, empty selection, ids that are not in
the dataset, a missing checkpoint or weights file) stops with a one-line error before any training.

In-process (the tables): ``finetune(...)`` below, or ``recipe_fn(...)`` for the tables' recipe protocol.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench_suite import atomic
from bench_suite.data import shards as wshards
from bench_suite.errors import BadInputError, MissingDataError, unknown
from bench_suite.finetune import engine as ft_engine
from bench_suite.finetune.recipes import TASK_OF_KIND, epochs_for, get_recipe, plan_batches, resolve

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


def _selected_ids(selection) -> tuple[np.ndarray, dict]:
    from bench_suite.methods.selection import Selection

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
    info["ids_sha"] = hashlib.sha256(np.sort(ids).tobytes()).hexdigest()[:16]
    return np.sort(ids), info


def _recipe(recipe, recipe_name, recipes_file, overrides) -> tuple[str, dict]:
    if isinstance(recipe, str):
        return recipe, get_recipe(recipe, recipes_file, overrides)
    if isinstance(recipe, dict):
        name = recipe_name or "custom"
        return name, resolve({**recipe, **(overrides or {})}, where=f"recipe {name!r}")
    raise BadInputError(f"recipe must be a name or a mapping, got {type(recipe).__name__}")


def finetune(task: str, train_shards, test_shards, selection, recipe, *, encoder=None, seed: int = 0,
             out=None, recipe_name: str | None = None, recipes_file=None, overrides: dict | None = None,
             weights=None, cache_dir=None, image_size: int | None = None, accelerator=None,
             distributed: bool = True, resume: bool = True, resume_from=None, progress: bool = True) -> dict:
    """Finetune on ``selection`` (a selection file, a Selection or ids) and evaluate on ``test_shards``.

    ``recipe``: a recipe name (catalogue + ``recipes_file``) or a recipe mapping. ``encoder``: a registry name
    or an encoder object (``preprocess``, ``backbone_for_finetune``, ``dim``, ``model``). ``distributed=False``
    keeps the run in this process even inside a process group. Returns the metrics; with ``out`` also
    writes ``out/metrics.json`` and checkpoints (``resume``: continue from ``out/checkpoint.pt``).
    """
    t_start = time.perf_counter()
    # ---- every check that can fail, before any model is built or any step taken
    if task not in ("cls", "seg"):
        raise unknown("task", task, ["cls", "seg"])
    name, rcp = _recipe(recipe, recipe_name, recipes_file, overrides)
    if rcp["kind"] == "linear_probe":
        raise BadInputError(f"recipe {name!r} is a linear probe on frozen features: run it through the tables "
                            "(launchers/linear_probe.py), not the finetuning launcher")
    if TASK_OF_KIND[rcp["kind"]] != task:
        raise BadInputError(f"recipe {name!r} (kind {rcp['kind']}) is for --task {TASK_OF_KIND[rcp['kind']]}, "
                            f"not --task {task}")
    ids, sel_info = _selected_ids(selection)
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
    ft_engine.check_ids_in_manifest(train_manifest, ids, train_shards)
    encoder = encoder or rcp.get("encoder")
    if not encoder:
        raise BadInputError("no encoder: pass --encoder NAME (or set `encoder:` in the recipe)")
    if weights is not None and not Path(weights).exists():
        raise MissingDataError(f"encoder weights not found: {weights}")
    if resume_from is not None and not Path(resume_from).exists():
        raise MissingDataError(f"checkpoint not found: {resume_from} (pass an existing checkpoint.pt to --resume)")
    ratio = len(ids) / max(1, int(train_manifest["count"]))
    epochs = epochs_for(rcp, ratio)
    size = image_size or rcp["image_size"]

    ctx = ft_engine.make_context(accelerator, distributed)
    if ctx.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # share the cores between processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.world)))
    if isinstance(encoder, str):
        from bench_suite.encoders import get_encoder

        enc = get_encoder(encoder, image_size=size, weights=weights, cache_dir=cache_dir, device=str(ctx.device))
    else:  # an encoder object (preprocess, backbone_for_finetune, dim, model), e.g. from an in-process caller
        enc = encoder
    enc_meta = dict(getattr(enc, "meta", None) or {"name": str(getattr(enc, "name", encoder))})
    size = size or getattr(enc, "image_size", None)
    fp = ft_engine.fingerprint({"task": task, "recipe": {k: v for k, v in rcp.items() if k not in
                                                         ("eval_every", "checkpoint_every")},
                                "epochs": epochs, "ids": sel_info["ids_sha"], "seed": seed, "encoder": enc_meta,
                                "image_size": size, "train": train_manifest["checksum"],
                                "test": test_manifest["checksum"]})
    out = Path(out) if out is not None else None
    ckpt_path = out / CHECKPOINT if out is not None else None
    if resume_from is None and resume and ckpt_path is not None and ckpt_path.exists():
        resume_from = ckpt_path
    if resume_from is not None:
        ft_engine.load_checkpoint(resume_from, fp)  # a checkpoint of other inputs fails here, before training

    # ---- data (each process reads its shards; ids that are not there fail here, still before training)
    pool = ft_engine.load_samples(train_shards, ctx, ids=ids, share=False, need_masks=task == "seg")
    test = ft_engine.load_samples(test_shards, ctx, ids=None, share=True, need_masks=task == "seg")
    if int(pool.labels.max()) >= num_classes:
        raise BadInputError(f"labels up to {int(pool.labels.max())} but the manifest lists {num_classes} classes")

    torch.manual_seed(seed)  # the fresh head / decoder: identical on every process
    if task == "cls":
        from bench_suite.finetune.classification import ClsTask, build_classifier

        model, model_info = build_classifier(enc, rcp, num_classes)
        task_impl = ClsTask(enc, rcp, num_classes, classes)
    else:
        from bench_suite.finetune.segmentation import SegTask, build_segmenter

        model, model_info = build_segmenter(enc, rcp, num_classes)
        task_impl = SegTask(enc, rcp, num_classes, classes)
    model.to(ctx.device)
    model_info["frozen_prefix_cache"] = task_impl.use_prefix(model, pool, ctx.device)
    plan = plan_batches(rcp, len(pool), ctx.world)
    if ctx.is_main:
        log.info("finetune %s: %d samples, recipe %s, %d epochs x %d steps (global batch %d = %d process(es) x "
                 "%d x %d accumulation), %s trainable of %s parameters", task, len(pool), name, epochs,
                 plan["steps_per_epoch"], plan["global_batch"], ctx.world, plan["micro_batch"], plan["accum_steps"],
                 f"{model_info['trainable_params']:,}", f"{model_info['total_params']:,}")

    res = ft_engine.train(task_impl, model, pool, test, rcp, epochs=epochs, seed=seed, ctx=ctx, ckpt_path=ckpt_path,
                          fp=fp, resume_from=resume_from, progress=progress)
    metric = task_impl.metric
    last = res.evals[-1]
    best = max(res.evals, key=lambda e: e[metric])
    chosen = best if rcp["best_or_last"] == "best" else last
    trained = res.seconds_train
    metrics = {
        "task": task, "metric": metric, metric: chosen[metric], "reported": rcp["best_or_last"],
        "reported_epoch": chosen["epoch"], "per_class": chosen["per_class"],
        f"{metric}_last": last[metric], f"{metric}_best": best[metric], "best_epoch": best["epoch"],
        "evals": [{k: v for k, v in e.items() if k not in ("per_class", "per_class_acc", "confusion")}
                  for e in res.evals],
        "epochs": epochs, "epochs_this_run": len(trained), "resumed_from_epoch": res.resumed_from,
        "wall_seconds": time.perf_counter() - t_start,
        "seconds_per_epoch": float(np.mean(trained)) if trained else None,
        "eval_seconds": float(sum(e["seconds"] for e in res.evals)),
        "history": res.history, "recipe_name": name, "recipe": rcp, "seed": seed,
        "n_train": len(pool), "n_test": last["n_test"], "ratio": ratio, "classes": classes,
        "encoder": enc_meta, "image_size": size, "processes": ctx.world, "device": str(ctx.device), "amp": res.amp,
        **{k: v for k, v in plan.items()}, "model": model_info, "selection": sel_info,
        "train_shards": {"path": str(train_shards), "dataset": train_manifest.get("dataset"),
                         "checksum": train_manifest["checksum"]},
        "test_shards": {"path": str(test_shards), "checksum": test_manifest["checksum"]},
        "fingerprint": fp, "versions": _versions(),
    }
    if task == "seg":
        metrics["aacc"] = chosen["aacc"]
        metrics["per_class_acc"] = chosen["per_class_acc"]
        metrics["confusion"] = chosen["confusion"]
    if out is not None and ctx.is_main:
        atomic.write_json(out / METRICS, metrics)
    ctx.dist.barrier()
    return metrics


def _versions() -> dict:
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__}


def recipe_fn(recipe_name: str, recipe: dict, *, encoder: dict, work_dir, task: str = "cls", progress: bool = False):
    """The tables' recipe protocol: ``fn(train_store, ids, test_store, seed) -> metrics``.

    The shard folders come from the feature stores' meta (``shards``); ``encoder`` is the profile's encoder
    mapping (name, image_size, weights). Each call is one process's work (``distributed=False``); its
    checkpoints go under ``work_dir/<digest>`` so an interrupted cell resumes.
    """
    def fn(train_store, ids, test_store, seed):
        train_dir, test_dir = train_store.meta.get("shards"), test_store.meta.get("shards")
        if not train_dir or not test_dir:
            raise BadInputError("the feature stores do not record their shard folders (meta 'shards')")
        ids = np.asarray(ids, dtype=np.int64)
        key = hashlib.sha256(repr((recipe_name, sorted(recipe.items()), encoder, train_dir, test_dir, seed,
                                   hashlib.sha256(np.sort(ids).tobytes()).hexdigest())).encode()).hexdigest()[:20]
        return finetune(task, train_dir, test_dir, ids, recipe, recipe_name=recipe_name, encoder=encoder["name"],
                        image_size=recipe.get("image_size") or encoder.get("image_size"),
                        weights=encoder.get("weights"), seed=seed, out=Path(work_dir) / key, distributed=False,
                        progress=progress)
    return fn


def parse_overrides(pairs: list[str] | None) -> dict:
    """``--set key=value`` pairs; values are YAML (3, 0.01, null, true, [0.6, 1.0])."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, val = pair.partition("=")
        if not sep or not key:
            raise BadInputError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(val)
        except yaml.YAMLError as exc:
            raise BadInputError(f"--set {pair!r}: the value is not valid YAML ({exc})") from exc
    return out


def _shard_folders(args) -> tuple[Path, Path]:
    """``--dataset NAME`` (shards made from the profile's split settings) or the two shard folders."""
    if args.dataset:
        if args.dataset_shards or args.test_shards:
            raise BadInputError("give --dataset NAME or --dataset-shards/--test-shards, not both")
        from bench_suite.profiles import load_profile

        profile = load_profile(args.profile)
        if args.dataset not in profile["datasets"]:
            raise unknown(f"dataset of profile {profile['name']}", args.dataset, profile["datasets"])
        writer = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
        folders = [wshards.ensure_shards(args.dataset, part, profile["datasets"][args.dataset][part], Path(args.work),
                                         args.source, write=writer) for part in ("pool", "test")]
        for folder in folders:  # the other ranks wait for rank 0's shards
            deadline = time.monotonic() + 3600
            while not (folder / wshards.MANIFEST).exists() and time.monotonic() < deadline:
                time.sleep(2)
        return folders[0], folders[1]
    if not (args.dataset_shards and args.test_shards):
        raise BadInputError("give --dataset NAME, or both --dataset-shards DIR and --test-shards DIR")
    return Path(args.dataset_shards), Path(args.test_shards)


def main(argv=None) -> int:
    import argparse

    from bench_suite.cli import main_guard, setup_logging

    p = argparse.ArgumentParser(prog="python -m launchers.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["cls", "seg"], default="cls")
    p.add_argument("--dataset", help="a dataset of --profile: its pool and test shards are made under --work if "
                                      "missing (the same folders the tables use)")
    p.add_argument("--profile", default="cpu", help="profile for --dataset (cpu, paper, or a YAML file)")
    p.add_argument("--source", help="local copy of a paper dataset for --dataset (cifar10, cifar100, imagenet)")
    p.add_argument("--work", default=os.environ.get("BENCH_SUITE_WORK", "work_dirs"), help="cache folder for --dataset")
    p.add_argument("--dataset-shards", help="train split shard folder (the pool the selection indexes)")
    p.add_argument("--test-shards", help="test split shard folder (evaluation)")
    p.add_argument("--selection", required=True, help="selection JSON (bench_suite.methods.selection.Selection)")
    p.add_argument("--recipe", required=True, help="recipe name (launchers/recipes.yaml or --recipes-file)")
    p.add_argument("--recipes-file", help="profile name (cpu, paper) or YAML file whose `recipes:` override the catalogue")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one recipe field, e.g. --set epochs=3")
    p.add_argument("--encoder", help="encoder registry name (default: the recipe's `encoder`)")
    p.add_argument("--weights", help="local checkpoint for encoders that need one (dino_vits16)")
    p.add_argument("--image-size", type=int, help="override the recipe's image size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder: metrics.json, checkpoint.pt")
    p.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint (default: OUT/checkpoint.pt if present)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/checkpoint.pt exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")

    @main_guard
    def run():
        args = p.parse_args(argv)
        setup_logging(args.verbose)
        train_shards, test_shards = _shard_folders(args)
        m = finetune(args.task, train_shards, test_shards, args.selection, args.recipe,
                     recipes_file=args.recipes_file, overrides=parse_overrides(args.set), encoder=args.encoder,
                     weights=args.weights, image_size=args.image_size, seed=args.seed, out=args.out,
                     resume=not args.no_resume, resume_from=args.resume, progress=not args.quiet)
        log.info("%s %s = %.2f (%s of %d evaluation(s)), %d samples, %d epochs, %.0f s -> %s",
                 m["task"], m["metric"], m[m["metric"]], m["reported"], len(m["evals"]), m["n_train"],
                 m["epochs"], m["wall_seconds"], Path(args.out) / METRICS)
        return 0

    return run()


if __name__ == "__main__":
    main()
