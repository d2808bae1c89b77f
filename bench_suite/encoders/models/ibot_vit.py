"""ibot_vits16: iBOT ViT-S/16 (Zhou et al. 2022), the encoder of the paper's Table 4(a), from a LOCAL checkpoint.

The official release formats both load (``encoders/checkpoints.py``): the "backbone" download
``checkpoint_teacher.pth`` (the teacher's state dict under "state_dict") and a full training checkpoint
({"teacher": ..., "student": ...} with "module." / "backbone." prefixes). iBOT's ViT is timm's
``vit_small_patch16_224`` plus ``masked_embed``, the learned [MASK] token of its masked-image-modelling
objective, which feature extraction never uses: it is dropped with the projection heads ("head.*").
"""

from __future__ import annotations

from bench_suite.encoders import checkpoints
from bench_suite.encoders.models.dino_vit import ARCH, DIM, build_vit, check_size
from bench_suite.encoders.registry import EncoderSpec, register

NAME = "ibot_vits16"
CHECKPOINT = "ibot_vits16_checkpoint_teacher.pth"  # the release calls it checkpoint_teacher.pth (ViT-S/16 folder)
URL = "the iBOT repository's ViT-S/16 'backbone' download, checkpoint_teacher.pth (github.com/bytedance/ibot)"
NOTE = "iBOT self-supervised ViT-S/16 (Zhou et al. 2022), Table 4(a) of the ActiveFT paper; loaded from {source}."


def build(image_size: int, weights=None, cache_dir=None, device: str = "cpu"):
    check_size(NAME, image_size)
    path = checkpoints.locate(weights, cache_dir, CHECKPOINT, "iBOT ViT-S/16", URL)
    return build_vit(NAME, ARCH, path, "local file", NOTE, image_size, device, drop=("head.", "masked_embed"))


register(EncoderSpec(NAME, ARCH, build, 224, "cls", {"cls": DIM, "cls+mean": 2 * DIM, "gap": DIM},
                     f"local {CHECKPOINT} (weights=PATH)", NOTE.format(source="a local checkpoint"), False))
