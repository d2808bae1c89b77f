"""GPU-hours of each table of a profile: measured time per image x the images its cells train and evaluate on.

    python -m launchers.slurm.gpu_hours --profile paper --measure            # on one GPU: srun --gpus=1 ...
    python -m launchers.slurm.gpu_hours --profile paper --train-ips 1200 --infer-ips 4000   # given rates

How it counts (from ``run.py --dry-run --json``, i.e. the cells exactly as they will run, budgets and
epochs resolved, cells the paper leaves out ("-") dropped):

- training: per cell, ``epochs x images per epoch`` (the budget; with repeated augmentation DeiT's RASampler
  length) at the recipe's image size, at ``train_ips`` images per second per GPU;
- evaluation: per cell, the test split once per ``eval_every`` epochs and after the last, at ``infer_ips``;
- feature extraction: pool + test split once per dataset and encoder, at ``infer_ips``;
- the active-learning baselines whose task model is a finetuned backbone (the paper profile's CoreSet,
  LearnLoss, TA-VAAL, ALFA-Mix): each round trains the round recipe on the labelled set (``task_epochs``, else
  the recipe's epochs) and scores the unlabelled rest of the pool once, rounds as ``baselines/_al_protocol``
  runs them (initial set, then batches up to the budget);
- time per epoch of a cell = its images per epoch / ``train_ips``; GPU-hours = the sum over cells / 3600.

``--measure`` measures ``train_ips`` (forward + backward + SGD step, the recipe's micro batch and AMP, every
layer trainable) and ``infer_ips`` (forward, batch 256) of the profile's ViT-S/16 backbone at each image size
the profile's recipes use, on this process's device, with random weights (the speed does not depend on
them), after warm-up steps. Not counted: the label-free selections (ActiveFT: seconds to minutes on a GPU),
VAAL's and TA-VAAL's VAE and discriminator training, data loading stalls, job start-up, queue time. A cell
that two tables share is computed once: the second table's "new" column leaves it out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from bench_suite.cli import main_guard, setup_logging
from bench_suite.errors import BadInputError
from bench_suite.profiles import load_profile
from bench_suite.tables.preflight import plan
from bench_suite.tables.registry import table_names

log = logging.getLogger("bench_suite.gpu_hours")
TEST_SIZES = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 50_000, "ade20k": 2_000}


def epoch_images(budget: int, repeats: int) -> int:
    """Images in one epoch (DeiT's RASampler length with repeated augmentation, as the training loop)."""
    return budget if repeats <= 1 else min(budget * repeats, max(1, budget // 256) * 256)


def n_evals(epochs: int, every: int) -> int:
    return 1 if not every else epochs // every + (1 if epochs % every else 0)


def _test_size(profile, dataset: str) -> int:
    limit = getattr(profile.dataset(dataset).test, "limit", None)
    return int(limit or TEST_SIZES.get(dataset, 10_000))


def al_rounds(c: dict) -> list[int]:
    """The labelled-set size at each round of an active-learning cell (``_al_protocol.sizes`` and its loop)."""
    o, n, budget = c["options"], int(c["pool_size"]), int(c["budget"])
    init = int(o["init_size"]) if o.get("init_size") is not None else max(1, int(round(float(o["init_ratio"]) * n)))
    if o.get("batch_size") is not None:
        batch = int(o["batch_size"])
    else:
        ratio = o["batch_ratio"] if o.get("batch_ratio") is not None else (
            o["init_ratio"] if o.get("init_size") is None else None)
        batch = max(1, int(round(float(ratio) * n))) if ratio is not None else init
    sizes, labelled = [], init
    while labelled < budget:
        sizes.append(labelled)
        labelled += min(batch, budget - labelled)
    return sizes


def count(profile, table: str, seen: set) -> dict:
    """Images trained and evaluated per image size for ``table``; ``seen``: cells of earlier tables (updated)."""
    cells = [c for c in plan(profile, table, Path("/nonexistent-work"), {}) if not c.get("skipped")]
    out = {"cells": len(cells), "new_cells": 0, "train": {}, "infer": {}, "train_new": {}, "infer_new": {},
           "epoch_seconds": []}
    extract = set()
    for c in cells:
        r = c["recipe"]
        size = int(r.get("image_size") or c["encoder"].get("image_size") or 224)
        per_epoch = epoch_images(int(c["budget"]), int(r.get("repeated_aug") or 1))
        train = c.get("epochs", 0) * per_epoch
        infer = n_evals(c.get("epochs", 0), int(r.get("eval_every") or 0)) * _test_size(profile, c["dataset"])
        task = c.get("task_model") or {}
        if task.get("model") == "finetune" and c.get("pool_size"):  # an AL baseline's rounds
            tr = task["recipe"]
            epochs_r = int(c["options"].get("task_epochs") or tr.get("epochs") or 0)
            sizes = al_rounds(c)
            al_train = sum(epochs_r * epoch_images(m, int(tr.get("repeated_aug") or 1)) for m in sizes)
            train, infer = train + al_train, infer + sum(int(c["pool_size"]) - m for m in sizes)
            out["al_train"] = out.get("al_train", 0) + al_train
        ident = json.dumps([c["dataset"], c["ratio"], c["method"], c["options"], c["seed"], c["recipe"],
                            c["encoder"]], sort_keys=True, default=str)
        new = ident not in seen
        seen.add(ident)
        out["new_cells"] += new
        for key, n in (("train", train), ("infer", infer)):
            out[key][size] = out[key].get(size, 0) + n
            if new:
                out[f"{key}_new"][size] = out[f"{key}_new"].get(size, 0) + n
        out["epoch_seconds"].append((size, per_epoch))
        extract.add((c["dataset"], json.dumps(c["encoder"], sort_keys=True), c["pool_size"]))
    enc_size = {}
    for dataset, enc, pool in extract:
        s = int(json.loads(enc).get("image_size") or 224)
        enc_size[s] = enc_size.get(s, 0) + int(pool or 0) + _test_size(profile, dataset)
    out["extract"] = enc_size
    return out


def measure(sizes: list[int], micro_batch: int, steps: int = 20) -> dict:
    """Training and inference images/s of ViT-S/16 at each size on this device (random weights, AMP on CUDA)."""
    import timm  # noqa: PLC0415 - heavy, only here
    import torch  # noqa: PLC0415

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    rates = {}
    for size in sizes:
        model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=size, num_classes=100).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x = torch.randn(micro_batch, 3, size, size, device=dev)
        y = torch.randint(0, 100, (micro_batch,), device=dev)

        def step():
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def timed(fn, n):
            for _ in range(3):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        train_s = timed(step, steps)
        xb = torch.randn(256 if dev.type == "cuda" else micro_batch, 3, size, size, device=dev)

        @torch.no_grad()
        def infer():
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                model(xb)
        model.eval()
        infer_s = timed(infer, max(2, steps // 2))
        rates[size] = {"train_ips": micro_batch * steps / train_s, "infer_ips": len(xb) * max(2, steps // 2) / infer_s}
        log.info("ViT-S/16 at %d px on %s: train %.1f img/s (batch %d), inference %.1f img/s", size, dev,
                 rates[size]["train_ips"], micro_batch, rates[size]["infer_ips"])
    return {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "rates": rates}


def hours(counts: dict, rates: dict, new: bool = False) -> float:
    tr, inf = ("train_new", "infer_new") if new else ("train", "infer")
    s = sum(n / rates[size]["train_ips"] for size, n in counts[tr].items())
    s += sum(n / rates[size]["infer_ips"] for size, n in counts[inf].items())
    if not new:
        s += sum(n / rates[size]["infer_ips"] for size, n in counts["extract"].items())
    return s / 3600


@main_guard
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launchers.slurm.gpu_hours", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="paper")
    p.add_argument("--table", action="append", help="tables (default: every table of the profile)")
    p.add_argument("--measure", action="store_true", help="measure the rates on this device")
    p.add_argument("--train-ips", type=float, help="training images/s per GPU at 224 px (scaled by pixels for "
                   "other sizes) when not measuring")
    p.add_argument("--infer-ips", type=float, help="inference images/s per GPU at 224 px when not measuring")
    p.add_argument("--steps", type=int, default=20, help="timed steps per size with --measure")
    p.add_argument("--batch", type=int, help="micro batch with --measure (default 64, the paper recipes' micro_batch_size)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    profile = load_profile(args.profile)
    tables = args.table or [t for t in table_names() if t in profile.tables]
    seen: set = set()
    counts = {t: count(profile, t, seen) for t in tables}
    sizes = sorted({s for c in counts.values() for k in ("train", "infer", "extract") for s in c[k]})
    if args.measure:
        measured = measure(sizes, micro_batch=args.batch or 64, steps=args.steps)
        rates, source = measured["rates"], f"measured on {measured['device']}"
    elif args.train_ips and args.infer_ips:
        rates = {s: {"train_ips": args.train_ips * (224 / s) ** 2, "infer_ips": args.infer_ips * (224 / s) ** 2}
                 for s in sizes}
        source = f"given: {args.train_ips:g} / {args.infer_ips:g} img/s at 224 px, scaled by pixel count"
    else:
        raise BadInputError("give --measure (on a GPU node) or both --train-ips and --infer-ips")
    rows = []
    for t, c in counts.items():
        epoch_s = [n / rates[s]["train_ips"] for s, n in c["epoch_seconds"]]
        rows.append({"table": t, "cells": c["cells"], "new_cells": c["new_cells"],
                     "train_images": sum(c["train"].values()), "al_train_images": c.get("al_train", 0), "eval_images": sum(c["infer"].values()),
                     "extract_images": sum(c["extract"].values()),
                     "seconds_per_epoch": [round(min(epoch_s), 2), round(max(epoch_s), 2)] if epoch_s else None,
                     "gpu_hours": round(hours(c, rates), 1), "gpu_hours_new": round(hours(c, rates, new=True), 1)})
    if args.json:
        print(json.dumps({"rates": rates, "source": source, "tables": rows}, indent=1))
        return 0
    print(f"rates ({source}): " + ", ".join(f"{s} px train {r['train_ips']:.0f} / inference {r['infer_ips']:.0f} "
                                           "img/s" for s, r in rates.items()))
    print("| table | cells | new cells | train images (epochs x images) | of which AL task models | "
          "eval + scoring + extraction images | time per epoch of a cell | GPU-hours | GPU-hours of its new cells |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ep = r["seconds_per_epoch"]
        print(f"| {r['table']} | {r['cells']} | {r['new_cells']} | {r['train_images']:,} | {r['al_train_images']:,} | "
              f"{r['eval_images'] + r['extract_images']:,} | {ep[0]:g}-{ep[1]:g} s | {r['gpu_hours']:,} | "
              f"{r['gpu_hours_new']:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
