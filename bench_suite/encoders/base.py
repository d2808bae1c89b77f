"""The Encoder object every encoder returns: frozen timm model + its preprocessing + pooled features.

ViT pooling is done on timm's ``forward_features`` output (tokens after the final norm), so "cls",
"gap" (mean of patch tokens) and "cls+mean" (their concatenation, the DINOv2 linear-probe feature) all
come from the same pass. CNNs only have "gap" (global average of the last feature map, pre-classifier).
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_suite.errors import BadInputError

VIT_POOLINGS = ("cls", "cls+mean", "gap")
CNN_POOLINGS = ("gap",)
# Images whose float copy is at least this large are converted in numpy (Encoder.preprocess): numpy's threshold for
# asking the kernel for huge pages (NumPy's default allocator, 4 MiB). Smaller ones are faster in torch (measured:
# 400 x 300 photos 0.17 vs 0.64 ms to float on one thread, and the resize reads torch's buffer faster).
FLOAT_IN_NUMPY_BYTES = 4 << 20
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """Resize a (1, prefix + g*g, d) position embedding to a grid x grid patch grid: bicubic,
    align_corners=False, NO antialiasing (what HF Dinov2 / the ONNX export does; timm's dynamic-size
    path antialiases, which changes DINOv2 features noticeably when shrinking)."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(round(patches.shape[1] ** 0.5))
    if old * old != patches.shape[1]:
        raise BadInputError(f"position embedding has {patches.shape[1]} patch positions: not a square grid")
    if old == grid:
        return pos_embed.clone()
    d = patches.shape[-1]
    g = patches.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    g = g.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, g], dim=1)


def pool_features(model: nn.Module, kind: str, x: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, 3, S, S) -> (B, d) for one pooling; ``kind`` is "vit" or "cnn"."""
    feats = model.forward_features(x)
    if kind == "cnn":
        return feats.mean(dim=(2, 3))
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    cls, patches = feats[:, 0], feats[:, prefix:]
    if pooling == "cls":
        return cls
    if pooling == "gap":
        return patches.mean(dim=1)
    return torch.cat([cls, patches.mean(dim=1)], dim=1)


class PooledBackbone(nn.Module):
    """A trainable backbone returning (B, d) pooled features; ``.model`` is the timm model (its ``blocks``
    are what the finetuning recipes freeze / drop-path)."""

    def __init__(self, model: nn.Module, kind: str, pooling: str):
        super().__init__()
        self.model, self.kind, self.pooling = model, kind, pooling

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_features(self.model, self.kind, x, self.pooling)


class Encoder:
    """A frozen pretrained image encoder (see bench_suite.encoders for the interface)."""

    def __init__(self, *, name: str, arch: str, model: nn.Module | Callable[[], nn.Module], kind: str,
                 image_size: int, mean, std, default_pooling: str, dims: dict[str, int], meta: dict,
                 device: str = "cpu"):
        self.name, self.arch, self.kind, self.image_size = name, arch, kind, int(image_size)
        self.device = torch.device(device)
        self._model, self._make = (None, model) if not isinstance(model, nn.Module) else (self._frozen(model), None)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.poolings = dict(dims)
        self.default_pooling = default_pooling
        self.dim = self.poolings[default_pooling]
        self.meta = {"name": name, "arch": arch, **meta, "image_size": self.image_size, "pooling": default_pooling,
                     "poolings": dict(dims), "mean": list(mean), "std": list(std)}

    @property
    def model(self) -> nn.Module:
        """The frozen model; an encoder given a function builds it on first use, so that a run whose features
        are cached, which needs only ``meta``, skips it (timm's import and the model: 4-5 s of a 7 s cached
        ``select --images`` run on 2 cores)."""
        if self._model is None:
            with torch.inference_mode(False):  # first used under inference mode: its tensors stay ordinary ones
                self._model, self._make = self._frozen(self._make()), None
        return self._model

    def _frozen(self, model: nn.Module) -> nn.Module:
        return model.to(self.device).eval().requires_grad_(False)

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, arch={self.arch!r}, image_size={self.image_size}, dim={self.dim})"

    def check_pooling(self, pooling: str | None) -> str:
        pooling = pooling or self.default_pooling
        if pooling not in self.poolings:
            raise BadInputError(f"encoder {self.name}: pooling {pooling!r} not supported; use one of "
                                f"{', '.join(self.poolings)}")
        return pooling

    def preprocess(self, images) -> torch.Tensor:
        """uint8 (B,H,W) gray or (B,H,W,3) RGB -> float32 (B,3,S,S) on the CPU: bilinear antialiased resize
        to S x S (aspect ratio not kept), gray copied to 3 channels, normalised with the encoder's mean/std."""
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise BadInputError(f"encoder {self.name}: preprocess expects uint8 images, got {arr.dtype}")
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 3 and not (arr.ndim == 4 and arr.shape[-1] == 3):
            raise BadInputError(f"encoder {self.name}: preprocess expects (B,H,W) or (B,H,W,3) uint8 images, "
                                f"got shape {arr.shape}")
        if arr.shape[0] == 0:
            raise BadInputError(f"encoder {self.name}: preprocess got an empty batch")
        # Torch wants writable memory (copied only if not). One image is copied alone and seen as a batch of one
        # (its batch stride 0): preprocessing 400 x 300 photos so took 1.3 ms per image on one thread instead of
        # 1.75 (medians of 15 rounds; torch's resize is slower on a (1,H,W,3) array of its own). The same bytes.
        one = arr.shape[0] == 1
        arr = np.require(arr[0] if one else arr, requirements=["C", "W"])
        if arr.size * 4 >= FLOAT_IN_NUMPY_BYTES:
            # A large image goes to float in numpy, which asks for huge pages for large arrays: torch's float copy
            # of a 12 MP photo (144 MB) spends most of its time faulting in 4 KB pages (127 vs 33 ms on one thread,
            # measured). Both conversions are exact, as is x / 255 (one IEEE division), so the bytes are torch's
            # (tests/test_extract_pipeline.py: all 256 values, and photos against torch's formula).
            arr = arr.astype(np.float32)
            np.divide(arr, np.float32(255.0), out=arr)
        arr = arr[None] if one else arr
        x = torch.from_numpy(arr)[:, None] if arr.ndim == 3 else torch.from_numpy(arr).permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        s = self.image_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return ((x - self.mean) / self.std).contiguous()

    def features(self, x: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """(B,3,S,S) -> (B,d) float32 on the encoder's device, not L2-normalised."""
        pooling = self.check_pooling(pooling)
        s = self.image_size
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (s, s):
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise BadInputError(f"encoder {self.name}: features expects a (B,3,{s},{s}) tensor (use preprocess), "
                                f"got {shape}")
        with torch.no_grad():
            return pool_features(self.model, self.kind, x.to(self.device, torch.float32), pooling).float()

    def backbone_for_finetune(self, pooling: str | None = None) -> PooledBackbone:
        """A fresh trainable copy (train mode, requires_grad True) returning (B, d) pooled features; the
        frozen ``model`` is untouched. CNN copies drop the ImageNet classifier."""
        pooling = self.check_pooling(pooling)
        model = copy.deepcopy(self.model)
        if self.kind == "cnn" and hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
        model.requires_grad_(True).train()
        return PooledBackbone(model, self.kind, pooling).train()
