"""The plain-torch segmentation pipeline (bench_suite/finetune/seg_pipeline.py) and the Segmenter run with it.

What needs no mmsegmentation: sliding-window layout, per-sample draws (reproducible, per epoch, cat_max_ratio),
the recipe fields, a finetuning end to end on an ADE20K-format fixture with the mmseg pipeline (scaled-down
sizes), and the resize pipeline's label size. The comparison with mmsegmentation's own pipeline on the same
images and seeds is tests/test_seg_pipeline_mmseg.py.
"""

import copy

import numpy as np
import pytest
import torch

from bench_suite.errors import BadInputError
from bench_suite.finetune import seg_pipeline as sp
from bench_suite.finetune.recipes import get_recipe, resolve
from bench_suite.finetune.samples import Samples
from bench_suite.finetune.segmentation import SegTask
from seg_fixtures import scene, write_ade20k_scenes


def test_windows_follow_mmseg_slide_inference():
    # a 512 x 683 test image (ADE20K's usual 4:3 after the 2048 x 512 resize): two windows, the last flush right
    assert sp.windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert sp.windows(300, 400, 512, 341) == [(0, 300, 0, 400)]  # smaller than a window: one, the image
    boxes = sp.windows(700, 2000, 512, 341)
    assert len(boxes) == 2 * 6  # mmseg: (h - crop + stride - 1) // stride + 1 rows / columns
    cover = np.zeros((700, 2000), int)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (512, 512)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1 and boxes[-1] == (188, 700, 1488, 2000)


def test_slide_logits_average_overlapping_windows():
    x = torch.zeros(1, 3, 40, 70)
    calls = []

    def model(crops):  # logits = the window's left column index, so the average over windows is checkable
        calls.append(crops.shape)
        return torch.ones(crops.shape[0], 2, 4, 4)

    out = sp.slide_logits(model, x, 2, 32, 21, batch=2)
    assert out.shape == (1, 2, 40, 70) and torch.allclose(out, torch.ones_like(out))
    assert sum(c[0] for c in calls) == len(sp.windows(40, 70, 32, 21)) == 6 and calls[0][0] == 2


def test_train_draws_are_per_sample_per_epoch_and_reproducible():
    rng = np.random.default_rng(0)
    img, ann = scene(rng, 120, 90)
    mask = np.where(ann == 0, 255, ann - 1).astype(np.uint8)
    p = sp.SegPipeline(crop=64, scale=(256, 64))
    a = sp.train_sample(img, mask, sp.sample_rng(3, 0, 17), p)
    b = sp.train_sample(img, mask, sp.sample_rng(3, 0, 17), p)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    others = [sp.train_sample(img, mask, sp.sample_rng(3, e, 17), p)[2] for e in range(1, 8)]
    assert len({o.size for o in others}) > 3 and len({o.flip for o in others}) == 2
    for e in range(30):  # the resize: ratio 0.5-2.0 of 256 x 64, aspect kept: short side 32..128
        x, m, par = sp.train_sample(img, mask, sp.sample_rng(3, e, 17), p)
        assert 32 <= min(par.size) <= 128 and abs(par.size[0] / par.size[1] - 120 / 90) < 0.05
        assert x.shape[1:] == m.shape and max(m.shape) <= 64 and x.min() >= 0 and x.max() <= 255
        assert torch.equal(x, x.round())  # uint8 values, as mmseg's transforms keep them


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    mask = np.zeros((64, 256), np.uint8)  # class 0 everywhere but a 64 x 40 block of class 1 at the right
    mask[:, 216:] = 1
    ok = 0
    for s in range(40):
        y1, y2, x1, x2 = sp.crop_box(mask, np.random.RandomState(s), 64, 0.75, 255)
        cnt = np.bincount(mask[y1:y2, x1:x2].ravel(), minlength=2)
        ok += cnt.max() / cnt.sum() < 0.75
    # a random 64-wide window passes only if it starts at x >= 169: 23 of 193 positions; 11 tries -> ~75%
    assert ok >= 24
    never = sum(np.bincount(mask[:, x:x + 64].ravel(), minlength=2).max() / (64 * 64) < 0.75
                for x in np.random.RandomState(0).randint(0, 193, 40))
    assert never <= 12  # without the redraws
    # cat_max_ratio 1: one draw (two randint calls), no redraw
    r = np.random.RandomState(5)
    box = sp.crop_box(mask, r, 64, 1.0, 255)
    ref = np.random.RandomState(5)
    assert box[0] == ref.randint(0, 1) and box[2] == ref.randint(0, 193) and r.randint(1 << 30) == ref.randint(1 << 30)


def test_segmenter_paper_recipe_is_the_mmseg_protocol():
    r = get_recipe("segmenter_paper")
    assert (r["pipeline"], r["image_size"], r["scale"], r["ratio_range"], r["cat_max_ratio"], r["flip_prob"],
            r["photometric"], r["slide_stride"]) == ("mmseg", 512, [2048, 512], [0.5, 2.0], 0.75, 0.5, True, 341)
    from bench_suite.finetune.recipes import resolve_named
    from bench_suite.profiles import load_profile

    paper = load_profile("paper")  # Table 2 of the paper profile runs it as is
    assert paper.tables["2"].recipe == "segmenter_paper" and resolve_named("segmenter_paper", paper.recipes) == r
    cpu = load_profile("cpu")  # the cpu profile scales it down, and says so in the table's note
    assert resolve_named(cpu.tables["2"].recipe, cpu.recipes)["pipeline"] == "resize"
    assert "scaled down" in cpu.tables["2"].note and "sliding-window" in cpu.tables["2"].note
    assert get_recipe("cpu_segmenter")["pipeline"] == "resize"
    with pytest.raises(BadInputError, match="pipeline must be mmseg or resize"):
        resolve({**r, "pipeline": "squash"})
    with pytest.raises(BadInputError, match="slide_stride"):
        resolve({**r, "slide_stride": 600})
    with pytest.raises(BadInputError, match="cat_max_ratio"):
        resolve({**r, "cat_max_ratio": 0})


class TinySegEncoder:
    """A 2-block ViT from scratch with the registry encoders' interface (mean / std included)."""

    name = "tiny_seg_vit"

    def __init__(self, size=32):
        import timm

        torch.manual_seed(0)
        self.image_size = size
        self.model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8, depth=2,
                                       num_classes=0).eval()
        self.dim = self.model.num_features
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.meta = {"name": self.name, "image_size": size}

    def preprocess(self, images):
        x = torch.as_tensor(np.asarray(images)).float() / 255.0
        x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = torch.nn.functional.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def backbone_for_finetune(self):
        return copy.deepcopy(self.model).train().requires_grad_(True)


@pytest.fixture(scope="module")
def ade_shards(tmp_path_factory):
    from bench_suite.data.shards import write_shards

    root = write_ade20k_scenes(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")
    out = tmp_path_factory.mktemp("ade_shards")
    write_shards("ade20k", "train", out / "train", source=root, shard_size=2)
    write_shards("ade20k", "test", out / "test", source=root)
    return out, root


# the paper's protocol at 1/16 of its sizes: 32 crops / windows, scale 128 x 32, stride 21
SMALL = {"epochs": 2, "batch_size": 2, "micro_batch_size": 2, "image_size": 32, "scale": [128, 32],
         "slide_stride": 21, "trainable_blocks": "all", "drop_path": 0.0, "checkpoint_every": 1}


def test_finetune_with_the_mmseg_pipeline_end_to_end(tmp_path, ade_shards):
    """Segmenter trained and evaluated through the library with pipeline: mmseg (random resize / crop / flip /
    photometric distortion, sliding windows); images of four sizes, so labels differ in size too."""
    from bench_suite.data.registry import get_dataset
    from bench_suite.finetune.launch import finetune

    shards, root = ade_shards
    enc = TinySegEncoder(32)
    res = finetune("seg", shards / "train", shards / "test", [0, 1, 2, 3], "segmenter_paper", encoder=enc,
                   seed=0, out=tmp_path / "o", distributed=False, progress=False, overrides=SMALL)
    assert res["recipe"]["pipeline"] == "mmseg" and res["model"]["frozen_prefix_cache"] is False
    assert 0 <= res["miou"] <= 100 and res["n_test"] == 2 and len(res["history"]) == 2
    assert np.isfinite(res["history"][-1]["loss"])
    conf = np.array(res["confusion"])
    # every labelled pixel of the two validation label maps, at their own sizes (48x64, 90x120), is counted
    raw = get_dataset("ade20k").load("test", root)
    assert conf.sum() == sum(int((np.asarray(raw.masks[i]) != 255).sum()) for i in range(2))


def test_training_inputs_depend_on_seed_epoch_and_id_not_on_the_batch():
    enc = TinySegEncoder(32)
    task = SegTask(enc, resolve({**get_recipe("segmenter_paper"), **SMALL}), 150, [str(i) for i in range(150)])
    rng = np.random.default_rng(1)
    scenes = [scene(rng, h, w) for h, w in [(60, 80), (120, 90), (64, 256)]]
    pool = Samples(np.array([4, 9, 11]), np.zeros(3, np.int64), [s[0] for s in scenes],
                   [np.where(s[1] == 0, 255, s[1] - 1).astype(np.uint8) for s in scenes], False)
    cpu = torch.device("cpu")
    task.set_epoch(0, 0)
    x, m = task.inputs(pool, np.array([0, 1, 2]), None, cpu)
    assert x.shape == (3, 3, 32, 32) and m.shape == (3, 32, 32) and m.dtype == torch.long
    x1, m1 = task.inputs(pool, np.array([1]), None, cpu)  # sample 1 alone: the same draws
    assert torch.equal(x1[0], x[1]) and torch.equal(m1[0], m[1])
    task.set_epoch(0, 1)
    assert not torch.equal(task.inputs(pool, np.array([1]), None, cpu)[0][0], x[1])
    task.set_epoch(1, 0)
    assert not torch.equal(task.inputs(pool, np.array([1]), None, cpu)[0][0], x[1])
    # padding: a crop smaller than 32 (the 64 x 256 image at ratio 0.5 is 8 x 32) is padded with 0 / ignore
    for e in range(20):
        task.set_epoch(0, e)
        xe, me = task.inputs(pool, np.array([2]), None, cpu)
        rows = (me[0] == 255).all(dim=1)
        if rows.any():
            assert (xe[0][:, rows] == 0).all() and rows[-1]
            break
    else:
        raise AssertionError("no padded crop in 20 epochs")


def test_resize_pipeline_labels_take_the_input_size_whatever_the_first_mask():
    enc = TinySegEncoder(32)
    recipe = resolve({**get_recipe("cpu_segmenter"), "image_size": 32})
    task = SegTask(enc, recipe, 11, [str(i) for i in range(11)])
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, s + (3,), dtype=np.uint8) for s in [(20, 20), (48, 64), (90, 30)]]
    masks = [rng.integers(0, 11, s, dtype=np.uint8) for s in [(20, 20), (48, 64), (90, 30)]]
    pool = Samples(np.arange(3), np.zeros(3, np.int64), imgs, masks, False)
    x, m = task.inputs(pool, np.arange(3), None, torch.device("cpu"))
    assert x.shape == (3, 3, 32, 32) and m.shape == (3, 32, 32)  # not the first mask's 20 x 20
