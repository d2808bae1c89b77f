"""The mmsegmentation route (paper profile, Table 2): config, checkpoint conversion, subset file, errors, and a
real training + evaluation of the config on an ADE20K-format fixture.

The tests that need the [mmseg] extra (``bash setup.sh --with-mmseg``) skip without it, except in CI, which
installs it and sets BENCH_SUITE_REQUIRE_MMSEG=1: there they must run. The launcher's message when the extra
is missing is tested in every setting (the import of mmseg is made to fail in a subprocess).
"""

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_suite.errors import BadInputError, MissingDataError
from launchers.mmseg import train as mm

ROOT = Path(__file__).resolve().parents[1]
HAVE_MMSEG = importlib.util.find_spec("mmseg") is not None
needs_mmseg = pytest.mark.skipif(not HAVE_MMSEG and os.environ.get("BENCH_SUITE_REQUIRE_MMSEG") != "1",
                                 reason="needs the [mmseg] extra: bash setup.sh --with-mmseg")


def test_config_is_segmenter_vit_s_with_the_paper_schedule():
    cfg = runpy.run_path(str(mm.CONFIG))  # plain Python: no _base_ files
    bb, head = cfg["model"]["backbone"], cfg["model"]["decode_head"]
    assert cfg["model"]["type"] == "EncoderDecoder" and bb["type"] == "VisionTransformer"
    assert (bb["embed_dims"], bb["num_layers"], bb["num_heads"], bb["patch_size"], bb["with_cls_token"]) == \
        (384, 12, 6, 16, True)
    assert head["type"] == "SegmenterMaskTransformerHead" and head["num_classes"] == 150
    assert (head["in_channels"], head["embed_dims"], head["num_heads"], head["num_layers"]) == (384, 384, 6, 2)
    assert cfg["model"]["test_cfg"]["mode"] == "slide" and cfg["crop_size"] == (512, 512)
    assert cfg["model"]["test_cfg"]["stride"] == (341, 341)
    opt = cfg["optim_wrapper"]["optimizer"]
    assert (opt["type"], opt["lr"], opt["momentum"]) == ("SGD", 0.001, 0.9)
    sched = cfg["param_scheduler"][0]
    assert (sched["type"], sched["power"], sched["by_epoch"]) == ("PolyLR", 0.9, False)
    assert cfg["train_dataloader"]["batch_size"] * 8 == mm.PAPER_BATCH == 8
    assert cfg["train_dataloader"]["dataset"]["type"] == "ADE20KDataset"
    assert cfg["train_cfg"]["max_iters"] == 16000


def test_paper_iterations():
    assert mm.paper_iters(1010) == 16000  # 5% of ADE20K's 20,210 training images
    assert mm.paper_iters(2021) == 32000  # 10%
    assert mm.paper_iters(20) == 318


def test_dino_checkpoint_conversion_to_mmseg_keys():
    import timm

    state = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).state_dict()
    out = mm.convert_dino_vit({"model": state})
    assert "ln1.weight" in out and "norm.weight" not in out  # final norm
    assert out["patch_embed.projection.weight"].shape == (384, 3, 16, 16)
    assert out["layers.0.attn.attn.in_proj_weight"].shape == (1152, 384)
    assert out["layers.0.attn.attn.out_proj.weight"].shape == (384, 384)
    assert out["layers.11.ffn.layers.0.0.weight"].shape == (1536, 384)
    assert out["layers.11.ffn.layers.1.weight"].shape == (384, 1536)
    assert "layers.3.ln1.weight" in out and "layers.3.ln2.bias" in out
    assert "cls_token" in out and out["pos_embed"].shape == (1, 197, 384)
    assert not any(k.startswith(("blocks.", "head")) for k in out)
    assert len(out) == len(state)
    assert torch.equal(out["layers.5.attn.attn.in_proj_bias"], state["blocks.5.attn.qkv.bias"])


def _fake_ade(root: Path, n=12):
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            (root / "images" / split / f"ADE_{split[:5]}_{i + 1:08d}.jpg").write_bytes(b"")
    return root


def test_selected_ids_become_the_subset_file(tmp_path):
    root = _fake_ade(tmp_path / "ade")
    names = mm.ade20k_names(root)
    assert names[0] == "ADE_train_00000001" and len(names) == 12 and names == sorted(names)
    n = mm.write_split(names, np.array([7, 0, 3]), tmp_path / "split.txt")
    assert n == 3
    assert (tmp_path / "split.txt").read_text().split() == [names[0], names[3], names[7]]
    with pytest.raises(BadInputError, match="not ADE20K training images"):
        mm.write_split(names, np.array([1, 12]), tmp_path / "bad.txt")
    with pytest.raises(BadInputError, match="empty selection"):
        mm.write_split(names, np.array([], np.int64), tmp_path / "e.txt")
    with pytest.raises(MissingDataError, match="ADEChallengeData2016"):
        mm.ade20k_names(tmp_path / "nowhere")


def test_launcher_without_mmseg_says_how_to_install(tmp_path, cli_error):
    from bench_suite.methods.selection import Selection

    root = _fake_ade(tmp_path / "ade")
    Selection(np.array([0, 5]), "random", 2, 0).save(tmp_path / "sel.json")
    ckpt = tmp_path / "dino.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384)}, ckpt)
    # the launcher run as `python -m launchers.mmseg.train`, with `import mmseg` failing as if not installed
    hide = ("import runpy, sys; sys.modules['mmseg'] = None; sys.argv[0] = 'train'; "
            "runpy.run_module('launchers.mmseg.train', run_name='__main__')")
    base = [sys.executable, "-c", hide, "--ade20k", str(root), "--selection",
            str(tmp_path / "sel.json"), "--work-dir", str(tmp_path / "w")]
    res = subprocess.run([*base, "--dino-checkpoint", str(ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: the mmseg extra is not installed") and "setup.sh --with-mmseg" in res.stderr
    assert (tmp_path / "w" / "selected_train.txt").read_text().split() == ["ADE_train_00000001", "ADE_train_00000006"]
    line = cli_error(mm.main, [*base[3:], "--dino-checkpoint", tmp_path / "absent.pth"])  # in-process
    assert "checkpoint not found" in line


@needs_mmseg
def test_config_builds_with_mmengine(tmp_path):
    cfg = mm.build_config(ade20k=tmp_path, split_file=tmp_path / "s.txt", checkpoint=tmp_path / "c.pth",
                          work_dir=tmp_path / "w", iters=32000, seed=1, gpus=4, launcher="pytorch")
    assert cfg.train_cfg.max_iters == 32000 and cfg.param_scheduler[0].end == 32000
    assert cfg.train_dataloader.batch_size == 2 and cfg.model.pretrained == str(tmp_path / "c.pth")


def _dino_standin(path, depth=2):
    """Random weights in DINO's release format (timm-style ViT-S/16 keys, as dino_deitsmall16_pretrain.pth),
    cut to ``depth`` blocks."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=depth)
    torch.save(model.state_dict(), path)
    return path


@needs_mmseg
def test_mmseg_segmenter_trains_and_evaluates_on_ade20k(tmp_path):
    """The launcher trains the Segmenter config (its data pipeline included) for a few iterations on an
    ADE20K-format fixture, evaluates it by sliding windows, and writes metrics.json. Scaled for a CPU test:
    2 of ViT-S's 12 blocks, 1 decoder layer, 2 iterations of batch 1; the data pipeline is the config's own
    (512 crops of images resized from 2048 x 512), the one tests/test_seg_pipeline_mmseg.py compares with ours."""
    from bench_suite.methods.selection import Selection
    from seg_fixtures import write_ade20k_scenes

    root = write_ade20k_scenes(tmp_path / "ADEChallengeData2016")
    Selection(np.array([0, 2, 3]), "random", 3, 0).save(tmp_path / "sel.json")
    ckpt = _dino_standin(tmp_path / "dino_vits16_2blocks.pth")
    sets = ["model.backbone.num_layers=2", "model.backbone.drop_path_rate=0.0", "model.decode_head.num_layers=1"]
    for loader in ("train_dataloader", "test_dataloader"):
        sets += [f"{loader}.num_workers=0", f"{loader}.persistent_workers=false"]
    sets += ["default_hooks.logger.interval=1", "default_hooks.checkpoint.interval=1000"]
    argv = ["--ade20k", str(root), "--selection", str(tmp_path / "sel.json"), "--dino-checkpoint", str(ckpt),
            "--work-dir", str(tmp_path / "w"), "--iters", "2", "--seed", "1"]
    for item in sets:
        argv += ["--set", item]
    assert mm.main(argv) == 0
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and metrics["n_train"] == 3 and metrics["recipe"]["iters"] == 2
    assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["aacc"] <= 100
    assert len(metrics["per_class"]) == 150
    assert (tmp_path / "w" / "selected_train.txt").read_text().split() == \
        ["ADE_train_00000001", "ADE_train_00000003", "ADE_train_00000004"]
    # the converted DINO weights went into the backbone (the state dict the launcher wrote and mmseg loaded)
    conv = torch.load(tmp_path / "w" / "dino_vits16_mmseg.pth", weights_only=True)
    assert conv["layers.1.attn.attn.in_proj_weight"].shape == (1152, 384) and "layers.2.ln1.weight" not in conv
    log = "\n".join(p.read_text() for p in (tmp_path / "w").rglob("*.log"))
    assert "Iter(train) [2/2]" in log and "Iter(test) [2/2]" in log and "mIoU" in log
