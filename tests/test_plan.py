"""The paper profile's plan (``run.py --dry-run --json``) checked against the paper, point by point.

Every expected value below is written from the paper (../shared/paper: Sec. 3.5, 4.1-4.3, Tables 1-7,
appendix A-B) or, where the paper is silent, from the authors' released code, as the comment says. The plan
is built without any data (the official split sizes), so this runs anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_suite.profiles import load_profile
from bench_suite.run import main as run_main
from bench_suite.tables.preflight import plan

N_POOL = {"cifar10": 50_000, "cifar100": 50_000, "imagenet": 1_281_167, "ade20k": 20_210}

# Table 1 (and Sec. 4.1): the sampling ratios per dataset, the rows
TABLE1_RATIOS = {"cifar10": [0.005, 0.01, 0.02], "cifar100": [0.01, 0.02, 0.05, 0.1], "imagenet": [0.01, 0.05]}
TABLE1_METHODS = {"random", "fds", "kmeans", "coreset", "vaal", "learnloss", "tavaal", "alfamix", "activeft"}
# Appendix B.3: the AL methods' initial random set and per-round batch, as a fraction of the pool
AL_INIT = {"cifar10": 0.005, "cifar100": 0.01, "imagenet": 0.025}
# Sec. 4.1: tau 0.07, Adam lr 1e-3; T = 300 (released ActiveFT_CIFAR.py); ImageNet: M = 100,000 per iteration
# (Sec. 3.5) and T = 100 (released ActiveFT_ImageNet.py; Table 7: converged at 100)
ACTIVEFT = {"cifar10": {"temperature": 0.07, "lr": 0.001, "iters": 300, "subset": 0},
            "cifar100": {"temperature": 0.07, "lr": 0.001, "iters": 300, "subset": 0},
            "imagenet": {"temperature": 0.07, "lr": 0.001, "iters": 100, "subset": 100_000}}
# Appendix B.2: DeiT-S finetuning, SGD lr 1e-3 wd 1e-4 momentum 0.9, batch 512, cosine, 224 px;
# CIFAR 1000 epochs; ImageNet 1000 epochs at 1%, 300 at 5%
DEIT = {"optimizer": "sgd", "lr": 0.001, "weight_decay": 0.0001, "momentum": 0.9, "batch_size": 512,
        "schedule": "cosine", "image_size": 224}
EPOCHS = {("cifar10", None): 1000, ("cifar100", None): 1000, ("imagenet", 0.01): 1000, ("imagenet", 0.05): 300}
# Appendix B.2, Table 4(b): ResNet-50 with mmclassification, SGD lr 1e-2 wd 1e-4 momentum 0.9, batch 512,
# cosine, 100 epochs
RESNET = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0001, "momentum": 0.9, "batch_size": 512,
          "schedule": "cosine", "epochs": 100}
# Appendix B.2, Table 2: Segmenter, SGD lr 1e-3 momentum 0.9, batch 8, poly decay, 127 epochs
SEGMENTER = {"optimizer": "sgd", "lr": 0.001, "momentum": 0.9, "batch_size": 8, "schedule": "poly", "epochs": 127}
# ... with mmsegmentation's Segmenter ADE20K data protocol: random resize 0.5-2.0 of 2048 x 512, 512 crops with
# cat_max_ratio 0.75, flip, photometric distortion; sliding-window evaluation 512 / stride 341
SEG_PIPELINE = {"pipeline": "mmseg", "image_size": 512, "scale": [2048, 512], "ratio_range": [0.5, 2.0],
                "cat_max_ratio": 0.75, "flip_prob": 0.5, "photometric": True, "slide_stride": 341}


@pytest.fixture(scope="module")
def paper_plan(tmp_path_factory):
    profile = load_profile("paper")
    work = tmp_path_factory.mktemp("work")
    return {t: plan(profile, t, work, {}) for t in ["1", "2", "3", "4", "5", "6", "7"]}


def _grid(cells):
    return {d: sorted({c["ratio"] for c in cells if c["dataset"] == d}) for d in {c["dataset"] for c in cells}}


def test_table1_grid_seeds_and_budgets(paper_plan):
    cells = paper_plan["1"]
    assert _grid(cells) == TABLE1_RATIOS
    assert {c["method"] for c in cells} == TABLE1_METHODS
    assert {c["seed"] for c in cells} == {0, 1, 2}  # "mean and std over three trials"
    assert len(cells) == 9 * 9 * 3
    for c in cells:
        assert c["pool_size"] == N_POOL[c["dataset"]] and c["pool_size_from"] == "official split size"
        assert c["budget"] == int(c["ratio"] * N_POOL[c["dataset"]] + 1e-9)  # floor, as the released code
        assert c["state"] == "not keyed" and c["cached"] is False
    imagenet_1 = next(c for c in cells if c["dataset"] == "imagenet" and c["ratio"] == 0.01)
    assert imagenet_1["budget"] == 12_811


def test_active_learning_protocol(paper_plan):
    al = [c for c in paper_plan["1"] if not c["label_free"]]
    assert {c["method"] for c in al} == {"coreset", "vaal", "learnloss", "tavaal", "alfamix"}
    for c in al:
        frac = AL_INIT[c["dataset"]]
        assert c["options"]["init_ratio"] == frac and c["options"].get("batch_ratio") in (None, frac)
        assert c["al_initial_set"] == int(frac * N_POOL[c["dataset"]] + 1e-9)
        # "-" in the paper's Table 1 exactly where the budget does not exceed the initial set
        assert ("skipped" in c) == (c["budget"] <= c["al_initial_set"])
    skipped = {(c["dataset"], c["ratio"]) for c in al if "skipped" in c}
    assert skipped == {("cifar10", 0.005), ("cifar100", 0.01), ("imagenet", 0.01)}


def test_active_learning_task_models(paper_plan):
    """Appendix B.3: CoreSet, LearnLoss and ALFA-Mix select with DINO DeiT-S, finetuned in every round (B.2's
    optimiser); VAAL and TA-VAAL keep their VAE at the original width 128 and 100 epochs; ALFA-Mix runs the
    authors' main command (learned alpha, cap 0.03125)."""
    cells = [c for t in ("1", "3") for c in paper_plan[t]]
    for c in cells:
        if c["method"] in ("coreset", "learnloss", "alfamix", "tavaal"):
            assert c["task_model"]["model"] == "finetune", c["method"]
            recipe = c["task_model"]["recipe"]
            assert {k: recipe[k] for k in DEIT} == DEIT and recipe["trainable_blocks"] == "all"
            # B.2's epochs for the labelled set's size: 1000 on CIFAR, ImageNet's rule (>= 2.5%) 300
            assert recipe["epochs"] == (300 if c["dataset"] == "imagenet" else 1000)
        if c["method"] in ("vaal", "tavaal"):
            assert c["options"]["vae_width"] == 128 and c["options"]["vae_epochs"] == 100
        if c["method"] == "alfamix":
            assert c["options"]["alpha_mode"] == "learned" and c["options"]["alpha_cap"] == 0.03125


def test_activeft_settings(paper_plan):
    for table in ("1", "3", "5"):
        for c in paper_plan[table]:
            if c["method"] == "activeft" and c["row"] in ("ActiveFT (ours)", "Update"):
                opts = c["options"]
                assert {k: opts[k] for k in ACTIVEFT[c["dataset"]]} == ACTIVEFT[c["dataset"]], (table, c["dataset"])
                assert opts["objective"] == "official" and opts["init"] == "random"
                assert opts["device"] == "auto" and c["device"] == "cpu"  # auto: the rank's GPU, else the CPU


def test_finetuning_recipes(paper_plan):
    for table in ("1", "3", "5", "6", "7"):
        for c in paper_plan[table]:
            assert {k: c["recipe"][k] for k in DEIT} == DEIT, table
            key = (c["dataset"], c["ratio"] if c["dataset"] == "imagenet" else None)
            assert c["epochs"] == EPOCHS[key], (table, key)
            assert c["recipe"]["best_or_last"] == "last"  # the paper reports the final model


def test_table2_segmenter_protocol(paper_plan):
    cells = paper_plan["2"]
    assert _grid(cells) == {"ade20k": [0.05, 0.1]}
    assert {c["method"] for c in cells} == {"random", "fds", "kmeans", "activeft"}
    for c in cells:
        assert c["recipe"]["kind"] == "seg_finetune" and c["recipe"]["decoder"] == "mask_transformer"
        assert {k: c["recipe"][k] for k in SEGMENTER} == SEGMENTER
        assert {k: c["recipe"][k] for k in SEG_PIPELINE} == SEG_PIPELINE
        assert c["encoder"] == {"name": "dino_vits16", "image_size": 224, "pooling": "cls+mean",
                                "weights": "dino_deitsmall16_pretrain.pth"}  # Sec. 4.2: CLS + mean patch token


def test_table3_to_7_grids(paper_plan):
    assert _grid(paper_plan["3"]) == {"cifar100": [0.02, 0.05, 0.1]}
    assert {c["method"] for c in paper_plan["3"]} == {"kmeans", "coreset", "vaal", "learnloss", "activeft"}
    t4 = paper_plan["4"]
    assert _grid(t4) == {"cifar10": [0.005, 0.01, 0.02]}
    assert {c["method"] for c in t4} == {"random", "coreset", "learnloss", "vaal", "activeft"}
    by_encoder = {c["encoder"]["name"]: c for c in t4}
    assert set(by_encoder) == {"ibot_vits16", "dino_resnet50"}
    assert {k: by_encoder["dino_resnet50"]["recipe"][k] for k in RESNET} == RESNET
    assert {k: by_encoder["ibot_vits16"]["recipe"][k] for k in DEIT} == DEIT
    assert _grid(paper_plan["5"]) == {"cifar100": [0.02, 0.05]}
    rows5 = {c["row"]: c["options"] for c in paper_plan["5"]}
    assert rows5["No-Update"]["update_assign"] is False and rows5["S1 (no regularization)"]["regularizer"] == "none"
    assert rows5["S2 (InfoNCE)"]["regularizer"] == "infonce"
    assert _grid(paper_plan["6"]) == {"cifar10": [0.005, 0.01, 0.02]}
    assert sorted({c["options"]["temperature"] for c in paper_plan["6"]}) == [0.04, 0.07, 0.2, 0.5]
    assert _grid(paper_plan["7"]) == {"imagenet": [0.01]}
    t7 = paper_plan["7"]
    assert sorted({c["options"]["iters"] for c in t7}) == [0, 50, 75, 100, 200, 300]
    assert {c["options"]["subset"] for c in t7} == {100_000}
    assert {c["epochs"] for c in t7} == {1000}


def test_dry_run_json_cli(tmp_path, capsys):
    assert run_main(["--table", "6", "--profile", "paper", "--dry-run", "--json", "--work", str(tmp_path)]) == 0
    cells = json.loads(capsys.readouterr().out)
    assert len(cells) == 4 * 3 * 3 and not any(Path(tmp_path).iterdir())  # nothing written


def test_a_profile_recipe_entry_reaches_the_al_task_model(tmp_path):
    """A profile's ``recipes:`` entry overrides the catalogue wherever the name is used, the AL task model's
    round recipe included (through the method's ``task_recipe_fields``)."""
    f = tmp_path / "p.yaml"
    f.write_text("extends: paper\nrecipes:\n  al_deit_round: {epochs: 3, image_size: 32}\n"
                 "methods:\n  coreset: {task_recipe_fields: {image_size: 64}}\n")
    cells = plan(load_profile(str(f)), "3", tmp_path, {})
    recipes = {c["method"]: c["task_model"]["recipe"] for c in cells if "task_model" in c}
    assert recipes["learnloss"]["epochs"] == 3 and recipes["learnloss"]["image_size"] == 32
    assert recipes["coreset"]["epochs"] == 3 and recipes["coreset"]["image_size"] == 64  # the method's own wins
