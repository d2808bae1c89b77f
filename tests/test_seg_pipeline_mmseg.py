"""Our plain-torch segmentation pipeline against mmsegmentation's own, on the same images with the same seeds.

Needs the [mmseg] extra (``bash setup.sh --with-mmseg``); CI installs it and sets BENCH_SUITE_REQUIRE_MMSEG=1,
so there these tests run (and fail if the extra is missing) instead of skipping.

- The elementary operations against OpenCV, which mmcv calls: the bilinear resize is bit-exact, the nearest
  resize and RGB->HSV are exact, HSV->RGB (OpenCV's vectorised kernel) agrees on all but a few values.
- Training: the training pipeline of launchers/mmseg's config, run by mmseg's ADE20KDataset from the image
  files, then its SegDataPreProcessor; and ours (recipe segmenter_paper) from the same decoded images and label
  maps, with each sample's RandomState seeded as numpy's global one was. Compared directly: label maps, uint8
  images, normalised and padded inputs.
- Evaluation: mmseg's EncoderDecoder.predict (test pipeline resize, slide inference, resize back) against our
  test resize + slide_logits with the same network as the window function.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

from bench_suite.data.registry import get_dataset
from bench_suite.data.sources import decode_image
from bench_suite.finetune import seg_pipeline as sp
from bench_suite.finetune.recipes import get_recipe
from launchers.mmseg import train as mm
from seg_fixtures import write_ade20k_scenes

HAVE_MMSEG = importlib.util.find_spec("mmseg") is not None
pytestmark = pytest.mark.skipif(not HAVE_MMSEG and os.environ.get("BENCH_SUITE_REQUIRE_MMSEG") != "1",
                                reason="needs the [mmseg] extra: bash setup.sh --with-mmseg")
MEAN = torch.tensor([0.485, 0.456, 0.406])  # DINO's ImageNet statistics (the config's 123.675, ... / 255)
STD = torch.tensor([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def mmseg_env():
    from mmengine.config import Config
    from mmseg.utils import register_all_modules

    register_all_modules()
    return Config.fromfile(str(mm.CONFIG))


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return write_ade20k_scenes(tmp_path_factory.mktemp("ade_mm") / "ADEChallengeData2016")


def test_config_and_recipe_describe_the_same_protocol(mmseg_env):
    cfg, r = mmseg_env, get_recipe("segmenter_paper")
    steps = {t["type"]: t for t in cfg.train_pipeline}
    assert list(steps) == ["LoadImageFromFile", "LoadAnnotations", "RandomResize", "RandomCrop", "RandomFlip",
                           "PhotoMetricDistortion", "PackSegInputs"]
    assert steps["LoadAnnotations"]["reduce_zero_label"] is True  # ours: the ade20k registry's shards
    assert (list(steps["RandomResize"]["scale"]), list(steps["RandomResize"]["ratio_range"])) == \
        (r["scale"], r["ratio_range"]) and steps["RandomResize"]["keep_ratio"]
    assert steps["RandomCrop"]["crop_size"] == (r["image_size"],) * 2 == cfg.crop_size
    assert steps["RandomCrop"]["cat_max_ratio"] == r["cat_max_ratio"]
    assert steps["RandomFlip"]["prob"] == r["flip_prob"] and r["photometric"]
    test = {t["type"]: t for t in cfg.test_pipeline}
    assert list(test["Resize"]["scale"]) == r["scale"] and test["Resize"]["keep_ratio"]
    assert cfg.model.test_cfg.mode == "slide" and cfg.model.test_cfg.crop_size == (r["image_size"],) * 2
    assert cfg.model.test_cfg.stride == (r["slide_stride"],) * 2 == (341, 341)
    assert cfg.data_preprocessor.mean == [round(v * 255, 3) for v in MEAN.tolist()]
    assert cfg.data_preprocessor.std == [round(v * 255, 3) for v in STD.tolist()]


def test_elementary_operations_match_opencv():
    import cv2
    import mmcv

    rng = np.random.default_rng(0)
    for h, w, nh, nw in [(24, 32, 533, 711), (300, 400, 528, 704), (375, 500, 900, 1200), (1024, 1366, 512, 683),
                         (77, 91, 30, 40)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        ours = sp.resize_bilinear(sp.to_chw(img, "cpu"), nh, nw).permute(1, 2, 0).numpy()
        assert np.array_equal(ours, ref), (h, w, nh, nw)  # bit-exact
        y1, y2, x1, x2 = box = (nh // 4, nh // 2, nw // 3, nw - 1)  # a window of it, as a training crop
        part = sp.resize_bilinear(sp.to_chw(img, "cpu"), nh, nw, box=box).permute(1, 2, 0).numpy()
        assert np.array_equal(part, ref[y1:y2, x1:x2])
        m = rng.integers(0, 150, (h, w), dtype=np.uint8)
        assert np.array_equal(sp.resize_nearest(m, nh, nw), cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST))
        assert sp.rescale_size(h, w, (2048, 512))[::-1] == mmcv.rescale_size((w, h), (2048, 512))
    img = rng.integers(0, 256, (64, 512, 3), dtype=np.uint8)  # RGB
    hsv = cv2.cvtColor(img[..., ::-1].copy(), cv2.COLOR_BGR2HSV)
    ours = sp.rgb_to_hsv_u8(sp.to_chw(img, "cpu")).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, hsv)
    back = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1]
    ours = sp.hsv_u8_to_rgb(torch.from_numpy(hsv).permute(2, 0, 1).float()).permute(1, 2, 0).numpy()
    diff = np.abs(ours - back)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # measured: 5e-5 of the values, by 1


def _mmseg_train_dataset(cfg, root):
    from mmseg.registry import DATASETS

    ds = cfg.train_dataloader.dataset.to_dict()
    ds.update(data_root=str(root), ann_file="")
    return DATASETS.build(ds)


def test_train_pipeline_matches_mmseg(mmseg_env, ade):
    """The config's training pipeline (mmseg, from the files) and ours, same images, same seeds: same label
    maps, images equal but for a few values by 1-2 grey levels (the HSV round trip), and the same model inputs."""
    from mmseg.models import SegDataPreProcessor

    cfg, recipe = mmseg_env, get_recipe("segmenter_paper")
    pipe = sp.SegPipeline.of_recipe(recipe)
    ds = _mmseg_train_dataset(cfg, ade)
    raw = get_dataset("ade20k").load("train", ade)  # what our shards hold: the JPEG bytes, the reduced masks
    assert len(ds) == len(raw.images) == 4
    pre = SegDataPreProcessor(**{k: v for k, v in cfg.data_preprocessor.items() if k != "type"})
    n_val = n_diff = max_diff = n_px = 0
    max_input_diff = 0.0
    for epoch in range(3):
        for i in range(len(ds)):
            np.random.seed([0, epoch, i, sp.SALT])  # the stream mmseg's transforms draw from
            out = ds[i]
            img = decode_image(raw.images[i].read_bytes())
            x, m, params = sp.train_sample(img, np.asarray(raw.masks[i]), sp.sample_rng(0, epoch, i), pipe)
            ref_img = out["inputs"].flip(0).float()  # BGR -> RGB
            ref_seg = out["data_samples"].gt_sem_seg.data[0].long()
            assert torch.equal(m, ref_seg), (epoch, i, params)  # geometry and draws identical
            d = (x - ref_img).abs()
            n_val += d.numel()
            n_diff += int((d > 0).sum())
            max_diff = max(max_diff, float(d.max()))
            # the model's inputs: mmseg's data preprocessor (bgr -> rgb, normalise, pad to 512) against ours
            batch = pre({"inputs": [out["inputs"]], "data_samples": [out["data_samples"]]}, training=True)
            xo, mo = sp.pad_to(sp.normalize(x, MEAN, STD), m, pipe.crop, pipe.ignore_index)
            assert xo.shape == batch["inputs"].shape[1:] == (3, 512, 512)
            assert torch.equal(mo, batch["data_samples"][0].gt_sem_seg.data[0].long())
            max_input_diff = max(max_input_diff, float((xo - batch["inputs"][0]).abs().max()))
            n_px += int((m != 255).sum())
    # measured: 5.4e-4 of the values differ, by at most 3 grey levels (two HSV round trips, then contrast)
    assert n_px > 0 and max_diff <= 4 and n_diff / n_val < 2e-3, (max_diff, n_diff / n_val)
    assert max_input_diff <= 4 / 57.12 + 1e-4
    print(f"train pipeline vs mmseg: 12 samples, label maps identical; image values differing {n_diff}/{n_val} "
          f"({n_diff / n_val:.2e}), max {max_diff:.0f} grey levels; model inputs max |diff| {max_input_diff:.4f}")


def _small_model(cfg):
    """The config's EncoderDecoder at a test size (2-layer ViT of width 96, 1-layer mask transformer)."""
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS

    model_cfg = cfg.model.to_dict()
    model_cfg["pretrained"] = None
    model_cfg["backbone"].update(embed_dims=96, num_heads=3, num_layers=2, drop_path_rate=0.0)
    model_cfg["decode_head"].update(in_channels=96, channels=96, embed_dims=96, num_heads=3, num_layers=1,
                                    num_classes=150)
    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(model_cfg))  # constructed weights (init_weights only logs at length)
    return model.eval()


def test_slide_inference_matches_mmseg(mmseg_env, ade):
    """mmseg's test pipeline + slide inference + resize to the label size, and ours, with the same network."""
    from mmseg.registry import DATASETS

    cfg = mmseg_env
    pipe = sp.SegPipeline.of_recipe(get_recipe("segmenter_paper"))
    model = _small_model(cfg)
    val = cfg.val_dataloader.dataset.to_dict()
    val.update(data_root=str(ade))
    ds = DATASETS.build(val)
    raw = get_dataset("ade20k").load("test", ade)
    agree = total = 0
    worst = 0.0
    for i in range(len(ds)):
        item = ds[i]
        with torch.no_grad():
            data = model.data_preprocessor({"inputs": [item["inputs"]], "data_samples": [item["data_samples"]]})
            ref = model.predict(data["inputs"], data["data_samples"])[0]
            img = decode_image(raw.images[i].read_bytes())
            x = sp.normalize(sp.test_image(img, pipe), MEAN, STD)[None]
            assert torch.allclose(x, data["inputs"], atol=1e-5)  # the test resize is OpenCV's, bit for bit
            metas = [dict(img_shape=(pipe.crop, pipe.crop), ori_shape=img.shape[:2], pad_shape=(pipe.crop,) * 2)]

            def window(crops):
                return model.encode_decode(crops, metas * len(crops))

            logits = sp.slide_logits(window, x, 150, pipe.crop, pipe.slide_stride)
            logits = torch.nn.functional.interpolate(logits, size=img.shape[:2], mode="bilinear", align_corners=False)
        ref_logits = ref.seg_logits.data[None]
        worst = max(worst, float((logits - ref_logits).abs().max()))
        pred = logits.argmax(1)[0]
        agree += int((pred == ref.pred_sem_seg.data[0]).sum())
        total += pred.numel()
        assert len(sp.windows(*x.shape[-2:], pipe.crop, pipe.slide_stride)) >= 2  # it really slides
    assert worst < 1e-4 and agree == total, (worst, agree, total)
    print(f"slide inference vs mmseg: max |logit diff| {worst:.2e}, predictions identical on {agree}/{total} pixels")
