"""The finetuning library and its CLI: recipes, step planning, mIoU, the seg_digits stand-in, bad input, resume.

Mechanics tests (resume, bad input) use a tiny from-scratch timm ViT; accuracy and the 2-process run use
the real pretrained encoder (tests/test_finetune_real.py).
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_suite.errors import BadInputError, MissingDataError, UnknownNameError
from bench_suite.finetune import augment, backbone, launch, loop
from bench_suite.finetune.launch import finetune
from bench_suite.finetune.recipes import available, get_recipe, plan_batches, resolve, resolve_named, step_bounds
from bench_suite.finetune.segmenter import Segmenter, confusion_matrix, iou_from_confusion
from bench_suite.profiles import load_profile
from launchers import finetune as finetune_cli

ROOT = Path(__file__).resolve().parents[1]


class TinyEncoder:
    """A 4-block ViT from scratch with the encoder interface: for tests about mechanics only."""

    name = "tiny_vit"

    def __init__(self, size=32):
        import timm

        torch.manual_seed(1234)
        self.size = size
        self.model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8, depth=4,
                                       num_classes=0).eval()
        self.dim = self.model.num_features
        self.meta = {"name": self.name, "image_size": size}

    def preprocess(self, images):
        x = torch.as_tensor(np.asarray(images)).float() / 255.0
        x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - 0.5) / 0.25

    def backbone_for_finetune(self):
        m = copy.deepcopy(self.model).train()
        for p in m.parameters():
            p.requires_grad_(True)
        return m


@pytest.fixture(scope="module")
def tiny():
    return TinyEncoder()


FAST = {"epochs": 2, "batch_size": 16, "micro_batch_size": 8, "trainable_blocks": "all", "lr": 0.003,
        "crop_scale": None, "checkpoint_every": 1}


# --------------------------------------------------------------------------- mIoU
def test_miou_matches_hand_computed_confusion_matrix():
    gt = np.array([[0, 0, 1, 1],
                   [0, 255, 1, 2],
                   [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 2, 2],
                     [2, 0, 0, 1]])
    conf = confusion_matrix(torch.as_tensor(pred), torch.as_tensor(gt), 3, ignore_index=255)
    # rows = label, cols = prediction, the two 255 pixels skipped
    hand = np.array([[2, 1, 0],
                     [0, 3, 1],
                     [1, 0, 2]])
    assert np.array_equal(conf, hand)
    res = iou_from_confusion(conf)
    # IoU_c = TP / (row + col - TP): class 0: 2/(3+3-2), class 1: 3/(4+4-3), class 2: 2/(3+3-2)
    expected = np.array([2 / 4, 3 / 5, 2 / 4])
    assert np.allclose(res["iou"], expected)
    assert res["miou"] == pytest.approx(expected.mean())
    assert res["aacc"] == pytest.approx(7 / 10)


def test_miou_accumulates_over_the_split_and_skips_absent_classes():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 3, (5, 7)) for _ in range(4)]
    preds = [rng.integers(0, 3, (5, 7)) for _ in range(4)]
    total = sum(confusion_matrix(torch.as_tensor(p), torch.as_tensor(g), 4) for p, g in zip(preds, gts))
    whole = confusion_matrix(torch.as_tensor(np.stack(preds)), torch.as_tensor(np.stack(gts)), 4)
    assert np.array_equal(total, whole)
    res = iou_from_confusion(total)
    assert np.isnan(res["iou"][3])  # class 3 neither labelled nor predicted: left out of the mean
    assert res["miou"] == pytest.approx(np.nanmean(res["iou"]))
    # mean of per-image mIoUs is NOT the standard metric; the split-level matrix is
    with pytest.raises(ValueError, match="label outside 0..3"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 4)


# --------------------------------------------------------------------------- recipes
def test_catalogue_recipes_resolve_and_paper_values():
    recipes = available()
    for name in recipes:
        resolve(recipes[name], where=name)
    paper = get_recipe("deit_finetune")
    assert (paper["optimizer"], paper["lr"], paper["momentum"], paper["weight_decay"], paper["batch_size"],
            paper["epochs"], paper["schedule"], paper["image_size"], paper["best_or_last"]) == \
        ("sgd", 0.001, 0.9, 0.0001, 512, 1000, "cosine", 224, "last")
    off = get_recipe("deit_finetune_official")
    assert (off["lr"], off["warmup_epochs"], off["label_smoothing"], off["drop_path"], off["eval_every"],
            off["best_or_last"]) == (0.01, 5, 0.1, 0.1, 50, "best")
    seg = get_recipe("segmenter_paper")
    assert (seg["lr"], seg["momentum"], seg["batch_size"], seg["schedule"], seg["epochs"]) == \
        (0.001, 0.9, 8, "poly", 127)
    from bench_suite.finetune.recipes import epochs_for

    imnet = get_recipe("deit_finetune_imagenet")
    assert epochs_for(imnet, 0.01) == 1000 and epochs_for(imnet, 0.05) == 300
    # through the paper profile (which no longer repeats the catalogue entry): the same recipe
    prof = get_recipe("deit_finetune", "paper")
    assert prof == paper
    assert (prof["lr"], prof["batch_size"], prof["epochs"]) == (0.001, 512, 1000)


def test_recipe_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown recipe 'nope'.*cpu_finetune"):
        get_recipe("nope")
    with pytest.raises(BadInputError, match="unknown field.*lrr"):
        resolve({"kind": "finetune", "lrr": 0.1})
    with pytest.raises(BadInputError, match="trainable_blocks"):
        resolve({"kind": "finetune", "trainable_blocks": "some"})
    f = tmp_path / "r.yaml"
    f.write_text("recipes:\n  mine: {kind: finetune, lr: 0.5, epochs: 3}\n")
    assert get_recipe("mine", f)["lr"] == 0.5
    with pytest.raises(MissingDataError, match="recipes file not found"):
        get_recipe("mine", tmp_path / "absent.yaml")


def test_resolve_named_layers_catalogue_profile_overrides():
    cat = resolve_named("cpu_finetune")
    # a profile entry of a catalogue name overrides it field by field
    prof = {"cpu_finetune": {"epochs": 3}, "probe": {"kind": "linear_probe", "C": 10.0}}
    got = resolve_named("cpu_finetune", prof)
    assert got == {**cat, "epochs": 3}
    # a profile may define a new name; defaults are filled in
    assert resolve_named("probe", prof) == {"kind": "linear_probe", "C": 10.0, "max_iter": 1000}
    # then the overrides (--set), checked
    assert resolve_named("cpu_finetune", prof, {"lr": 0.5})["lr"] == 0.5
    with pytest.raises(BadInputError, match="with overrides.*lr"):
        resolve_named("cpu_finetune", prof, {"lr": -1})
    # an entry of another kind replaces the catalogue entry instead of merging into it
    seg = resolve_named("cpu_finetune", {"cpu_finetune": {"kind": "seg_finetune", "decoder": "linear"}})
    assert seg["kind"] == "seg_finetune" and seg["lr"] == resolve({"kind": "seg_finetune"})["lr"]
    with pytest.raises(UnknownNameError, match="unknown recipe 'nope'.*probe"):
        resolve_named("nope", prof)
    # the shipped profiles keep only real differences and profile-only recipes
    for name in ("cpu", "paper"):
        recipes = load_profile(name).recipes
        for rname, entry in recipes.items():
            if rname in available():
                assert resolve_named(rname, recipes) != resolve_named(rname), f"{name}: {rname} repeats the catalogue"


@pytest.mark.parametrize("n,batch,world", [(101, 24, 2), (10, 512, 2), (49, 16, 3), (17, 16, 2), (1, 8, 2)])
def test_steps_cover_every_sample_once(n, batch, world):
    bounds = step_bounds(n, min(batch, n), world)
    covered = np.concatenate([np.arange(lo, hi) for lo, hi in bounds])
    assert np.array_equal(covered, np.arange(n))
    assert all(hi - lo >= min(world, n) for lo, hi in bounds)
    plan = plan_batches({"batch_size": batch, "micro_batch_size": 5}, n, world)
    assert plan["global_batch"] == min(batch, n)
    assert plan["micro_batch"] * plan["accum_steps"] * world >= plan["global_batch"]


def test_crop_params_depend_only_on_seed_epoch_id():
    ids = np.array([3, 9, 27, 81])
    a = augment.crop_flip_params(ids, 0, 1, [0.5, 1.0], True)
    b = augment.crop_flip_params(ids[::-1], 0, 1, [0.5, 1.0], True)[::-1]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, augment.crop_flip_params(ids, 0, 2, [0.5, 1.0], True))
    assert augment.crop_flip_params(ids, 0, 1, None, False) is None
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    ident = np.array([[1, 1, 0, 0], [-1, 1, 0, 0]], np.float32)
    y, m = augment.apply_crop_flip(x, ident, torch.arange(2 * 64).reshape(2, 8, 8) % 5)
    assert torch.allclose(y[0], x[0], atol=1e-4) and torch.allclose(y[1], x[1].flip(-1), atol=1e-4)
    assert torch.equal(m[1], (torch.arange(2 * 64).reshape(2, 8, 8) % 5)[1].flip(-1))


def test_trainable_blocks_freeze_the_rest(tiny):
    bb = tiny.backbone_for_finetune()
    info = backbone.set_trainable(bb, 1)
    assert info == {"trainable_blocks": 1, "total_blocks": 4}
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert any(n.startswith("blocks.3.") for n in trainable) and "norm.weight" in trainable
    assert not any(n.startswith(("blocks.0.", "blocks.2.", "patch_embed", "pos_embed", "cls_token")) for n in trainable)
    backbone.set_drop_path(bb, 0.3)
    assert bb.blocks[0].drop_path1.__class__.__name__ == "Identity"
    assert bb.blocks[3].drop_path1.drop_prob == pytest.approx(0.3)


def test_segmenter_decoders_shapes(tiny):
    for decoder in ("linear", "mask_transformer"):
        model = Segmenter(tiny.backbone_for_finetune(), tiny.dim, 5, decoder)
        out = model(torch.zeros(2, 3, 32, 32))
        assert out.shape == (2, 5, 4, 4)


# --------------------------------------------------------------------------- seg_digits
def test_seg_digits_stand_in():
    from bench_suite.data.sets import seg_digits
    from bench_suite.data.registry import get_dataset

    spec = get_dataset("seg_digits")
    assert spec.task == "seg" and "STAND-IN" in spec.description
    raw = seg_digits.build_split("train", n=40)
    again = seg_digits.build_split("train", n=40)
    assert np.array_equal(raw.images, again.images) and np.array_equal(raw.masks, again.masks)
    assert raw.images.shape == raw.masks.shape == (40, 48, 48) and raw.images.dtype == np.uint8
    assert raw.classes[0] == "background" and len(raw.classes) == 11
    m, im = raw.masks, raw.images
    assert set(np.unique(m)) <= set(range(11)) | {255}
    assert np.all(m[im == 0] == 0)  # no stroke -> background
    assert np.all(m[(im > 0) & (im < seg_digits.FG_THRESHOLD)] == 255)  # anti-aliased rim -> ignore
    assert np.all((m[im >= seg_digits.FG_THRESHOLD] >= 1) & (m[im >= seg_digits.FG_THRESHOLD] <= 10))
    for i in range(40):  # the image label is the class covering most pixels
        counts = np.bincount(m[i][(m[i] > 0) & (m[i] < 255)], minlength=11)
        assert counts[raw.labels[i]] == counts[1:].max()
    test = seg_digits.build_split("test", n=5)
    assert not np.array_equal(test.images, raw.images[:5])


# --------------------------------------------------------------------------- bad input, before training
@pytest.fixture()
def no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(launch, "train", boom)


def _sel(tmp_path, ids, name="sel.json"):
    from bench_suite.methods.selection import Selection

    path = tmp_path / name
    Selection(np.asarray(ids), "random", len(ids), 0).save(path)
    return path


def test_bad_input_fails_before_training(tmp_path, digits_shards, digits_test_shards, tiny, no_training):
    run = dict(encoder=tiny, seed=0, out=tmp_path / "out", distributed=False, progress=False, overrides=FAST)
    with pytest.raises(UnknownNameError, match="unknown recipe 'no_such_recipe'"):
        finetune("cls", digits_shards, digits_test_shards, [1, 2], "no_such_recipe", **run)
    with pytest.raises(BadInputError, match="empty selection"):
        finetune("cls", digits_shards, digits_test_shards, _sel(tmp_path, []), "cpu_finetune", **run)
    with pytest.raises(BadInputError, match=r"not in the dataset.*5000"):
        finetune("cls", digits_shards, digits_test_shards, _sel(tmp_path, [1, 5000]), "cpu_finetune", **run)
    with pytest.raises(MissingDataError, match="checkpoint not found"):
        finetune("cls", digits_shards, digits_test_shards, [1, 2], "cpu_finetune", resume_from=tmp_path / "x.pt", **run)
    with pytest.raises(MissingDataError, match="weights not found"):
        finetune("cls", digits_shards, digits_test_shards, [1, 2], "cpu_finetune", weights=tmp_path / "w.pth", **run)
    with pytest.raises(MissingDataError, match="selection file not found"):
        finetune("cls", digits_shards, digits_test_shards, tmp_path / "nosel.json", "cpu_finetune", **run)
    with pytest.raises(BadInputError, match="--task seg needs segmentation shards"):
        finetune("seg", digits_shards, digits_test_shards, [1, 2], "cpu_segmenter", **run)
    with pytest.raises(BadInputError, match="is for --task seg"):
        finetune("cls", digits_shards, digits_test_shards, [1, 2], "cpu_segmenter", **run)
    with pytest.raises(BadInputError, match="duplicate"):
        finetune("cls", digits_shards, digits_test_shards, [1, 1], "cpu_finetune", **run)


def test_ids_missing_from_a_subset_pool_fail_before_training(tmp_path, digits_test_shards, tiny, no_training):
    from bench_suite.data.shards import read_all, write_shards

    pool = tmp_path / "pool"
    write_shards("digits", "train", pool, limit=300, subset_seed=0, shard_size=100)
    present = read_all(pool)[0]
    absent = int(np.setdiff1d(np.arange(present.min(), present.max()), present)[0])  # inside the id range
    with pytest.raises(BadInputError, match=f"not in the dataset.*{absent}"):
        finetune("cls", pool, digits_test_shards, [int(present[0]), absent], "cpu_finetune", encoder=tiny,
                 distributed=False, progress=False, overrides=FAST)


def test_cli_one_line_errors(tmp_path, digits_shards, digits_test_shards, cli_error):
    def cli(*args):
        return cli_error(finetune_cli.main, ["--dataset-shards", digits_shards, "--test-shards", digits_test_shards,
                                             "--encoder", "tiny", "--out", tmp_path / "o", *args], cwd=ROOT)

    assert "unknown recipe 'nope'" in cli("--selection", str(_sel(tmp_path, [1])), "--recipe", "nope")
    assert "empty selection" in cli("--selection", str(_sel(tmp_path, [], "e.json")), "--recipe", "cpu_finetune")
    assert "not in the dataset" in cli("--selection", str(_sel(tmp_path, [99999], "b.json")), "--recipe",
                                       "cpu_finetune")
    assert "checkpoint not found" in cli("--selection", str(_sel(tmp_path, [1])), "--recipe", "cpu_finetune",
                                         "--resume", str(tmp_path / "gone.pt"))


# --------------------------------------------------------------------------- resume
def test_interrupted_run_resumes_to_the_same_result(tmp_path, digits_shards, digits_test_shards, tiny, monkeypatch):
    ids = np.random.default_rng(0).choice(1297, 40, replace=False)
    rec = {**FAST, "epochs": 3, "crop_scale": [0.6, 1.0]}
    common = dict(encoder=tiny, seed=3, distributed=False, progress=False, overrides=rec)
    full = finetune("cls", digits_shards, digits_test_shards, ids, "cpu_finetune", out=tmp_path / "full", **common)
    assert full["epochs_this_run"] == 3 and full["resumed_from_epoch"] is None
    assert torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["epoch"] == 3  # kept by default
    # a caller that keeps only the metrics (the tables' recipe_fn) gets no checkpoint after the last epoch
    last = finetune("cls", digits_shards, digits_test_shards, ids, "cpu_finetune", out=tmp_path / "last",
                    last_checkpoint=False, **common)
    assert torch.load(tmp_path / "last" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert last["top1"] == full["top1"] and [h["loss"] for h in last["history"]] == [h["loss"] for h in full["history"]]

    real = loop.crop_flip_params

    def crash_in_epoch_3(ids_, seed, epoch, *a):
        if epoch == 2:
            raise KeyboardInterrupt("simulated preemption")
        return real(ids_, seed, epoch, *a)

    monkeypatch.setattr(loop, "crop_flip_params", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        finetune("cls", digits_shards, digits_test_shards, ids, "cpu_finetune", out=tmp_path / "cut", **common)
    assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.setattr(loop, "crop_flip_params", real)
    resumed = finetune("cls", digits_shards, digits_test_shards, ids, "cpu_finetune", out=tmp_path / "cut", **common)
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_this_run"] == 1
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-6)
    assert resumed["top1"] == pytest.approx(full["top1"], abs=1e-9)
    saved = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert saved["top1"] == resumed["top1"] and saved["seed"] == 3 and saved["recipe_name"] == "cpu_finetune"
    # a checkpoint made with other inputs is refused, not silently reused
    with pytest.raises(BadInputError, match="different inputs"):
        finetune("cls", digits_shards, digits_test_shards, ids[:-1], "cpu_finetune", out=tmp_path / "cut", **common)


@pytest.mark.slow
def test_cli_dataset_name_makes_the_profiles_shards(tmp_path):
    """``--dataset NAME``: the profile's pool/test shards are written under --work and the run evaluates on them."""
    import yaml

    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({
        "name": "t", "encoder": {"name": "efficientnet_lite0"}, "seeds": [0], "tables": {}, "recipes": {},
        "datasets": {"digits": {"pool": {"split": "train"}, "test": {"split": "test", "limit": 200}}}}))
    sel = _sel(tmp_path, list(range(0, 60, 3)))
    cmd = [sys.executable, "-m", "launchers.finetune", "--dataset", "digits", "--profile", str(prof), "--work",
           str(tmp_path / "w"), "--selection", str(sel), "--recipe", "cpu_linear_head", "--recipes-file", "cpu",
           "--encoder", "efficientnet_lite0", "--image-size", "32", "--set", "epochs=2", "--quiet",
           "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n_train"] == 20 and m["n_test"] == 200 and 0 <= m["top1"] <= 100
    assert len(list((tmp_path / "w" / "shards").glob("digits-pool-*"))) == 1
    both = subprocess.run(cmd + ["--dataset-shards", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert both.returncode == 2 and "not both" in both.stderr


@pytest.mark.parametrize("n,repeats,expected", [(40, 1, 40), (40, 3, 120), (100, 3, 256), (600, 3, 512)])
def test_repeated_augmentation_epoch_follows_deit_rasampler(n, repeats, expected):
    """DeiT's RASampler: each sample ``repeats`` times in a row, cut to max(1, n // 256) * 256 (and to what
    there is); without repeats, a plain permutation."""
    order = loop.epoch_order(n, 5, 2, repeats)
    assert len(order) == loop.epoch_length(n, repeats) == expected
    if repeats == 1:
        assert sorted(order) == list(range(n))
    else:  # runs of `repeats` equal positions, each position at most `repeats` times
        assert all(len(set(order[i:i + repeats])) == 1 for i in range(0, len(order) - repeats + 1, repeats))
        assert np.bincount(order).max() == repeats
    assert np.array_equal(order, loop.epoch_order(n, 5, 2, repeats))  # the same on every process
    assert not np.array_equal(order, loop.epoch_order(n, 5, 3, repeats))


def test_repeated_augmentation_trains_each_copy(tmp_path, digits_shards, digits_test_shards, tiny, monkeypatch):
    """With ``repeated_aug: 3`` an epoch of 30 samples trains on 90, each id three times (the loop's coverage
    check counts them), in more optimiser steps than without."""
    trace = tmp_path / "trace"
    monkeypatch.setenv("BENCH_SUITE_TRACE_IDS", str(trace))
    ids = np.random.default_rng(1).choice(1297, 30, replace=False)
    out = finetune("cls", digits_shards, digits_test_shards, ids, "cpu_finetune", out=tmp_path / "ra", encoder=tiny,
                   seed=0, distributed=False, progress=False, overrides={**FAST, "epochs": 1, "repeated_aug": 3})
    seen = json.loads((trace / "rank0-epoch1.json").read_text())
    assert len(seen) == 90 and np.bincount(seen).max() == 3 and set(seen) == set(ids.tolist())
    assert out["history"][0]["samples"] == 90
