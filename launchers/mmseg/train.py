"""Finetune Segmenter ViT-S/16 (DINO init) on a selected subset of ADE20K with mmsegmentation; write metrics.json.

    python -m launchers.mmseg.train --ade20k data/ade/ADEChallengeData2016 --selection sel.json \\
        --dino-checkpoint dino_deitsmall16_pretrain.pth --work-dir runs/seg-activeft-5pct-s0 --seed 0
    torchrun --nproc_per_node 8 -m launchers.mmseg.train ... --launcher pytorch      # 8 GPUs x batch 1

Optional extra: needs ``bash setup.sh --with-mmseg`` (the ``[mmseg]`` extra: mmsegmentation 1.2.2, mmengine
0.10.7, mmcv 2.1.0 - a prebuilt wheel, or compiled from source in ~14 min on 2 cores). Without it this launcher
stops with that instruction; the tables use the plain-torch Segmenter (``python -m launchers.finetune --task
seg``, library ``bench_suite.finetune``), which runs the same data pipeline (recipe segmenter_paper).
``--set KEY=VALUE`` overrides any config field (mmengine's ``merge_from_dict``), e.g. a smaller model for a
smoke test: ``--set model.backbone.num_layers=2``.

Sample ids: id ``i`` is the i-th image of ``images/training`` sorted by file name (ADE_train_00000001 ...),
the order a dataset registry entry for ADE20K must use so that selections made on its features name the
same images here. Iterations: 127 epochs of the subset at the paper's batch 8 (16k at 5%, 32k at 10%),
unless ``--iters`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from bench_suite import atomic
from bench_suite.cli import main_guard, setup_logging
from bench_suite.errors import BadInputError, MissingDataError
from bench_suite.methods.selection import Selection

log = logging.getLogger(__name__)
CONFIG = Path(__file__).with_name("segmenter_vit-s_mask_8xb1-16k_ade20k-512x512_dino.py")
PAPER_EPOCHS = 127
PAPER_BATCH = 8
INSTALL_HINT = ('the mmseg extra is not installed: run bash setup.sh --with-mmseg (installs mmcv==2.1.0 - '
                'a prebuilt wheel from ../shared/wheels or compiled from source, ~14 min - then pip install ".[mmseg]")')


def ade20k_names(root, split: str = "training") -> list[str]:
    """Image names (no extension) of an ADE20K split in id order: sorted by file name."""
    d = Path(root) / "images" / split
    if not d.is_dir():
        raise MissingDataError(f"{d} not found: --ade20k must be the ADEChallengeData2016 folder "
                               "(images/training, annotations/training, ...)")
    names = sorted(p.stem for p in d.glob("*.jpg"))
    if not names:
        raise MissingDataError(f"no .jpg images in {d}")
    return names


def write_split(names: list[str], ids: np.ndarray, path) -> int:
    """The selected image names, one per line (mmseg's ``ann_file``); ids outside the split fail here."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        raise BadInputError("empty selection: there is nothing to finetune on")
    bad = ids[(ids < 0) | (ids >= len(names))]
    if bad.size:
        raise BadInputError(f"{bad.size} selected id(s) are not ADE20K training images (0..{len(names) - 1}), "
                            f"e.g. {bad[:5].tolist()}")
    atomic.write_text(path, "".join(names[i] + "\n" for i in np.sort(ids).tolist()))
    return int(ids.size)


def convert_dino_vit(state_dict: dict) -> OrderedDict:
    """timm / DINO ViT keys -> mmseg VisionTransformer keys (mmseg's tools/model_converters/vit2mmseg.py)."""
    if "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    elif "model" in state_dict:
        state_dict = state_dict["model"]
    out = OrderedDict()
    for k, v in state_dict.items():
        k = k.removeprefix("module.").removeprefix("backbone.")
        if k.startswith("head"):
            continue
        if k.startswith("norm."):
            nk = k.replace("norm.", "ln1.")
        elif k.startswith("patch_embed"):
            nk = k.replace("proj", "projection") if "proj" in k else k
        elif k.startswith("blocks"):
            if "norm" in k:
                nk = k.replace("norm", "ln")
            elif "mlp.fc1" in k:
                nk = k.replace("mlp.fc1", "ffn.layers.0.0")
            elif "mlp.fc2" in k:
                nk = k.replace("mlp.fc2", "ffn.layers.1")
            elif "attn.qkv" in k:
                nk = k.replace("attn.qkv.", "attn.attn.in_proj_")
            elif "attn.proj" in k:
                nk = k.replace("attn.proj", "attn.attn.out_proj")
            else:
                nk = k
            nk = nk.replace("blocks.", "layers.")
        else:
            nk = k
        out[nk] = v
    return out


def paper_iters(n_selected: int, batch: int = PAPER_BATCH, epochs: int = PAPER_EPOCHS) -> int:
    """127 epochs of the subset at batch 8: 1,010 images (5%) -> 16k iterations, 2,021 (10%) -> 32k."""
    return int(round(epochs * n_selected / batch / 1000.0)) * 1000 or int(math.ceil(epochs * n_selected / batch))


def _value(text: str):
    """A --set value: a Python / YAML literal when it parses as one (2, 0.5, false, [1, 2]), else the string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_config(*, ade20k, split_file, checkpoint, work_dir, iters: int, seed: int, gpus: int, launcher: str,
                 overrides: dict | None = None):
    """The mmengine Config for this run (needs mmengine); ``overrides`` as mmengine's merge_from_dict."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(CONFIG))
    cfg.work_dir = str(work_dir)
    cfg.launcher = launcher
    cfg.randomness = dict(seed=seed)
    cfg.model.pretrained = str(checkpoint)
    for loader in (cfg.train_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = str(ade20k)
    cfg.train_dataloader.dataset.ann_file = str(Path(split_file).resolve())
    if PAPER_BATCH % gpus:
        raise BadInputError(f"the paper's batch 8 does not split over {gpus} GPUs")
    cfg.train_dataloader.batch_size = PAPER_BATCH // gpus
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters
    cfg.param_scheduler[0].end = iters
    # one evaluation, runner.test() after training (with a val loop the same split was evaluated twice)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_evaluator = dict(type="PerClassIoUMetric", iou_metrics=["mIoU"])
    if overrides:
        cfg.merge_from_dict(overrides)
    return cfg


def _register_per_class_metric():
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import METRICS

    if "PerClassIoUMetric" in METRICS.module_dict:
        return

    @METRICS.register_module()
    class PerClassIoUMetric(IoUMetric):
        """IoUMetric that also returns the per-class IoU (over the whole split, as mIoU itself)."""

        def compute_metrics(self, results):
            metrics = super().compute_metrics(results)
            cols = tuple(zip(*results))
            inter, union = sum(cols[0]), sum(cols[1])
            iou = (inter / union).cpu().numpy()
            for name, v in zip(self.dataset_meta["classes"], iou):
                metrics[f"IoU.{name}"] = None if np.isnan(v) else float(v * 100)
            return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launchers.mmseg.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ade20k", required=True, help="ADEChallengeData2016 folder")
    p.add_argument("--selection", required=True, help="selection JSON; ids index sorted images/training")
    p.add_argument("--dino-checkpoint", required=True, help="dino_deitsmall16_pretrain.pth (timm-style keys)")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, help="training iterations (default: 127 epochs of the subset at batch 8)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the run (batch 8 is split over them)")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (mmengine merge_from_dict), e.g. train_dataloader.num_workers=0")

    @main_guard
    def run():
        args = p.parse_args(argv)
        setup_logging()
        t0 = time.perf_counter()
        sel = Selection.load(args.selection)
        if not Path(args.dino_checkpoint).exists():
            raise MissingDataError(f"checkpoint not found: {args.dino_checkpoint} (DINO's dino_deitsmall16_pretrain.pth)")
        names = ade20k_names(args.ade20k, "training")
        work = Path(args.work_dir)
        n = write_split(names, sel.ids, work / "selected_train.txt")
        try:
            import mmseg  # noqa: F401
            from mmengine.runner import Runner
        except ImportError as exc:
            raise MissingDataError(f"{INSTALL_HINT} ({exc})") from exc
        ckpt = work / "dino_vits16_mmseg.pth"
        if not ckpt.exists():
            state = torch.load(args.dino_checkpoint, map_location="cpu", weights_only=True)
            with atomic.atomic_path(ckpt) as tmp:
                torch.save(convert_dino_vit(state), tmp)
        iters = args.iters or paper_iters(n)
        overrides = {}
        for item in args.set:
            key, eq, val = item.partition("=")
            if not eq or not key:
                raise BadInputError(f"--set {item!r}: expected KEY=VALUE")
            overrides[key.strip()] = _value(val)
        _register_per_class_metric()
        cfg = build_config(ade20k=args.ade20k, split_file=work / "selected_train.txt", checkpoint=ckpt, work_dir=work,
                           iters=iters, seed=args.seed, gpus=args.gpus, launcher=args.launcher, overrides=overrides)
        runner = Runner.from_cfg(cfg)
        runner.train()
        res = runner.test()
        if runner.rank == 0:
            per_class = {k[4:]: v for k, v in res.items() if k.startswith("IoU.")}
            atomic.write_json(work / "metrics.json", {
                "task": "seg", "metric": "miou", "miou": float(res["mIoU"]), "aacc": float(res["aAcc"]),
                "macc": float(res["mAcc"]), "per_class": per_class, "iterations": iters,
                "epochs": iters * PAPER_BATCH / n, "n_train": n, "seed": args.seed,
                "recipe_name": "mmseg_segmenter_vit-s_mask_dino", "recipe": {"config": CONFIG.name, "lr": 0.001,
                                                                           "momentum": 0.9, "batch_size": PAPER_BATCH,
                                                                           "schedule": "poly", "iters": iters},
                "selection": {"path": args.selection, "method": sel.method, "budget": sel.budget},
                "wall_seconds": time.perf_counter() - t0})
        return 0

    return run()


if __name__ == "__main__":
    main()
