"""Classification finetuning: the encoder's backbone + a fresh linear head, cross-entropy (label smoothing).

``ClsTask`` feeds the training loop the encoder's own preprocessing of each image (cached as tensors when
the subset is small), or - when the first blocks are frozen and nothing is augmented - their cached
output tokens; it evaluates top-1 and per-class accuracy on the test split, summed over processes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_suite.finetune.augment import apply_crop_flip
from bench_suite.finetune.backbone import FrozenPrefix, enable_prefix, set_drop_path, set_trainable
from bench_suite.finetune.optim import autocast
from bench_suite.finetune.samples import TENSOR_BUDGET, Samples
from bench_suite.finetune.task import Task
from bench_suite.runtime import Runtime


class Classifier(nn.Module):
    """Backbone + linear head. Takes images (B,3,S,S), or - with a frozen prefix - its cached tokens (B,N,d)."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.prefix: FrozenPrefix | None = None

    def forward(self, x):
        if x.ndim == 3:  # tokens after the frozen prefix
            return self.head(pool_tokens(self.prefix.rest(x), getattr(self.backbone, "pooling", "cls"),
                                         self.prefix.num_prefix_tokens))
        return self.head(self.backbone(x))


def pool_tokens(t: torch.Tensor, pooling: str, num_prefix: int) -> torch.Tensor:
    """The encoder's pooling of final-norm ViT tokens (as bench_suite.encoders.base.pool_features)."""
    cls, patches = t[:, 0], t[:, num_prefix:]
    if pooling == "cls":
        return cls
    if pooling == "gap":
        return patches.mean(dim=1)
    return torch.cat([cls, patches.mean(dim=1)], dim=1)


def build_classifier(enc, recipe: dict, num_classes: int) -> tuple[Classifier, dict]:
    backbone = enc.backbone_for_finetune()
    set_drop_path(backbone, recipe["drop_path"])
    info = set_trainable(backbone, recipe["trainable_blocks"])
    model = Classifier(backbone, enc.dim, num_classes)
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["total_params"] = sum(p.numel() for p in model.parameters())
    return model, info


def preprocess(enc, images: list[np.ndarray]) -> torch.Tensor:
    """The encoder's own preprocessing; images of different sizes are preprocessed one by one."""
    if len({im.shape for im in images}) == 1:
        return enc.preprocess(np.stack(images))
    return torch.cat([enc.preprocess(im[None]) for im in images])


class ClsTask(Task):
    name = "cls"
    metric = "top1"

    def __init__(self, enc, recipe: dict, num_classes: int, classes: list[str]):
        self.enc, self.recipe, self.num_classes, self.classes = enc, recipe, num_classes, classes
        self._images_cache: dict[int, torch.Tensor | None] = {}
        self._tokens_cache: dict[int, torch.Tensor | None] = {}
        self.prefix: FrozenPrefix | None = None
        self.device = torch.device("cpu")

    # ---- inputs: preprocessed images (cached when small) or frozen-prefix tokens (cached)
    def _images(self, pool: Samples, idx: np.ndarray) -> torch.Tensor:
        key = id(pool)
        if key not in self._images_cache:
            cached = None
            if not pool.encoded:
                probe = preprocess(self.enc, [pool.image(0)])
                if probe[0].numel() * 4 * len(pool) <= TENSOR_BUDGET:  # preprocess once, keep in memory
                    cached = torch.cat([preprocess(self.enc, [pool.image(i) for i in range(s, min(s + 256, len(pool)))])
                                        for s in range(0, len(pool), 256)]).float()
            self._images_cache[key] = cached
        cached = self._images_cache[key]
        if cached is not None:
            return cached[torch.as_tensor(idx, dtype=torch.long)]
        return preprocess(self.enc, [pool.image(int(i)) for i in idx]).float()

    def _tokens(self, pool: Samples, idx: np.ndarray) -> torch.Tensor | None:
        if self.prefix is None:
            return None
        key = id(pool)
        if key not in self._tokens_cache:
            probe = self.prefix.tokens(self._images(pool, np.arange(1)).to(self.device))
            cached = None
            if probe.numel() * 4 * len(pool) <= TENSOR_BUDGET:
                cached = torch.cat([self.prefix.tokens(self._images(pool, np.arange(s, min(s + 64, len(pool))))
                                                       .to(self.device)) for s in range(0, len(pool), 64)])
                self._images_cache.pop(key, None)  # the tokens replace the images
            self._tokens_cache[key] = cached
        cached = self._tokens_cache[key]
        return None if cached is None else cached[torch.as_tensor(idx, dtype=torch.long, device=cached.device)]

    def use_prefix(self, model: Classifier, pool: Samples, device) -> bool:
        """Run the frozen first blocks once per sample from now on, if the model and recipe allow it (with
        train-time augmentation only the test split uses the cached tokens)."""
        self.device = device
        x = self._images(pool, np.arange(min(2, len(pool)))).to(device)
        self.prefix = enable_prefix(model, self.recipe, x)
        return self.prefix is not None

    def inputs(self, pool, idx, aug, device):
        y = torch.as_tensor(pool.labels[idx], dtype=torch.long, device=device)
        if int(y.max()) >= self.num_classes or int(y.min()) < 0:
            raise ValueError(f"label out of range 0..{self.num_classes - 1}")
        if aug is None:
            t = self._tokens(pool, idx)
            if t is not None:
                return t.to(device), y
        x = self._images(pool, idx).to(device)
        if aug is not None:
            x, _ = apply_crop_flip(x, aug)
        return x, y

    # ---- loss and evaluation
    def per_sample_loss(self, out, target):
        return F.cross_entropy(out.float(), target, reduction="none", label_smoothing=self.recipe["label_smoothing"])

    def n_correct(self, out, target):
        return float((out.argmax(1) == target).sum())

    @torch.no_grad()
    def evaluate(self, model, test: Samples, ctx: Runtime, amp: str, batch: int) -> dict:
        counts = torch.zeros(2, self.num_classes, dtype=torch.float64)  # correct, total per class
        for s in range(0, len(test), batch):
            idx = np.arange(s, min(s + batch, len(test)))
            x, y = self.inputs(test, idx, None, ctx.device)
            with autocast(amp, ctx.device):
                pred = model(x).argmax(1)
            y, pred = y.cpu(), pred.cpu()
            counts[1] += torch.bincount(y, minlength=self.num_classes).double()
            counts[0] += torch.bincount(y[pred == y], minlength=self.num_classes).double()
        counts = ctx.all_reduce(counts)
        correct, total = counts[0].numpy(), counts[1].numpy()
        per_class = {c: (float(correct[i] / total[i] * 100) if total[i] else None) for i, c in enumerate(self.classes)}
        return {"top1": float(correct.sum() / max(1.0, total.sum()) * 100), "per_class": per_class,
                "n_test": int(total.sum())}
