"""The paper profile's task model of the active-learning baselines: the encoder's backbone, finetuned every round.

The ActiveFT paper (appendix B.3): "for CoreSet, LearnLoss and ALFA-Mix, we use DeiT-Small pretrained with
DINO as the backbone of their models for data selection", and in every round "the model is re-trained on all
the selected samples". With ``task_model: finetune`` (the paper profile) each round here:

1. builds a fresh classifier - a fresh copy of the PRETRAINED backbone (the encoder that made the store's
   features: its registry name and image size from ``store.meta["encoder"]``, its weights from
   ``task_weights`` or the encoder's default location, checked against the store's weights sha256) and a
   fresh linear head - so every round retrains from the pretrained weights on all labels bought so far;
2. finetunes it with the finetuning engine (``bench_suite/finetune/``: recipe resolver, classifier, training
   loop, amp, crop / flip) and the catalogue recipe named by ``task_recipe`` (the paper profile:
   ``al_deit_round``, whose comment in ``bench_suite/finetune/recipes.yaml`` gives the epochs per round and
   why), on the labelled images (``baselines/_al_images.PoolImages``: the store's shard folder);
3. runs the finetuned model over the pool's images: the embedding is the backbone's pooled feature (the
   penultimate layer: CoreSet's space, ALFA-Mix's mixing space), the logits are its linear head's
   (ALFA-Mix's classifier g).

LearnLoss (and TA-VAAL's ranker): the loss prediction module is trained jointly with the backbone, in the
same training loop: its taps are four evenly spaced transformer blocks (after blocks 3, 6, 9 and 12 of
DeiT-S, as LearnLoss taps ResNet's four stages; on a ResNet, those stages), each averaged over its tokens or
positions (the GAP of the original);
the loss is mean CE + weight x the pairwise ranking loss over each batch; after ``stop_grad_frac`` of the
epochs the taps are detached, as in the original. The module's optimiser is the recipe's.

The finetuning engine is another plug-in; plug-ins never import each other, so it is reached through the
core's registry of task-model trainers (``bench_suite.trainers.get("finetune")``), as BiLAF reaches ActiveFT
through the method registry.

The cpu profile keeps ``task_model: head`` (the default): an MLP head on the frozen features
(``baselines/_al_head.py``), seconds per round instead of a finetuning.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines._al_head import LossNet, forked_rng, loss_pred_loss
from baselines._al_images import PoolImages
from bench_suite import trainers
from bench_suite.encoders import get_encoder
from bench_suite.errors import BadInputError, MissingDataError
from bench_suite.options import opt

TRAINER = "finetune"  # the finetuning engine's entry in bench_suite.trainers


@dataclass
class TaskModelOptions:
    """Which task model an AL method retrains every round (a mixin: the FIRST base of each such method's Options)."""

    # the paper's transplant (B.3) finetunes the backbone: "head" is the departure the reports list
    task_model: str = opt("head", choices=("head", "finetune"), original="finetune",
                          doc="head: MLP on the frozen features (cpu profile); finetune: the backbone, finetuned")
    task_recipe: str = opt("al_deit_round", doc="finetune: the catalogue recipe of each round's finetuning")
    task_recipe_fields: dict = opt(default_factory=dict,
                                   doc="finetune: fields over the catalogue recipe, as a profile's recipes: entry")
    task_epochs: int = opt(0, minimum=0, doc="finetune: epochs per round (0 = the recipe's)")
    task_weights: str | None = opt(None, role="runtime",
                                   doc="finetune: the encoder's weights file (default: found by the store's sha256)")
    task_batch: int = opt(256, minimum=1, role="runtime", doc="finetune: images per forward pass over the pool")


def tap_positions(n_blocks: int, n_taps: int = 4) -> list[int]:
    """Evenly spaced block indices ending at the last block (12 blocks -> 2, 5, 8, 11)."""
    return sorted({max(0, int(round((k + 1) * n_blocks / n_taps)) - 1) for k in range(n_taps)})


def _pool_tap(t: torch.Tensor) -> torch.Tensor:
    """A block's output as a vector per sample: mean over tokens (B, N, d) or over space (B, C, H, W)."""
    if t.ndim == 3:
        return t.mean(dim=1)
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    return t.flatten(1)


class JointModel(nn.Module):
    """The classifier and LearnLoss's loss prediction module on taps of its backbone's blocks.

    ``forward(x) -> (logits, predicted loss)``. The training loop calls ``train()`` once at the start of every
    epoch; that counts the epochs, and after ``stop_epoch`` (``epoch > stop_epoch``, as the original's
    ``epoch > epoch_loss``) the taps are detached, so the module no longer shapes the backbone.
    """

    def __init__(self, clf: nn.Module, tap_modules: list, tap_dims: list[int], stop_epoch: int):
        super().__init__()
        self.clf = clf
        self.lossnet = LossNet(tap_dims)
        self.stop_epoch = int(stop_epoch)
        self.epoch = -1
        self._taps: list = []
        for m in tap_modules:
            m.register_forward_hook(lambda _m, _i, out: self._taps.append(out))

    def train(self, mode: bool = True):
        if mode:
            self.epoch += 1
        return super().train(mode)

    def forward(self, x):
        self._taps.clear()
        logits = self.clf(x)
        feats = [_pool_tap(t) for t in self._taps]
        self._taps.clear()
        if self.epoch > self.stop_epoch:
            feats = [f.detach() for f in feats]
        return logits, self.lossnet(feats)


class JointTask:
    """The training loop's task for ``JointModel``: the engine's classification inputs, and LearnLoss's loss.

    Per sample: CE_i + weight x L_pair, where L_pair is the pairwise ranking loss of the batch; the loop sums
    them and divides by the step's sample count, so a step minimises mean CE + weight x L_pair (as the
    original's ``loss = m_backbone_loss + WEIGHT * m_module_loss``).
    """

    name = "cls"
    metric = "top1"

    def __init__(self, base, *, margin: float, weight: float, ranking: str):
        self.base, self.margin, self.weight, self.ranking = base, float(margin), float(weight), ranking
        self.last_module_loss = float("nan")

    def __getattr__(self, name):
        # everything else of the engine's Task interface (inputs, and whatever hooks the loop calls) is the
        # classification task's
        return getattr(self.base, name)

    def use_prefix(self, model, pool, device) -> bool:
        return False

    def per_sample_loss(self, out, target):
        logits, pred = out
        ce = F.cross_entropy(logits.float(), target, reduction="none",
                             label_smoothing=self.base.recipe["label_smoothing"])
        m = loss_pred_loss(pred.float(), ce, margin=self.margin, kind=self.ranking)
        self.last_module_loss = float(m.detach())
        return ce + self.weight * m

    def n_correct(self, out, target) -> float:
        return float((out[0].argmax(1) == target).sum())

    def evaluate(self, model, test, ctx, amp, batch) -> dict:
        return {"top1": float("nan"), "per_class": {}, "n_test": 0}  # no test split inside a selection


class FinetunedTaskModel:
    """One round's finetuned model: the outputs the methods read over rows of the pool (as ``HeadTaskModel``)."""

    kind = "finetune"

    def __init__(self, ctx: "BackboneContext", clf: nn.Module, joint: JointModel | None):
        self.ctx, self.clf, self.joint = ctx, clf, joint
        self.fc = clf.head  # ALFA-Mix's classifier g over the embedding

    @torch.no_grad()
    def outputs(self, rows=None, *, what=("embed", "logits"), lossnet: bool = False) -> dict:
        """Embeddings (the backbone's pooled feature) / logits / predicted losses of ``rows`` (default: all),
        numpy float32 arrays in ``rows`` order."""
        c = self.ctx
        rows = np.arange(len(c.store)) if rows is None else np.asarray(rows, dtype=np.int64)
        keys = list(what) + (["pred_loss"] if lossnet else [])
        out: dict = {}
        self.clf.eval()
        for pos, images in c.images.batches(rows, c.batch):
            x = c.trainer.preprocess(c.encoder, images).to(c.device)
            if self.joint is not None:
                self.joint.eval()
                self.joint._taps.clear()
            emb = self.clf.backbone(x)
            logits = self.clf.head(emb)
            got = {"embed": emb, "logits": logits}
            if lossnet:
                got["pred_loss"] = self.joint.lossnet([_pool_tap(t) for t in self.joint._taps])
            if self.joint is not None:
                self.joint._taps.clear()
            for k in keys:
                v = got[k].float().cpu().numpy()
                if k not in out:
                    out[k] = np.zeros((len(rows),) + v.shape[1:], np.float32)
                out[k][pos] = v
        return {k: out.get(k, np.zeros((0,), np.float32)) for k in keys}


def round_recipe(method: str, o: TaskModelOptions) -> dict:
    """The fully resolved recipe of each round's finetuning: the catalogue's ``task_recipe`` (through the
    finetuning engine's resolver), with ``task_recipe_fields`` over it field by field, then ``task_epochs``
    when set. (A profile's ``recipes:`` entry does not reach a selector by itself: the selector sees only its
    options, so a profile scales the round recipe through ``task_recipe_fields`` / ``task_epochs``.)"""
    trainer = trainers.get(TRAINER)
    fields = {**dict(o.task_recipe_fields or {}), **({"epochs": int(o.task_epochs)} if o.task_epochs else {})}
    recipe = trainer.recipe(o.task_recipe, fields or None)
    if recipe["kind"] != "finetune":
        raise BadInputError(f"{method}: task_recipe {o.task_recipe!r} is a {recipe['kind']} recipe; the task model "
                            "needs a classification finetuning recipe (kind: finetune)")
    return recipe


class BackboneContext:
    """Per selection: the trainer (the finetuning engine), the resolved recipe, the pretrained encoder and the
    pool's images; ``train(state)`` runs one round's finetuning."""

    def __init__(self, selector, store, device):
        o = selector.options
        self.name, self.store, self.device = selector.name, store, torch.device(device)
        self.trainer = trainers.get(TRAINER)
        self.recipe_name = o.task_recipe
        self.recipe = round_recipe(selector.name, o)
        self.encoder = self._encoder(store, o.task_weights, self.recipe.get("image_size"))
        self.images = PoolImages(store, selector.name)
        self.batch = int(o.task_batch)

    def _encoder(self, store, weights, recipe_size):
        """The pretrained encoder the store's features came from: its registry name and image size (the recipe's
        image size wins, as in the tables' finetuning) from ``meta["encoder"]``; its weights from ``task_weights``,
        else the encoder's default location, else the file named in the store's meta (relative to the working
        folder, as a profile's ``encoder.weights``) - the first whose sha256 is the store's."""
        meta = dict((store.meta or {}).get("encoder") or {})
        if not meta.get("name"):
            raise BadInputError(f"{self.name}: task_model finetune needs the store's encoder "
                                "(meta['encoder']['name']); use a store made by `python -m bench_suite.extract`")
        size = recipe_size or meta.get("image_size")
        want = (meta.get("weights") or {}).get("sha256")
        named = (meta.get("weights") or {}).get("file")
        candidates = [weights] if weights else [None] + ([named] if named and Path(named).is_file() else [])
        problem = None
        for cand in candidates:
            try:
                enc = get_encoder(meta["name"], image_size=size, weights=cand, device=str(self.device))
            except MissingDataError as exc:
                problem = exc
                continue
            got = ((getattr(enc, "meta", None) or {}).get("weights") or {}).get("sha256")
            if not (want and got and want != got):
                return enc
            problem = BadInputError(
                f"{self.name}: the task model's weights ({got[:12]}...) are not the weights the store's features came "
                f"from ({want[:12]}...); set task_weights to that file")
        raise problem

    def describe(self) -> dict:
        return {"task_model": "finetune", "task_recipe": self.recipe_name, "recipe": self.recipe,
                "encoder": (getattr(self.encoder, "meta", None) or {}).get("name"),
                "image_size": getattr(self.encoder, "image_size", None),
                "pool_images_cached": self.images.cache is not None}

    def _taps(self, clf) -> tuple[list, list[int]]:
        """The blocks LearnLoss taps and their (pooled) widths, from one forward pass: a ViT's evenly spaced
        blocks, or a ResNet's four stages (``layer1``-``layer4``, the original's taps; Table 4's ResNet-50)."""
        body = getattr(clf.backbone, "model", clf.backbone)
        blocks = list(getattr(body, "blocks", []) or [])
        stages = [getattr(body, f"layer{i}", None) for i in range(1, 5)]
        if blocks:
            mods = [blocks[i] for i in tap_positions(len(blocks))]
        elif all(s is not None for s in stages):
            mods = stages
        else:
            raise BadInputError(f"{self.name}: the backbone has neither transformer `blocks` nor ResNet stages "
                                "(layer1-4) to tap for the loss prediction module")
        seen: list = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in mods]
        try:
            was = clf.training
            clf.eval()
            with torch.no_grad():
                x = self.trainer.preprocess(self.encoder, self.images.get(np.arange(1))).to(self.device)
                clf.to(self.device)(x)
            clf.train(was)
        finally:
            for h in hooks:
                h.remove()
        return mods, [int(_pool_tap(t).shape[1]) for t in seen]

    def train(self, state, ranker=None, ranking: str = "margin") -> FinetunedTaskModel:
        """Finetune a fresh classifier from the pretrained backbone on every label bought so far (and, with
        ``ranker``, LearnLoss's module jointly); records the round's timing and training statistics."""
        t0 = time.perf_counter()
        images = self.images.get(state.labelled_rows)
        ids = np.asarray(state.store.ids, dtype=np.int64)[state.labelled_rows]
        recipe = self.recipe
        with forked_rng(state.seed, self.device):
            clf, info = self.trainer.build(self.encoder, recipe, state.num_classes, seed=state.seed)
            model, wrapper, joint, tasks = clf, None, None, []
            if ranker is not None:
                mods, dims = self._taps(clf)
                stop = int(round(float(ranker.stop_grad_frac) * int(recipe["epochs"])))
                joint = model = JointModel(clf, mods, dims, stop)

                def wrapper(base):
                    tasks.append(JointTask(base, margin=float(ranker.margin), weight=float(ranker.loss_weight),
                                           ranking=ranking))
                    return tasks[-1]
            stats = self.trainer.fit(model, self.encoder, ids, state.labels, images, recipe, seed=state.seed,
                                     device=self.device, num_classes=state.num_classes, task_wrapper=wrapper)
        model.eval()
        state.info["train_seconds"] = round(time.perf_counter() - t0, 4)
        state.info.update(task_model="finetune", train_epochs=int(stats["epochs"]),
                          train_steps=int(stats["epochs"]) * int(stats["steps_per_epoch"]),
                          train_acc=round(float(stats["train_acc"]), 4) if stats["train_acc"] is not None else None,
                          final_loss=round(float(stats["final_loss"]), 5) if stats["final_loss"] is not None else None,
                          trainable_params=int(info.get("trainable_params", 0)))
        if tasks and math.isfinite(tasks[-1].last_module_loss):
            state.info["final_module_loss"] = round(tasks[-1].last_module_loss, 5)
        state.models["model"] = clf
        if joint is not None:
            state.models["ranker"] = joint.lossnet
        return FinetunedTaskModel(self, clf, joint)
