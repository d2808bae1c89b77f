"""dino_resnet50: DINO ResNet-50 (Caron et al. 2021), the encoder of the paper's Table 4(b), from a LOCAL checkpoint.

The official ``dino_resnet50_pretrain.pth`` is a torchvision ResNet-50 state dict without its ``fc`` layer;
DINO training checkpoints ({"teacher": ...}, "module." / "backbone." prefixes, "head.*") load too
(``encoders/checkpoints.py``). timm's ``resnet50`` uses torchvision's parameter names, so the state dict
loads as it is (strictly). Features: global average pooling of the last stage, 2048-d.
"""

from __future__ import annotations

from bench_suite.encoders import assets, checkpoints
from bench_suite.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from bench_suite.encoders.registry import EncoderSpec, register

NAME = "dino_resnet50"
ARCH = "resnet50"
DIM = 2048
CHECKPOINT = "dino_resnet50_pretrain.pth"
URL = "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"
NOTE = "DINO self-supervised ResNet-50 (Caron et al. 2021), Table 4(b) of the ActiveFT paper; loaded from {source}."


def build(image_size: int, weights=None, cache_dir=None, device: str = "cpu") -> Encoder:
    import timm

    path = checkpoints.locate(weights, cache_dir, CHECKPOINT, "DINO ResNet-50", URL)
    state = checkpoints.backbone_state(checkpoints.read_checkpoint(path, NAME), path, drop=("head.", "fc."))
    model = assets.build_loaded(lambda: timm.create_model(ARCH, pretrained=False, num_classes=0), state,
                                f"{NAME} checkpoint {path}")
    return Encoder(name=NAME, arch=ARCH, model=model, kind="cnn", image_size=image_size, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, default_pooling="gap", dims={"gap": DIM},
                   meta=checkpoints.provenance(path, "local file", NOTE), device=device)


register(EncoderSpec(NAME, ARCH, build, 224, "gap", {"gap": DIM}, f"local {CHECKPOINT} (weights=PATH)",
                     NOTE.format(source="a local checkpoint"), False))
