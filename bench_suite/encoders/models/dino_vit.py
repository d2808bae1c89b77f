"""dino_vits16: the paper's DINO ViT-S/16 (timm ``vit_small_patch16_224``) from a LOCAL checkpoint.

Official ``dino_deitsmall16_pretrain.pth`` is a plain state dict with timm-compatible keys; DINO training
checkpoints wrap it as {"teacher": ..., "student": ...} with "module." / "backbone." prefixes and add the
projection head ("head.*"), which is dropped (``encoders/checkpoints.py``; the teacher is preferred). The hub
copy (timm's ``vit_small_patch16_224.dino``) is fetched only when asked with ``weights="hub"``: nothing is
ever downloaded implicitly.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bench_suite.encoders import assets, checkpoints
from bench_suite.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, resize_pos_embed
from bench_suite.encoders.registry import EncoderSpec, register
from bench_suite.errors import BadInputError

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


def locate(weights=None, cache_dir=None) -> tuple[Path, str]:
    """(checkpoint path, provenance) — a local file, or the hub copy when weights == "hub"."""
    if isinstance(weights, str) and weights == "hub":
        from huggingface_hub import hf_hub_download

        log.info("%s: downloading %s/%s (weights='hub')", NAME, HUB_REPO, HUB_FILE)
        return Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE)), f"hf-hub:{HUB_REPO}"
    return checkpoints.locate(weights, cache_dir, CHECKPOINT, "DINO ViT-S/16", URL), "local file"


def build_vit(name: str, arch: str, path: Path, how: str, note: str, image_size: int, device: str,
              drop: tuple[str, ...] = ("head.",)) -> Encoder:
    """A timm ViT-S/16 from a DINO-shaped checkpoint (also iBOT's: ``ibot_vit``), position embedding resized."""
    import timm

    check_size(name, image_size)
    state = checkpoints.backbone_state(checkpoints.read_checkpoint(path, name), path, drop)
    if "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], image_size // PATCH)
    model = assets.build_loaded(lambda: timm.create_model(arch, pretrained=False, img_size=image_size, num_classes=0,
                                                          dynamic_img_size=False, weight_init="skip"),
                                state, f"{name} checkpoint {path}")
    return Encoder(name=name, arch=arch, model=model, kind="vit", image_size=image_size, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, default_pooling="cls", dims={"cls": DIM, "cls+mean": 2 * DIM, "gap": DIM},
                   meta=checkpoints.provenance(path, how, note), device=device)


def check_size(name: str, image_size: int) -> None:
    if image_size % PATCH:
        raise BadInputError(f"{name}: image_size must be a multiple of {PATCH}, got {image_size}")


def build(image_size: int, weights=None, cache_dir=None, device: str = "cpu") -> Encoder:
    check_size(NAME, image_size)  # before looking for the file: a bad size is the first error
    path, how = locate(weights, cache_dir)
    return build_vit(NAME, ARCH, path, how, NOTE, image_size, device)


register(EncoderSpec(NAME, ARCH, build, 224, "cls", {"cls": 384, "cls+mean": 768, "gap": 384},
                     f"local {CHECKPOINT} (weights=PATH) or weights='hub'", NOTE.format(source="a local checkpoint"),
                     False))
