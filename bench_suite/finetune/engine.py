"""The finetuning engine shared by classification and segmentation.

Data: every process reads its round-robin share of the train shards, keeps the selected ids and the
processes exchange what they found, so each holds the whole (small) selected subset in memory, decoded
once. Each epoch draws one permutation from (seed, epoch) - the same on every process - cuts it into
optimiser steps of the global batch, and gives each process a contiguous part of every step: every
selected sample is seen exactly once per epoch, by exactly one process, and the data order does not depend
on the number of processes. The loader is deliberately NOT passed through ``accelerate.prepare`` (that
would split the data a second time and lose half of it, measured).

Gradients: each process sums per-sample losses over its micro batches (``no_sync`` until the last) and
divides by the step's GLOBAL sample count (times the world size, which DDP's averaging divides out), so
the update equals one process taking the whole step - 1 and N processes agree within float reduction order
(models without batch-norm; batch-norm statistics are per process).

Augmentation parameters are drawn per sample from (seed, epoch, id), so they too do not depend on which
process handles a sample. Checkpoints hold the trainable parameters, buffers, optimiser state and history;
a run resumes from the last one after checking it was made with the same inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_suite import atomic
from bench_suite.data import shards as wshards
from bench_suite.data.sources import decode_image
from bench_suite.runtime import Runtime
from bench_suite.errors import BadInputError, CorruptDataError, MissingDataError
from bench_suite.finetune.recipes import plan_batches, step_bounds

log = logging.getLogger(__name__)

DECODED_BUDGET = int(os.environ.get("BENCH_SUITE_DECODED_BUDGET_MB", "2048")) << 20  # decode all at once below this
TENSOR_BUDGET = int(os.environ.get("BENCH_SUITE_TENSOR_BUDGET_MB", "1024")) << 20  # cache preprocessed tensors below


# --------------------------------------------------------------------------- processes
_GLOO_GROUP = None


@dataclass
class RunContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def dist(self) -> Runtime:
        return Runtime(self.rank, self.world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather_object(self, obj) -> list:
        """Every process's ``obj``; over a CPU (gloo) group, so large payloads never go through GPU memory."""
        if self.world == 1:
            return [obj]
        import torch.distributed as tdist

        group = None
        if tdist.get_backend() != "gloo":
            global _GLOO_GROUP
            if _GLOO_GROUP is None:
                _GLOO_GROUP = tdist.new_group(backend="gloo")
            group = _GLOO_GROUP
        out = [None] * self.world
        tdist.all_gather_object(out, obj, group=group)
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes; reduced on the run's device (NCCL only takes GPU tensors), returned on the CPU."""
        if self.world == 1:
            return t
        on_device = t.to(self.device)
        self.dist.all_reduce(on_device)
        return on_device.cpu()


def make_context(accelerator=None, distributed: bool = True) -> RunContext:
    """Rank/world/device of this run. ``distributed=False``: a one-process run even inside a process group
    (the tables give each process its own cells)."""
    if accelerator is None and distributed:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator is None:
        return RunContext(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not distributed:
        return RunContext(0, 1, accelerator.device)
    return RunContext(accelerator.process_index, accelerator.num_processes, accelerator.device)


# --------------------------------------------------------------------------- data
@dataclass
class Samples:
    """Samples held in memory, sorted by global id: decoded uint8 arrays, or encoded bytes when large."""

    ids: np.ndarray
    labels: np.ndarray
    images: list
    masks: list | None
    encoded: bool

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> np.ndarray:
        return decode_image(self.images[i]) if self.encoded else self.images[i]

    def mask(self, i: int) -> np.ndarray:
        return decode_image(self.masks[i]) if self.encoded else self.masks[i]


def _read_raw(shard_dir: Path, names: list[str], keep: set | None) -> dict[int, dict]:
    """Raw (still encoded) members of the named shards, by global id; only ``keep`` ids when given."""
    out: dict[int, dict] = {}
    for name in names:
        try:
            with tarfile.open(shard_dir / name) as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    gid = int(key)
                    if keep is not None and gid not in keep:
                        continue
                    out.setdefault(gid, {})[ext] = tf.extractfile(member).read()
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise CorruptDataError(f"reading shard {shard_dir / name} failed: {exc}") from exc
    return out


def check_ids_in_manifest(manifest: dict, ids: np.ndarray, shard_dir) -> None:
    """Fail fast on ids that no shard can hold (outside every shard's [first_id, last_id])."""
    ranges = np.array([(s["first_id"], s["last_id"]) for s in manifest["shards"] if s["count"]], np.int64)
    if len(ranges) == 0:
        raise BadInputError(f"{shard_dir} holds no samples")
    inside = np.zeros(len(ids), bool)
    for lo, hi in ranges:
        inside |= (ids >= lo) & (ids <= hi)
    if not inside.all():
        bad = ids[~inside]
        raise BadInputError(f"{len(bad)} selected id(s) are not in the dataset of {shard_dir} "
                            f"(e.g. {bad[:5].tolist()}); was the selection made on another pool?")


def load_samples(shard_dir, ctx: RunContext, *, ids: np.ndarray | None, share: bool, need_masks: bool) -> Samples:
    """Read samples into memory.

    ``ids`` given (training): every process ends up with all of them (each reads its round-robin shards,
    then the processes exchange). ``ids`` None and ``share`` (evaluation): each process keeps only the
    samples of its own round-robin shards.
    """
    shard_dir = Path(shard_dir)
    manifest = wshards.load_manifest(shard_dir)
    names = wshards.rank_shards(manifest, ctx.rank, ctx.world) if (share or ids is not None) else \
        [s["name"] for s in manifest["shards"]]
    keep = None if ids is None else set(int(i) for i in ids)
    raw = _read_raw(shard_dir, names, keep)
    if ids is not None and ctx.world > 1:
        merged: dict[int, dict] = {}
        for part in ctx.all_gather_object(raw):
            merged.update(part)
        raw = merged
    if ids is not None:
        missing = sorted(keep - set(raw))
        if missing:
            raise BadInputError(f"{len(missing)} selected id(s) are not in the dataset of {shard_dir} "
                                f"(e.g. {missing[:5]}); was the selection made on another pool?")
    order = sorted(raw)
    labels, images, masks = [], [], []
    for gid in order:
        rec = raw[gid]
        blob = rec.get("png", rec.get("jpg"))
        if blob is None or "cls" not in rec:
            raise CorruptDataError(f"sample {gid} in {shard_dir} lacks an image or a label")
        if need_masks and "seg.png" not in rec:
            raise BadInputError(f"{shard_dir} has no segmentation masks (sample {gid}): not a segmentation "
                                "dataset, use --task cls")
        labels.append(int(rec["cls"]))
        images.append(blob)
        if need_masks:
            masks.append(rec["seg.png"])
    encoded = True
    if images:
        probe = decode_image(images[0]).nbytes * (2 if need_masks else 1)
        if probe * len(images) <= DECODED_BUDGET:
            images = [decode_image(b) for b in images]
            masks = [decode_image(b) for b in masks] if need_masks else None
            encoded = False
    return Samples(np.asarray(order, np.int64), np.asarray(labels, np.int64), images,
                   masks if need_masks else None, encoded)


# --------------------------------------------------------------------------- augmentation
def crop_flip_params(ids: np.ndarray, seed: int, epoch: int, crop_scale, hflip: bool) -> np.ndarray | None:
    """Per-sample (sx, sy, tx, ty) of an affine crop in [-1, 1] coordinates (sx < 0: flipped); None if no aug.

    Drawn from (seed, epoch, id): independent of the process and the batch a sample lands in.
    """
    if crop_scale is None and not hflip:
        return None
    out = np.zeros((len(ids), 4), np.float32)
    for k, gid in enumerate(ids.tolist()):
        rng = np.random.default_rng([seed, epoch, gid, 7919])
        w = h = 1.0
        if crop_scale is not None:
            for _ in range(10):  # torchvision's RandomResizedCrop rule (area scale, log-uniform aspect)
                area = rng.uniform(crop_scale[0], crop_scale[1])
                ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
                if cw <= 1 and ch <= 1:
                    w, h = cw, ch
                    break
        cx = rng.uniform(w / 2, 1 - w / 2) if w < 1 else 0.5
        cy = rng.uniform(h / 2, 1 - h / 2) if h < 1 else 0.5
        flip = hflip and rng.random() < 0.5
        out[k] = (-w if flip else w, h, 2 * cx - 1, 2 * cy - 1)
    return out


def apply_crop_flip(x: torch.Tensor, params: np.ndarray, mask: torch.Tensor | None = None):
    """Resample images (bilinear) and masks (nearest) through the per-sample crop/flip."""
    p = torch.as_tensor(params, device=x.device, dtype=torch.float32)
    theta = torch.zeros(len(p), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mask is None:
        return x, None
    if tuple(mask.shape[-2:]) != tuple(x.shape[-2:]):  # labels kept at their own resolution
        grid = F.affine_grid(theta, [len(p), 1, *mask.shape[-2:]], align_corners=False)
    m = F.grid_sample(mask[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False)
    return x, m[:, 0].round().long()


# --------------------------------------------------------------------------- model helpers
def find_blocks(module: nn.Module) -> tuple[str, list[nn.Module]]:
    """The backbone's block sequence (timm ViT ``blocks``; EfficientNet ``blocks`` stages flattened)."""
    for name, sub in module.named_modules():
        if name.split(".")[-1] == "blocks" and isinstance(sub, (nn.Sequential, nn.ModuleList)):
            blocks = []
            for child in sub:
                if isinstance(child, (nn.Sequential, nn.ModuleList)) and not hasattr(child, "attn"):
                    blocks.extend(list(child))
                else:
                    blocks.append(child)
            return name, blocks
    raise BadInputError(f"{type(module).__name__}: no `blocks` sequence found; use trainable_blocks: all")


def set_trainable(backbone: nn.Module, trainable_blocks) -> dict:
    """Freeze all but the last K blocks and everything registered after them (final norm, head)."""
    params = list(backbone.named_parameters())
    if trainable_blocks == "all":
        for _, p in params:
            p.requires_grad_(True)
        return {"trainable_blocks": "all", "total_blocks": None}
    name, blocks = find_blocks(backbone)
    k = int(trainable_blocks)
    if k > len(blocks):
        raise BadInputError(f"trainable_blocks={k} but the backbone has {len(blocks)} blocks")
    train_ids = {id(p) for b in blocks[len(blocks) - k:] for p in b.parameters()}
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    last_block_pos = max((i for i, (_, p) in enumerate(params) if id(p) in block_ids), default=-1)
    for i, (_, p) in enumerate(params):
        p.requires_grad_(id(p) in train_ids or (i > last_block_pos and id(p) not in block_ids))
    return {"trainable_blocks": k, "total_blocks": len(blocks)}


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth increasing linearly over the blocks (0 .. rate), as timm's drop_path_rate does."""
    if rate <= 0:
        return
    from timm.layers import DropPath

    _, blocks = find_blocks(backbone)
    n = len(blocks)
    for i, block in enumerate(blocks):
        r = rate * i / max(1, n - 1)
        for attr in ("drop_path", "drop_path1", "drop_path2"):
            if hasattr(block, attr) and isinstance(getattr(block, attr), (nn.Identity, DropPath)):
                setattr(block, attr, DropPath(r) if r > 0 else nn.Identity())
                if hasattr(getattr(block, attr), "drop_prob"):
                    getattr(block, attr).drop_prob = r


class FrozenPrefix:
    """The frozen first blocks of a timm ViT, run once per sample and cached as tokens.

    With ``trainable_blocks: K`` and no train-time augmentation, the input of block N-K never changes
    during training, so it is computed once (train subset and test split) and the model then runs only
    its last K blocks, final norm and head: the same numbers (checked on a batch before use) for a
    fraction of the compute.
    """

    def __init__(self, vit: nn.Module, start: int):
        self.vit, self.start = vit, start
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))

    def _modules(self):
        v = self.vit
        return [v.patch_embed, getattr(v, "pos_drop", None), v.patch_drop, v.norm_pre, *v.blocks[:self.start]]

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        mods = [m for m in self._modules() if m is not None]
        modes = [m.training for m in mods]
        for m in mods:
            m.eval()
        try:
            v = self.vit
            t = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
            for block in v.blocks[:self.start]:
                t = block(t)
        finally:
            for m, mode in zip(mods, modes):
                m.train(mode)
        return t

    def rest(self, t: torch.Tensor) -> torch.Tensor:
        for block in self.vit.blocks[self.start:]:
            t = block(t)
        return self.vit.norm(t)


def frozen_prefix(backbone: nn.Module, trainable_blocks) -> FrozenPrefix | None:
    """A FrozenPrefix when the backbone is a timm ViT whose first blocks are frozen; else None."""
    vit = getattr(backbone, "model", backbone)
    needed = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm")
    if trainable_blocks == "all" or not all(hasattr(vit, a) for a in needed):
        return None
    start = len(vit.blocks) - int(trainable_blocks)
    if start <= 0:
        return None
    frozen = [vit.patch_embed, *vit.blocks[:start]]
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        return None
    if any(getattr(vit, a, None) is not None and getattr(vit, a).requires_grad for a in ("pos_embed", "cls_token")):
        return None
    return FrozenPrefix(vit, start)


def enable_prefix(model: nn.Module, recipe: dict, x: torch.Tensor) -> FrozenPrefix | None:
    """Give ``model`` (with ``.backbone`` and a ``prefix`` attribute that its forward honours for 3-D token
    inputs) a FrozenPrefix, after checking on ``x`` that the token path gives the same outputs."""
    prefix = frozen_prefix(model.backbone, recipe["trainable_blocks"])
    if prefix is None:
        return None
    was = model.training
    model.to(x.device).eval()
    try:
        with torch.no_grad():
            ref = model(x)
            model.prefix = prefix
            got = model(prefix.tokens(x))
    finally:
        model.train(was)
    if not torch.allclose(ref, got, rtol=1e-4, atol=1e-4):
        model.prefix = None
        log.warning("frozen-prefix caching disabled: token path differs from the image path by %.2e",
                    float((ref - got).abs().max()))
        return None
    return prefix


def freeze_frozen_modules(model: nn.Module) -> None:
    """Keep fully frozen submodules in eval mode (batch-norm statistics, dropout, drop-path stay fixed)."""
    for m in model.modules():
        ps = list(m.parameters())
        if ps and not any(p.requires_grad for p in ps):
            m.eval()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token", "dist_token", "cls_emb"):
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


# --------------------------------------------------------------------------- the task interface
class Task:
    """What differs between classification and segmentation. ``model`` maps (B,3,S,S) -> outputs."""

    name = "task"
    metric = "metric"

    def use_prefix(self, model: nn.Module, pool: Samples, device) -> bool:
        """Cache the frozen first blocks' output per sample (when possible); True if it will."""
        return False

    def inputs(self, pool: Samples, idx: np.ndarray, aug: np.ndarray | None, device) -> tuple:
        raise NotImplementedError

    def per_sample_loss(self, out, target) -> torch.Tensor:
        raise NotImplementedError

    def n_correct(self, out, target) -> float:
        return 0.0

    def evaluate(self, model: nn.Module, test: Samples, ctx: RunContext, amp: str, batch: int) -> dict:
        raise NotImplementedError


# --------------------------------------------------------------------------- checkpoints
def fingerprint(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


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


# --------------------------------------------------------------------------- the loop
def _check_epoch_coverage(seen: list, ids: np.ndarray, ctx: RunContext, epoch: int) -> list[int]:
    """Every selected id trained on exactly once this epoch, over all processes; returns per-process counts.

    ``BENCH_SUITE_TRACE_IDS=DIR`` also writes each process's ids (``DIR/rank{r}-epoch{e}.json``) for tests.
    """
    mine = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    trace = os.environ.get("BENCH_SUITE_TRACE_IDS")
    if trace:
        atomic.write_json(Path(trace) / f"rank{ctx.rank}-epoch{epoch + 1}.json", mine.tolist())
    parts = ctx.all_gather_object(mine)
    allseen = np.sort(np.concatenate(parts))
    if len(allseen) != len(ids) or not np.array_equal(allseen, ids):
        raise AssertionError(f"epoch {epoch + 1}: the processes trained on {len(allseen)} samples "
                             f"({len(np.unique(allseen))} distinct) but the subset has {len(ids)}")
    return [int(len(p)) for p in parts]


@dataclass
class TrainResult:
    history: list
    evals: list
    epochs: int
    resumed_from: int | None
    plan: dict
    amp: str
    seconds_train: list
    model: nn.Module


def train(task: Task, model: nn.Module, pool: Samples, test: Samples, recipe: dict, *, epochs: int, seed: int,
          ctx: RunContext, ckpt_path: Path | None, fp: str, resume_from: Path | None = None,
          progress: bool = True, on_eval: Callable | None = None) -> TrainResult:
    device = ctx.device
    model.to(device)
    plan = plan_batches(recipe, len(pool), ctx.world)
    amp = resolve_amp(recipe["amp"], device)
    optimizer = make_optimizer(model, recipe)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    bounds = step_bounds(len(pool), plan["global_batch"], ctx.world)
    total_steps = epochs * len(bounds)
    warmup = recipe["warmup_epochs"] * len(bounds)
    history, evals, start_epoch, resumed_from = [], [], 0, None

    if resume_from is not None:
        blob = load_checkpoint(resume_from, fp)
        missing = model.load_state_dict(blob["model"], strict=False)
        if missing.unexpected_keys:
            raise CorruptDataError(f"checkpoint {resume_from} holds unknown tensors: {missing.unexpected_keys[:3]}")
        optimizer.load_state_dict(blob["optimizer"])
        if scaler is not None and blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
        history, evals, start_epoch = blob["history"], blob["evals"], int(blob["epoch"])
        resumed_from = start_epoch
        log.info("resumed from %s at epoch %d", resume_from, start_epoch)

    net = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    eval_batch = max(1, plan["micro_batch"] * 2)
    seconds_train = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*cols, disable=not (progress and ctx.is_main), transient=False) as bar:
        task_id = bar.add_task(f"{task.name} finetune", total=epochs, completed=start_epoch)
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            torch.manual_seed(seed * 100_003 + epoch * 1_009 + ctx.rank)  # dropout / drop-path
            net.train()
            freeze_frozen_modules(model)
            perm = np.random.default_rng([seed, epoch]).permutation(len(pool))
            stats = torch.zeros(3, dtype=torch.float64)  # loss sum, samples, correct
            seen = []  # ids this process trained on this epoch
            for s, (lo, hi) in enumerate(bounds):
                step = epoch * len(bounds) + s
                lr = lr_at(step, total_steps, warmup, recipe)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                chunk = perm[lo:hi]
                n_step = len(chunk)
                part = np.array_split(chunk, ctx.world)[ctx.rank]
                k = max(1, math.ceil(math.ceil(n_step / ctx.world) / plan["micro_batch"]))
                micro = np.array_split(part, k)
                for j, mb in enumerate(micro):
                    weight = 1.0
                    if len(mb) == 0:  # keep the collective count equal: a zero-weight sample
                        mb, weight = chunk[:1], 0.0
                    sync = j == k - 1 or ctx.world == 1
                    cm = net.no_sync() if (not sync and isinstance(net, nn.parallel.DistributedDataParallel)) \
                        else contextlib.nullcontext()
                    with cm:
                        ids = pool.ids[mb]
                        aug = crop_flip_params(ids, seed, epoch, recipe["crop_scale"], recipe["hflip"])
                        x, target = task.inputs(pool, mb, aug, device)
                        with autocast(amp, device):
                            out = net(x)
                            losses = task.per_sample_loss(out, target).float()
                        loss = losses.sum() * (weight * ctx.world / n_step)
                        if scaler is not None:
                            scaler.scale(loss).backward()
                        else:
                            loss.backward()
                    if weight:
                        seen.append(ids)
                        stats += torch.tensor([float(losses.detach().sum()), len(mb), task.n_correct(out, target)],
                                              dtype=torch.float64)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if recipe["clip_grad"]:
                    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe["clip_grad"])
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            stats = ctx.all_reduce(stats)
            per_process = _check_epoch_coverage(seen, pool.ids, ctx, epoch)
            seconds_train.append(time.perf_counter() - t0)
            row = {"epoch": epoch + 1, "loss": float(stats[0] / max(1, stats[1])), "samples": int(stats[1]),
                   "train_acc": float(stats[2] / max(1, stats[1]) * 100), "lr": lr,
                   "seconds": seconds_train[-1], "per_process": per_process}
            history.append(row)
            last = epoch + 1 == epochs
            every = recipe["eval_every"]
            if last or (every and (epoch + 1) % every == 0):
                te = time.perf_counter()
                model.eval()
                res = task.evaluate(model, test, ctx, amp, eval_batch)
                res.update(epoch=epoch + 1, seconds=time.perf_counter() - te)
                evals.append(res)
                if on_eval:
                    on_eval(res)
                log.debug("epoch %d: %s %.2f", epoch + 1, task.metric, res[task.metric])
            if ckpt_path is not None and (last or (recipe["checkpoint_every"] and
                                                   (epoch + 1) % recipe["checkpoint_every"] == 0)):
                if ctx.is_main:
                    save_checkpoint(ckpt_path, model, optimizer, scaler,
                                    {"epoch": epoch + 1, "history": history, "evals": evals, "fingerprint": fp})
                ctx.dist.barrier()
            desc = f"{task.name} ep {epoch + 1}/{epochs} loss {row['loss']:.3f} train {row['train_acc']:.1f}%"
            if evals and evals[-1]["epoch"] == epoch + 1:
                desc += f" test {task.metric} {evals[-1][task.metric]:.2f}"
            bar.update(task_id, completed=epoch + 1, description=desc)
    return TrainResult(history, evals, epochs, resumed_from, plan, amp, seconds_train, model)
