"""dino_vits16: the paper's DINO ViT-S/16 (timm ``vit_small_patch16_224``) from a LOCAL checkpoint.

Official ``dino_deitsmall16_pretrain.pth`` is a plain state dict with timm-compatible keys; DINO training
checkpoints wrap it as {"teacher": ..., "student": ...} with "module." / "backbone." prefixes and add the
projection head ("head.*"), which is dropped (the teacher is preferred: DINO evaluates the teacher). The hub
copy (timm's ``vit_small_patch16_224.dino``) is fetched only when asked with ``weights="hub"``: nothing is
ever downloaded implicitly.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from bench_suite.encoders import assets
from bench_suite.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, resize_pos_embed
from bench_suite.encoders.registry import EncoderSpec, register
from bench_suite.errors import BadInputError, CorruptDataError, MissingDataError

log = logging.getLogger(__name__)

NAME = "dino_vits16"
ARCH = "vit_small_patch16_224"
PATCH = 16
DIM = 384
CHECKPOINT = "dino_deitsmall16_pretrain.pth"
URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
HUB_REPO = "timm/vit_small_patch16_224.dino"
HUB_FILE = "model.safetensors"
NOTE = ("DINO self-supervised ViT-S/16 (Caron et al. 2021), the encoder of the ActiveFT paper; loaded from "
        "{source}.")
_WRAPPERS = ("teacher", "student", "state_dict", "model")
_PREFIXES = ("module.", "backbone.")


def locate(weights=None, cache_dir=None) -> tuple[Path, str]:
    """(checkpoint path, provenance) — a local file, or the hub copy when weights == "hub"."""
    if isinstance(weights, str) and weights == "hub":
        from huggingface_hub import hf_hub_download

        log.info("%s: downloading %s/%s (weights='hub')", NAME, HUB_REPO, HUB_FILE)
        return Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE)), f"hf-hub:{HUB_REPO}"
    path = Path(weights).expanduser() if weights is not None else assets.cache_root(cache_dir) / CHECKPOINT
    if not path.is_file():
        raise MissingDataError(
            f"DINO ViT-S/16 checkpoint not found: {path}; download {CHECKPOINT} ({URL}) and pass its path as "
            f"weights= (--weights), or put it at {assets.cache_root(cache_dir) / CHECKPOINT}; weights='hub' "
            f"downloads timm's {HUB_REPO} instead")
    return path, "local file"


def read_checkpoint(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # training checkpoints also pickle their argparse args
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptDataError(f"cannot read DINO checkpoint {path}: {str(exc).splitlines()[0]}") from exc


def backbone_state(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap teacher/student/model/state_dict, strip module./backbone. prefixes, drop the DINO head."""
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        key = next((k for k in _WRAPPERS if k in obj), None)
        if key is None:
            raise CorruptDataError(f"{path}: no state dict found (top-level keys {sorted(obj)[:8]})")
        obj = obj[key]
    out = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        if not key.startswith("head."):
            out[key] = value.float()
    return out


def build(image_size: int, weights=None, cache_dir=None, device: str = "cpu") -> Encoder:
    import timm

    if image_size % PATCH:
        raise BadInputError(f"{NAME}: image_size must be a multiple of {PATCH}, got {image_size}")
    path, provenance = locate(weights, cache_dir)
    state = backbone_state(read_checkpoint(path), path)
    if "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], image_size // PATCH)
    model = timm.create_model(ARCH, pretrained=False, img_size=image_size, num_classes=0, dynamic_img_size=False,
                              weight_init="skip")  # every tensor is loaded below
    assets.load_strict(model, state, f"DINO checkpoint {path}")
    meta = {"weights": {"source": provenance, "file": path.name, "sha256": assets.sha256_file(path)},
            "note": NOTE.format(source=f"{provenance} {path.name}")}
    return Encoder(name=NAME, arch=ARCH, model=model, kind="vit", image_size=image_size, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, default_pooling="cls", dims={"cls": DIM, "cls+mean": 2 * DIM, "gap": DIM},
                   meta=meta, device=device)


register(EncoderSpec(NAME, ARCH, build, 224, "cls", {"cls": 384, "cls+mean": 768, "gap": 384},
                     f"local {CHECKPOINT} (weights=PATH) or weights='hub'", NOTE.format(source="a local checkpoint"),
                     False))
