"""Finetuning recipes as data: the schema (defaults + checks), the catalogue, and the one resolver of a name.

A recipe is a flat mapping. Named recipes live in ``recipes.yaml`` next to this file (the catalogue: the
paper's appendix-B.2 recipes, the released code's variant, and the cpu-scale ones). A profile's
``recipes:`` mapping adds to it: an entry of a catalogue name overrides that entry field by field (so a
profile spells out only where it differs), an entry of a new name (the cpu profile's ``linear_probe``)
defines a recipe of its own. ``resolve_named`` is the one way from a name to a recipe, for the tables
(the profile's ``recipes:``) and for the finetuning CLI (``--recipes-file``, ``--set``) alike: catalogue
entry, then the profile's fields, then the overrides; every field left out takes its default below, and
every field is checked before any training starts.

Also here: how a recipe maps onto a run - epochs for a selection ratio, the global / micro batch plan and
the optimiser steps of an epoch.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from bench_suite.errors import BadInputError, MissingDataError, unknown
from bench_suite.profiles import load_profile

CATALOGUE = Path(__file__).with_name("recipes.yaml")

# Classification finetuning (kind: finetune): backbone from the encoder registry + a fresh linear head.
FINETUNE_DEFAULTS = {
    "kind": "finetune",
    "optimizer": "sgd",  # sgd | adamw
    "lr": 0.001,  # peak learning rate (not scaled by batch size)
    "momentum": 0.9,
    "weight_decay": 0.0001,  # not applied to biases, norms, position embeddings and class tokens (timm rule)
    "batch_size": 512,  # GLOBAL batch (all processes, one optimiser step); capped at the subset size
    "micro_batch_size": 64,  # per-process forward batch; more samples per process -> gradient accumulation
    "epochs": 1000,
    "epochs_by_ratio": None,  # {ratio: epochs}: the first key >= selected/pool wins (ImageNet 1% vs 5%)
    "schedule": "cosine",  # cosine | poly | constant (per optimiser step, after warm-up)
    "warmup_epochs": 0,  # linear warm-up from warmup_lr
    "warmup_lr": 0.0,
    "min_lr": 0.0,
    "poly_power": 0.9,
    "label_smoothing": 0.0,
    "drop_path": 0.0,  # stochastic depth, linearly increasing over the blocks (DeiT rule)
    "trainable_blocks": "all",  # "all" or K: only the last K blocks (+ everything after them) train
    "image_size": None,  # None: the encoder's default
    "crop_scale": None,  # [lo, hi]: random-resized-crop area range (train only); None: no crop
    "hflip": False,  # random horizontal flip (train only)
    "clip_grad": None,  # max global grad norm
    "repeated_aug": 1,  # >1: DeiT's repeated augmentation (each sample N times per epoch, RASampler's length)
    "eval_every": 0,  # evaluate on the test split every N epochs (0: only after the last epoch)
    "best_or_last": "last",  # report the last evaluation, or the best one (the released code's choice)
    "checkpoint_every": 10,  # epochs between checkpoints (the last epoch is always checkpointed)
    "amp": "auto",  # auto (bf16 on CUDA GPUs that have it, else fp32) | no | bf16 | fp16
    "encoder": None,  # optional default encoder name (the CLI's --encoder overrides it)
}

# Segmentation finetuning (kind: seg_finetune): Segmenter = ViT backbone patch tokens + decoder.
SEG_DEFAULTS = {
    **FINETUNE_DEFAULTS,
    "kind": "seg_finetune",
    "batch_size": 8,
    "micro_batch_size": 8,
    "epochs": 127,
    "schedule": "poly",
    "weight_decay": 0.0,
    "min_lr": 0.0,
    "decoder": "mask_transformer",  # linear | mask_transformer
    "decoder_layers": 2,
    "decoder_dropout": 0.1,
    "ignore_index": 255,
    "reduce_zero_label": False,  # ADE20K-style labels: 0 = unlabelled -> ignore, classes shift down by one
    # The data pipeline (bench_suite/finetune/segmentation.py, seg_pipeline.py). mmseg: mmsegmentation's ADE20K
    # protocol of the Segmenter configs - random resize (ratio_range of `scale`, aspect kept), an image_size
    # crop with cat_max_ratio, flip, photometric distortion; evaluation resized to fit `scale`, image_size
    # windows every slide_stride pixels (image_size null: the encoder's size). resize: images and labels squashed
    # to image_size, no augmentation, whole-image evaluation (cheap: a frozen backbone prefix runs once per
    # image). The default stays resize (what seg recipes did before); segmenter_paper says mmseg.
    "pipeline": "resize",
    "scale": [2048, 512],
    "ratio_range": [0.5, 2.0],
    "cat_max_ratio": 0.75,
    "flip_prob": 0.5,
    "photometric": True,
    "slide_stride": 341,
}

LINEAR_PROBE_DEFAULTS = {"kind": "linear_probe", "C": 1.0, "max_iter": 1000}

KINDS = {"finetune": FINETUNE_DEFAULTS, "seg_finetune": SEG_DEFAULTS, "linear_probe": LINEAR_PROBE_DEFAULTS}
TASK_OF_KIND = {"finetune": "cls", "seg_finetune": "seg", "linear_probe": "cls"}
# Bumped whenever a change to the code that trains / evaluates a kind can change its numbers: part of every
# cached table cell's key (tests/test_code_versions.py holds each to its source files).
KIND_VERSIONS = {"finetune": 1, "seg_finetune": 2, "linear_probe": 1}  # seg 2: the mmseg pipeline


_PARSED: dict = {}  # path -> (mtime_ns, size, data): a file is parsed once per change


def _read_yaml(path: Path) -> dict:
    """The YAML mapping of ``path``, parsed once per change of the file (a table resolves its recipes per cell:
    pure-Python YAML took 0.1-0.5 s per parse of the catalogue, 3 minutes over the paper plan's 351 lookups);
    a deep copy, so callers may change it."""
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if _PARSED.get(path, (None,))[0] != stamp:
            _PARSED[path] = (stamp, yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise BadInputError(f"recipes file {path} is not valid YAML: {exc}") from exc
    return copy.deepcopy(_PARSED[path][1])


def catalogue() -> dict[str, dict]:
    """The catalogue's named recipes, as written (defaults not filled in)."""
    return _read_yaml(CATALOGUE)


def recipes_of(recipes_file: str | Path | None) -> dict[str, dict]:
    """The ``recipes:`` mapping of a profile (a name, or a YAML file), or - without that key - a YAML file's top
    level; {} for None."""
    if recipes_file is None:
        return {}
    path = Path(recipes_file)
    if path.suffix not in (".yaml", ".yml"):
        return dict(load_profile(str(recipes_file)).recipes)
    if not path.exists():
        raise MissingDataError(f"recipes file not found: {path}")
    data = _read_yaml(path)
    extra = data.get("recipes", data) if isinstance(data, dict) else None
    if not isinstance(extra, dict):
        raise BadInputError(f"{recipes_file}: expected a mapping of recipe names to recipes")
    return extra


def _merge(base: dict | None, entry: dict | None, name: str) -> dict:
    """A profile's ``entry`` over the catalogue's ``base``, field by field; an entry of another kind replaces it."""
    for what, rec in (("catalogue", base), ("profile", entry)):
        if rec is not None and not isinstance(rec, dict):
            raise BadInputError(f"recipe {name!r} ({what}): expected a mapping, got {type(rec).__name__}")
    if base is None or entry is None:
        return dict(base if entry is None else entry)
    if entry.get("kind", base.get("kind", "finetune")) != base.get("kind", "finetune"):
        return dict(entry)
    return {**base, **entry}


def available(profile_recipes: dict | None = None) -> dict[str, dict]:
    """Every named recipe, as written: the catalogue with a profile's ``recipes:`` laid over it field by field."""
    base, extra = catalogue(), profile_recipes or {}
    return {name: _merge(base.get(name), extra.get(name), name) for name in {**base, **extra}}


def resolve_named(name: str, profile_recipes: dict | None = None, overrides: dict | None = None) -> dict:
    """THE recipe resolver: the catalogue entry ``name``, overridden field by field by the profile's entry of
    that name (a profile may also define new names), then by ``overrides`` (``--set``); defaults filled in,
    every field checked."""
    recipes = available(profile_recipes)
    if name not in recipes:
        raise unknown("recipe", name, sorted(recipes))
    recipe = resolve(recipes[name], where=f"recipe {name!r}")
    if overrides:
        recipe = resolve({**recipe, **overrides}, where=f"recipe {name!r} with overrides")
    return recipe


def get_recipe(name: str, recipes_file: str | Path | None = None, overrides: dict | None = None) -> dict:
    """``resolve_named`` with the profile's recipes read from ``recipes_file`` (a profile name or a YAML file)."""
    return resolve_named(name, recipes_of(recipes_file), overrides)


def resolve(recipe: dict, where: str = "recipe") -> dict:
    """Fill defaults and check every field; unknown fields are an error (a typo must not pass silently)."""
    if not isinstance(recipe, dict):
        raise BadInputError(f"{where}: expected a mapping, got {type(recipe).__name__}")
    kind = recipe.get("kind", "finetune")
    if kind not in KINDS:
        raise unknown(f"recipe kind in {where}", kind, KINDS)
    defaults = KINDS[kind]
    extra = set(recipe) - set(defaults)
    if extra:
        raise BadInputError(f"{where}: unknown field(s) {', '.join(sorted(extra))}; known: {', '.join(sorted(defaults))}")
    out = {**defaults, **recipe, "kind": kind}
    if kind == "linear_probe":
        return out
    _check(out, where)
    return out


def _check(r: dict, where: str) -> None:
    def bad(msg):
        raise BadInputError(f"{where}: {msg}")

    if r["optimizer"] not in ("sgd", "adamw"):
        bad(f"optimizer must be sgd or adamw, got {r['optimizer']!r}")
    if r["schedule"] not in ("cosine", "poly", "constant"):
        bad(f"schedule must be cosine, poly or constant, got {r['schedule']!r}")
    for key in ("lr", "momentum", "weight_decay", "warmup_lr", "min_lr", "label_smoothing", "drop_path"):
        if not isinstance(r[key], (int, float)) or r[key] < 0 or math.isnan(r[key]):
            bad(f"{key} must be a non-negative number, got {r[key]!r}")
    if r["lr"] <= 0:
        bad(f"lr must be positive, got {r['lr']}")
    if r["label_smoothing"] >= 1 or r["drop_path"] >= 1:
        bad("label_smoothing and drop_path must be below 1")
    for key in ("batch_size", "micro_batch_size", "epochs", "repeated_aug"):
        if not isinstance(r[key], int) or isinstance(r[key], bool) or r[key] <= 0:
            bad(f"{key} must be a positive integer, got {r[key]!r}")
    for key in ("eval_every", "checkpoint_every", "warmup_epochs"):
        if not isinstance(r[key], int) or isinstance(r[key], bool) or r[key] < 0:
            bad(f"{key} must be a non-negative integer, got {r[key]!r}")
    tb = r["trainable_blocks"]
    if not (tb == "all" or (isinstance(tb, int) and not isinstance(tb, bool) and tb >= 0)):
        bad(f"trainable_blocks must be 'all' or a non-negative integer, got {tb!r}")
    if r["image_size"] is not None and (not isinstance(r["image_size"], int) or r["image_size"] <= 0):
        bad(f"image_size must be a positive integer, got {r['image_size']!r}")
    cs = r["crop_scale"]
    if cs is not None and not (isinstance(cs, (list, tuple)) and len(cs) == 2 and 0 < cs[0] <= cs[1] <= 1):
        bad(f"crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {cs!r}")
    if r["best_or_last"] not in ("best", "last"):
        bad(f"best_or_last must be best or last, got {r['best_or_last']!r}")
    if r["amp"] not in ("auto", "no", "bf16", "fp16"):
        bad(f"amp must be auto, no, bf16 or fp16, got {r['amp']!r}")
    if r["clip_grad"] is not None and (not isinstance(r["clip_grad"], (int, float)) or r["clip_grad"] <= 0):
        bad(f"clip_grad must be a positive number or null, got {r['clip_grad']!r}")
    ebr = r["epochs_by_ratio"]
    if ebr is not None:
        if not isinstance(ebr, dict) or not ebr:
            bad("epochs_by_ratio must be a mapping {ratio: epochs}")
        for k, v in ebr.items():
            if not (isinstance(k, (int, float)) and 0 < float(k) <= 1 and isinstance(v, int) and v > 0):
                bad(f"epochs_by_ratio entries must be ratio (0,1] -> positive epochs, got {k!r}: {v!r}")
    if r["kind"] == "seg_finetune":
        if r["decoder"] not in ("linear", "mask_transformer"):
            bad(f"decoder must be linear or mask_transformer, got {r['decoder']!r}")
        if not isinstance(r["decoder_layers"], int) or r["decoder_layers"] <= 0:
            bad(f"decoder_layers must be a positive integer, got {r['decoder_layers']!r}")
        if not isinstance(r["reduce_zero_label"], bool):
            bad(f"reduce_zero_label must be true or false, got {r['reduce_zero_label']!r}")
        if not isinstance(r["ignore_index"], int) or not 0 <= r["ignore_index"] <= 255:
            bad(f"ignore_index must be an integer in 0..255, got {r['ignore_index']!r}")
        _check_pipeline(r, bad)


def _check_pipeline(r: dict, bad) -> None:
    """The segmentation data pipeline's fields."""
    if r["pipeline"] not in ("mmseg", "resize"):
        bad(f"pipeline must be mmseg or resize, got {r['pipeline']!r}")
    sc, rr = r["scale"], r["ratio_range"]
    if not (isinstance(sc, (list, tuple)) and len(sc) == 2 and all(isinstance(v, int) and v > 0 for v in sc)):
        bad(f"scale must be [long, short] positive integers, got {sc!r}")
    if not (isinstance(rr, (list, tuple)) and len(rr) == 2 and 0 < rr[0] <= rr[1]):
        bad(f"ratio_range must be [lo, hi] with 0 < lo <= hi, got {rr!r}")
    if not isinstance(r["cat_max_ratio"], (int, float)) or not 0 < r["cat_max_ratio"] <= 1:
        bad(f"cat_max_ratio must be in (0, 1] (1: no redraws), got {r['cat_max_ratio']!r}")
    if not isinstance(r["flip_prob"], (int, float)) or not 0 <= r["flip_prob"] <= 1:
        bad(f"flip_prob must be in [0, 1], got {r['flip_prob']!r}")
    if not isinstance(r["photometric"], bool):
        bad(f"photometric must be true or false, got {r['photometric']!r}")
    if not isinstance(r["slide_stride"], int) or isinstance(r["slide_stride"], bool) or r["slide_stride"] <= 0 \
            or (r["pipeline"] == "mmseg" and r["image_size"] and r["slide_stride"] > r["image_size"]):
        bad(f"slide_stride must be a positive integer no larger than image_size, got {r['slide_stride']!r}")


def epochs_for(recipe: dict, ratio: float | None) -> int:
    """Epochs of a recipe for a selection ratio (``epochs_by_ratio``: the first key >= ratio)."""
    table = recipe.get("epochs_by_ratio")
    if not table or ratio is None:
        return int(recipe["epochs"])
    keys = sorted(float(k) for k in table)
    lookup = {float(k): v for k, v in table.items()}
    for k in keys:
        if ratio <= k * (1 + 1e-6):
            return int(lookup[k])
    return int(lookup[keys[-1]])


def plan_batches(recipe: dict, n_train: int, world: int) -> dict:
    """Global batch, per-process micro batch and accumulation steps for a subset of ``n_train`` samples.

    The global batch is the recipe's, capped at the subset size (a 100-sample subset with batch 512 takes
    one full-subset step per epoch). Each process forwards at most ``micro_batch_size`` samples at once and
    accumulates gradients over ``accum_steps`` micro batches, so the optimiser always sees the same global
    batch whatever the number of processes.
    """
    global_batch = max(1, min(int(recipe["batch_size"]), n_train))
    per_rank = math.ceil(global_batch / world)
    micro = max(1, min(int(recipe["micro_batch_size"]), per_rank))
    return {"global_batch": global_batch, "micro_batch": micro, "accum_steps": math.ceil(per_rank / micro),
            "steps_per_epoch": len(step_bounds(n_train, global_batch, world))}


def step_bounds(n: int, global_batch: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) of each optimiser step over an epoch of ``n`` samples: every sample exactly once.

    The last step keeps the remainder; a remainder smaller than the number of processes is merged into the
    step before it (so every process has at least one sample in every step).
    """
    bounds = [(s, min(s + global_batch, n)) for s in range(0, n, global_batch)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < world:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds
