"""The paper profile, end to end on the CPU: every table, 1 to 7, through ``run.py --table all``.

The datasets are tiny copies in their official on-disk formats (``official_formats``); the encoders are
random stand-ins saved in their release checkpoint formats (DINO DeiT-S/16, iBOT DeiT-S/16, DINO ResNet-50).
The profile extends ``paper`` and trims only sizes: one seed, one ratio per dataset, 32 px images (64 px for
Table 2), one epoch, fewer ActiveFT iterations and VAE epochs. Every code path of the paper's settings runs:
the DeiT finetuning recipes, ImageNet's M / T, the AL methods' protocol and task model, the Segmenter recipe,
Table 4's two encoders and ResNet-50's recipe. What the full grids and values are is ``test_plan.py``'s job.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from bench_suite import run as run_py
from official_formats import write_ade20k, write_cifar, write_imagenet

TRIM = {
    "extends": "paper",
    "seeds": [0],
    "encoder": {"image_size": 32},
    "extraction": {"batch_size": 64},
    "methods": {"activeft": {"iters": 20}, "vaal": {"vae_epochs": 1, "vae_width": 16},
                # each round's finetuning (al_deit_round) at the store's image size, one epoch; ALFA-Mix's learned
                # alpha with a cap step of 0.5 instead of 1/32 (an untrained model's search for label-changing
                # mixtures then ends after 2 steps, not 32)
                **{m: {"task_recipe_fields": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8,
                                              "image_size": None},
                       **({"vae_epochs": 1, "vae_width": 16} if m == "tavaal" else {}),
                       **({"alpha_cap": 0.5} if m == "alfamix" else {})}
                   for m in ("coreset", "learnloss", "alfamix", "tavaal")}},
    # the paper's ImageNet rounds train 300 epochs (datasets.imagenet.methods): one here
    "datasets": {"imagenet": {"methods": {m: {"task_epochs": 1} for m in ("coreset", "learnloss", "alfamix",
                                                                           "tavaal")}}},
    "recipes": {
        "deit_finetune": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8, "image_size": 32, "eval_every": 0},
        "deit_finetune_imagenet": {"epochs_by_ratio": {0.01: 1, 0.05: 1}, "batch_size": 8, "micro_batch_size": 8,
                                   "image_size": 32, "eval_every": 0},
        # 64 px: ResNet-50's last stage keeps 2x2 positions, so batch-norm trains on a one-image batch (at 32 px it
        # is 1x1 and a round-0 task model on one label cannot train; at the paper's 224 px it is 7x7)
        "resnet50_finetune_mmcls": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8, "image_size": 64},
        "segmenter_paper": {"epochs": 1, "batch_size": 2, "micro_batch_size": 2, "image_size": 64,
                            "scale": [256, 64], "slide_stride": 42},  # the 2048 x 512 / 512 / 341 protocol / 8
    },
    "tables": {
        "1": {"cells": {"cifar10": [0.02], "cifar100": [0.02], "imagenet": [0.05]}},
        "2": {"encoder": {"image_size": 64}, "cells": {"ade20k": [0.1]}},
        "3": {"cells": {"cifar100": [0.02]}},
        "4": {"encoders": [
            {"label": "DeiT-Small pretrained with iBOT", "encoder": {"name": "ibot_vits16", "image_size": 32,
                                                                     "pooling": "cls"}},
            {"label": "ResNet-50 pretrained with DINO", "encoder": {"name": "dino_resnet50", "image_size": 64,
                                                                   "pooling": "gap"},
             "recipe": "resnet50_finetune_mmcls"}],
              "cells": {"cifar10": [0.02]}},
        "5": {"cells": {"cifar100": [0.02]}},
        "6": {"cells": {"cifar10": [0.02]}},
        "7": {"cells": {"imagenet": [0.05]}},
    },
}


def _standin_checkpoints(cache):
    """Random DeiT-S/16 and ResNet-50 weights in the release formats the encoders load."""
    import timm
    import torchvision

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, weight_init="skip")
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0.0, 0.02)
    sd = vit.state_dict()
    torch.save(sd, cache / "dino_deitsmall16_pretrain.pth")
    torch.save({"state_dict": {**sd, "masked_embed": torch.zeros(1, 384)}}, cache / "ibot_vits16_checkpoint_teacher.pth")
    r50 = torchvision.models.resnet50(weights=None)
    torch.save({k: v for k, v in r50.state_dict().items() if not k.startswith("fc.")}, cache / "dino_resnet50_pretrain.pth")


@pytest.mark.slow
def test_paper_profile_runs_every_table(tmp_path, monkeypatch):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    cache.mkdir()
    write_cifar(src / "cifar-10-python.tar.gz", fine=False, n_per_batch=30)  # 150 train, 30 test
    write_cifar(src / "cifar-100-python.tar.gz", fine=True, n_per_batch=100)
    write_imagenet(src / "imagenet", classes=("n01", "n02", "n03"), n_train=20, n_val=4, size=(40, 48))
    write_ade20k(src / "ADEChallengeData2016", n_train=40, n_val=4, size=(48, 64))
    _standin_checkpoints(cache)
    monkeypatch.setenv("BENCH_SUITE_CACHE", str(cache))
    profile = tmp_path / "paper_tiny.yaml"
    profile.write_text(yaml.safe_dump(TRIM))
    out = tmp_path / "results"
    argv = ["--table", "all", "--profile", str(profile), "--work", str(tmp_path / "work"), "--out", str(out),
            "--quiet", "--source", f"cifar10={src / 'cifar-10-python.tar.gz'}",
            "--source", f"cifar100={src / 'cifar-100-python.tar.gz'}", "--source", f"imagenet={src / 'imagenet'}",
            "--source", f"ade20k={src}"]
    assert run_py.main(argv) == 0
    index = (out / "README.md").read_text()
    for n in "1234567":
        md = (out / f"table{n}.md").read_text()
        assert "paper_tiny" in md and "not the paper's setting" in md, n
        assert f"table{n}.md" in index
    t1 = json.loads((out / "table1.json").read_text())
    cells = {(c["dataset"], c["method"]): c for c in t1["cells"]}
    assert len(cells) == 3 * 9
    for (dataset, method), c in cells.items():
        assert c.get("skipped") or 0 <= c["top1"] <= 100, (dataset, method)
    # ImageNet's own ActiveFT settings (datasets.imagenet.methods: M, T = 100) win over the profile-wide T = 20
    imagenet = cells[("imagenet", "activeft")]
    assert imagenet["method_config"]["subset"] == 100_000 and imagenet["selection_info"]["iterations"] == 100
    assert cells[("cifar100", "coreset")]["selection_info"]["oracle_queries"] == cells[("cifar100", "coreset")]["budget"]
    t4 = json.loads((out / "table4.json").read_text())
    assert [p["encoder"]["name"] for p in t4["parts"]] == ["ibot_vits16", "dino_resnet50"]
    assert all("top1" in c or c.get("skipped") for p in t4["parts"] for c in p["cells"])
    t2 = json.loads((out / "table2.json").read_text())
    assert all(0 <= c["miou"] <= 100 for c in t2["cells"])
    md1 = (out / "table1.md").read_text()
    assert "ActiveFT on cifar10, cifar100: `iters` 20 (original 300)" in md1
    assert "VAAL: `vae_width` 16 (original 128), `vae_epochs` 1 (original 100)" in md1
