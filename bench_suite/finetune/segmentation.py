"""Segmentation finetuning: Segmenter on the encoder's ViT, per-pixel cross-entropy, mIoU on the test split.

Two data pipelines, chosen by the recipe's ``pipeline``:

- ``mmseg`` (the paper's, Table 2 of the paper profile): mmsegmentation's ADE20K protocol of the Segmenter
  configs, implemented in ``seg_pipeline``: random resize (ratio 0.5-2.0 of 2048 x 512, aspect ratio kept),
  a random ``image_size`` crop with cat_max_ratio 0.75, horizontal flip, photometric distortion, padding to
  the crop size; evaluation resizes each image to fit 2048 x 512 and slides ``image_size`` windows with
  ``slide_stride``. Each sample's draws come from (seed, epoch, sample id), so they do not depend on the
  process or batch, and they are the draws mmseg makes from the same numpy seed
  (tests/test_seg_pipeline_mmseg.py compares the outputs).
- ``resize`` (the cpu profile's cheap setting): every image squashed to image_size x image_size (bilinear),
  labels resized (nearest) to the same square, no augmentation, whole-image evaluation. Without augmentation
  a frozen backbone prefix can be computed once per image (``use_prefix``).

In both, the logits are upsampled (bilinear) to the labels for the loss, and for evaluation to each label
map's original size, so mIoU is measured on the dataset's own label maps. The loss follows mmsegmentation's
default: per-pixel cross-entropy with the ignore index skipped, averaged over all pixels of a sample;
samples are averaged over the global batch.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench_suite.errors import BadInputError
from bench_suite.finetune import seg_pipeline as sp
from bench_suite.finetune.augment import apply_crop_flip
from bench_suite.finetune.backbone import enable_prefix, set_drop_path, set_trainable
from bench_suite.finetune.optim import autocast
from bench_suite.finetune.samples import TENSOR_BUDGET, Samples
from bench_suite.finetune.segmenter import Segmenter, confusion_matrix, iou_from_confusion
from bench_suite.finetune.task import Task
from bench_suite.runtime import Runtime


# Frozen-prefix tokens of the last few input sets of this process, by content (inputs, frozen weights, device):
# a table's segmentation cells evaluate the same test split through the same frozen backbone, and computing
# those tokens was about 4 s of each of Table 2's 24 cells on 2 cores (cpu profile). Least recently used first.
_TOKENS: dict[str, torch.Tensor] = {}
TOKENS_KEEP = 2


def _resize(img: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST if nearest else Image.BILINEAR))


def seg_backbone(enc) -> torch.nn.Module:
    """A fresh trainable copy of the encoder's timm model (its patch tokens feed the decoder)."""
    backbone = enc.backbone_for_finetune()
    model = getattr(backbone, "model", backbone)  # the registry's PooledBackbone wraps the timm model
    model.requires_grad_(True).train()
    return model


def build_segmenter(enc, recipe: dict, num_classes: int) -> tuple[Segmenter, dict]:
    backbone = seg_backbone(enc)
    set_drop_path(backbone, recipe["drop_path"])
    info = set_trainable(backbone, recipe["trainable_blocks"])
    model = Segmenter(backbone, enc.dim, num_classes, recipe["decoder"], recipe["decoder_layers"],
                      recipe["decoder_dropout"])
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["total_params"] = sum(p.numel() for p in model.parameters())
    return model, info


class SegTask(Task):
    name = "seg"
    metric = "miou"

    def __init__(self, enc, recipe: dict, num_classes: int, classes: list[str]):
        self.enc, self.recipe, self.num_classes, self.classes = enc, recipe, num_classes, classes
        self.ignore = recipe["ignore_index"]
        probe = enc.preprocess(np.zeros((1, 32, 32), np.uint8))
        self.size = int(probe.shape[-1])
        self._cache: dict[int, tuple] = {}
        self._tokens_cache: dict[int, torch.Tensor | None] = {}
        self.prefix = None
        self.device = torch.device("cpu")
        self.mmseg = recipe["pipeline"] == "mmseg"
        self.pipe = sp.SegPipeline.of_recipe({**recipe, "image_size": self.size}) if self.mmseg else None
        self.seed_epoch = (0, 0)
        if self.mmseg:
            mean, std = getattr(enc, "mean", None), getattr(enc, "std", None)
            if mean is None or std is None:
                raise BadInputError(f"pipeline: mmseg normalises with the encoder's mean / std; encoder "
                                    f"{getattr(enc, 'name', enc)!r} has none (use pipeline: resize)")
            self.mean, self.std = torch.as_tensor(mean).reshape(-1).float(), torch.as_tensor(std).reshape(-1).float()

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.seed_epoch = (int(seed), int(epoch))

    def _mask(self, pool: Samples, i: int) -> np.ndarray:
        m = pool.mask(i)
        if m.ndim == 3:
            raise ValueError("segmentation masks must be single-channel class-index images")
        if self.recipe["reduce_zero_label"]:  # mmseg's rule: 0 -> ignore, c -> c - 1
            m = m.astype(np.int16) - 1
            m[m < 0] = self.ignore
            m[m == 254] = self.ignore
            m = m.astype(np.uint8)
        return m

    def _batch(self, pool: Samples, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """``resize`` pipeline: images and labels squashed to the input square (each sample its own scale)."""
        imgs = [_resize(pool.image(int(i)), self.size, False) for i in idx]
        masks = [_resize(self._mask(pool, int(i)), self.size, True) for i in idx]
        x = self.enc.preprocess(np.stack(imgs)).float()
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"encoder preprocessing changed the size to {tuple(x.shape[-2:])}; expected {self.size}")
        return x, torch.as_tensor(np.stack(masks)).long()

    def _tensors(self, pool: Samples, idx) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(id(pool))
        if cached is None and not pool.encoded and 3 * self.size ** 2 * 4 * len(pool) <= TENSOR_BUDGET:
            parts = [self._batch(pool, range(s, min(s + 256, len(pool)))) for s in range(0, len(pool), 256)]
            cached = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).to(torch.uint8))
            self._cache[id(pool)] = cached
        if cached is not None:
            t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
            return cached[0][t], cached[1][t].long()
        return self._batch(pool, idx)

    def _tokens(self, pool: Samples, idx) -> torch.Tensor | None:
        if self.prefix is None:
            return None
        key = id(pool)
        if key not in self._tokens_cache:
            probe = self.prefix.tokens(self._tensors(pool, [0])[0].to(self.device))
            cached = None
            if probe.numel() * 4 * len(pool) <= TENSOR_BUDGET:
                cached = self._all_tokens(pool)
            self._tokens_cache[key] = cached
        cached = self._tokens_cache[key]
        return None if cached is None else cached[torch.as_tensor(np.asarray(idx), dtype=torch.long,
                                                                  device=cached.device)]

    def _all_tokens(self, pool: Samples) -> torch.Tensor:
        """The frozen prefix's tokens of every sample of ``pool``, in chunks of 64; the same inputs through the
        same frozen weights again (the test split of the next cell) are served from ``_TOKENS``, bit for bit."""
        cached = self._cache.get(id(pool))  # the pool's preprocessed inputs, in order (hashed without a copy)
        memo_key = None
        if cached is not None:
            h = hashlib.blake2b(self.prefix.digest().encode(), digest_size=16)
            h.update(str(self.device).encode())
            h.update(memoryview(cached[0].contiguous().numpy()).cast("B"))
            memo_key = h.hexdigest()
            if memo_key in _TOKENS:
                _TOKENS[memo_key] = _TOKENS.pop(memo_key)  # most recently used last
                return _TOKENS[memo_key]
        out = torch.cat([self.prefix.tokens(self._tensors(pool, range(s, min(s + 64, len(pool))))[0]
                                            .to(self.device)) for s in range(0, len(pool), 64)])
        if memo_key is not None:
            _TOKENS[memo_key] = out
            while len(_TOKENS) > TOKENS_KEEP:
                _TOKENS.pop(next(iter(_TOKENS)))
        return out

    def use_prefix(self, model, pool: Samples, device) -> bool:
        """Run the frozen first blocks once per sample from now on, if the model and recipe allow it (not
        with the mmseg pipeline: its inputs change every epoch)."""
        self.device = device
        if self.mmseg:
            return False
        x = self._tensors(pool, list(range(min(2, len(pool)))))[0].to(device)
        self.prefix = enable_prefix(model, self.recipe, x)
        return self.prefix is not None

    def _mmseg_batch(self, pool: Samples, idx, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``mmseg`` pipeline: each sample resized / cropped / flipped / distorted with its own draws."""
        seed, epoch = self.seed_epoch
        xs, ms = [], []
        for i in np.asarray(idx).tolist():
            rng = sp.sample_rng(seed, epoch, int(pool.ids[i]))
            x, m, _ = sp.train_sample(pool.image(i), self._mask(pool, i), rng, self.pipe, device)
            x, m = sp.pad_to(sp.normalize(x, self.mean, self.std), m, self.pipe.crop, self.ignore)
            xs.append(x)
            ms.append(m)
        return torch.stack(xs), torch.stack(ms)

    def inputs(self, pool, idx, aug, device):
        if self.mmseg:
            return self._mmseg_batch(pool, idx, device)
        if aug is None:
            t = self._tokens(pool, idx)
            if t is not None:
                return t.to(device), self._tensors(pool, idx)[1].to(device)
        x, m = self._tensors(pool, idx)
        x, m = x.to(device), m.to(device)
        if aug is not None:
            x, m = apply_crop_flip(x, aug, m)
        return x, m

    def per_sample_loss(self, out, target):
        logits = F.interpolate(out.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        pix = F.cross_entropy(logits, target, reduction="none", ignore_index=self.ignore)  # 0 where ignored
        return pix.flatten(1).mean(1)

    def n_correct(self, out, target):
        pred = F.interpolate(out.float(), size=target.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        valid = target != self.ignore
        acc = ((pred == target) & valid).flatten(1).sum(1).float() / valid.flatten(1).sum(1).clamp(min=1).float()
        return float(acc.sum())

    def _slide_confusion(self, model, test: Samples, ctx: Runtime, amp: str, batch: int) -> np.ndarray:
        """``mmseg`` pipeline: each image resized to fit the test scale, sliding windows, logits back to the
        label map's size."""
        conf = np.zeros((self.num_classes, self.num_classes), np.int64)
        p = self.pipe

        def run(crops):
            with autocast(amp, ctx.device):
                return model(crops)

        for i in range(len(test)):
            x = sp.normalize(sp.test_image(test.image(i), p, ctx.device), self.mean, self.std)[None]
            logits = sp.slide_logits(run, x, self.num_classes, p.crop, p.slide_stride, batch=max(1, batch))
            gt = torch.as_tensor(self._mask(test, i).astype(np.int64))
            pred = F.interpolate(logits, size=gt.shape, mode="bilinear", align_corners=False).argmax(1)
            conf += confusion_matrix(pred.cpu(), gt, self.num_classes, self.ignore)
        return conf

    def _whole_confusion(self, model, test: Samples, ctx: Runtime, amp: str, batch: int) -> np.ndarray:
        """``resize`` pipeline: whole squashed images, logits upsampled to each label map's own size."""
        conf = np.zeros((self.num_classes, self.num_classes), np.int64)
        for s in range(0, len(test), batch):
            idx = np.arange(s, min(s + batch, len(test)))
            x = self._tokens(test, idx)
            if x is None:
                x = self._tensors(test, idx)[0]
            with autocast(amp, ctx.device):
                logits = model(x.to(ctx.device)).float()
            for k, i in enumerate(idx):  # upsample to each label's own size
                gt = torch.as_tensor(self._mask(test, int(i)).astype(np.int64))
                pred = F.interpolate(logits[k:k + 1], size=gt.shape, mode="bilinear", align_corners=False).argmax(1)
                conf += confusion_matrix(pred.cpu(), gt, self.num_classes, self.ignore)
        return conf

    @torch.no_grad()
    def evaluate(self, model, test: Samples, ctx: Runtime, amp: str, batch: int) -> dict:
        conf = (self._slide_confusion if self.mmseg else self._whole_confusion)(model, test, ctx, amp, batch)
        total = torch.as_tensor(conf, dtype=torch.float64)
        count = torch.tensor([float(len(test))], dtype=torch.float64)
        total = ctx.all_reduce(total)
        count = ctx.all_reduce(count)
        conf = total.numpy().astype(np.int64)
        res = iou_from_confusion(conf)

        def num(v):
            return None if np.isnan(v) else float(v * 100)

        return {"miou": res["miou"] * 100, "aacc": res["aacc"] * 100,
                "per_class": {c: num(res["iou"][i]) for i, c in enumerate(self.classes)},
                "per_class_acc": {c: num(res["acc"][i]) for i, c in enumerate(self.classes)},
                "confusion": conf.tolist(), "n_test": int(count[0])}
