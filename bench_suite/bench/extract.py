"""``python -m bench_suite.bench.extract``: the extraction pipeline's speed next to the encoder's bare forward.

Writes its own JPEG shards (random crops of scikit-learn's two sample photos, 400 x 300 or ``--photo WxH``,
enlarged where needed, flipped and brightness-jittered, JPEG quality 90, ``--shard-size`` per shard), then, in
this one process:

- **pipeline**: ``bench_suite.extract.extract_features`` over the first third of the shards and over all of
  them; its rate is the marginal one, (N - N1) / (t(N) - t(N1)), so loading the encoder, starting the
  workers and writing the store do not count (they are printed apart);
- **bare forward**: the same encoder on batches of the same size already preprocessed in memory (on the
  device), the same precision, channels_last as the pipeline, timed over as many images;
- **data path alone**: the pipeline's reading, decoding and preprocessing up to the encoder's input on the device
  (``extract.input_batches``), with no encoder, marginal as above: the rate the pipeline cannot exceed with these
  workers (on a GPU node, the CPU's or nvJPEG's decode limit);
- with ``--processes 2 ...``: the same pipeline under ``accelerate launch --multi_gpu --num_processes P``
  (``python -m bench_suite.cli.features``, the shards split between the processes, each with its share of the
  cores), timed from outside over the same two shard sets, so the launcher's and the encoders' start-up cancel
  in the marginal rate. On a CPU this is how the whole machine is used: a process decodes while the other one's
  model runs (the default run's ``accelerate.yaml`` starts two processes);
- their ratio, the main process's peak resident memory (high-water mark above the start) of the two
  pipeline runs (it should not grow with N: features stream to disk shard by shard), and with
  ``--precision bf16`` the per-row cosine between the bf16 and fp32 stores (min and mean).

    python -m bench_suite.bench.extract                                    # EfficientNet-Lite0 112 px, 3000 JPEGs
    python -m bench_suite.bench.extract --images 1000 --workers 0 1 2      # which worker count pays here
    python -m bench_suite.bench.extract --processes 2                      # two processes (a 2-core CPU)
    python -m bench_suite.bench.extract --device cuda --encoder dino_vits16 --image-size 224 \\
        --images 20000 --batch-size 256 --precision bf16 --decode device   # a GPU node

No timing is asserted anywhere; the numbers depend on the machine and on what else runs on it (the load
average is printed).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_suite.bench.memory import PeakMemory
from bench_suite.data.shards import load_manifest, write_blob_shards
from bench_suite.encoders import get_encoder
from bench_suite.encoders.assets import sample_photos
from bench_suite.extract import default_workers, extract_features, input_batches, preprocessor, resolve_preprocess
from bench_suite.runtime import resolve_device
from bench_suite.store import FeatureStore


def jpeg_samples(n: int, width: int = 400, height: int = 300, seed: int = 0):
    """(id, JPEG bytes, label) of ``n`` seeded random crops of real photos."""
    from PIL import Image

    photos = sample_photos()  # 4 x 427 x 427 x 3
    rng = np.random.default_rng(seed)
    h, w = photos.shape[1:3]
    for i in range(n):
        src = photos[rng.integers(len(photos))]
        scale = max(width / w, height / h) * rng.uniform(1.0, 1.6)
        im = Image.fromarray(src).resize((int(w * scale) + 1, int(h * scale) + 1), Image.BILINEAR)
        x0, y0 = rng.integers(im.width - width + 1), rng.integers(im.height - height + 1)
        im = im.crop((x0, y0, x0 + width, y0 + height))
        arr = np.asarray(im, dtype=np.float32) * rng.uniform(0.7, 1.3)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        yield i, buf.getvalue(), i % 10


class _Acc:
    """A one-process stand-in for the Accelerator (the benchmark chooses the device itself)."""

    process_index, num_processes = 0, 1

    def __init__(self, device):
        self.device = torch.device(device)

    def wait_for_everyone(self):
        pass


def sub_shards(src: Path, dst: Path, k: int) -> None:
    """A shard folder of the first ``k`` shards of ``src`` (hard links, a manifest of its own)."""
    import hashlib
    import json

    m = json.loads((src / "manifest.json").read_text())
    m["shards"] = m["shards"][:k]
    m["count"] = sum(s["count"] for s in m["shards"])
    m["checksum"] = hashlib.sha256("".join(s["sha256"] for s in m["shards"]).encode()).hexdigest()[:16]
    dst.mkdir(parents=True)
    for s in m["shards"]:
        os.link(src / s["name"], dst / s["name"])
    (dst / "manifest.json").write_text(json.dumps(m))


def marginal_rate(n1: int, n: int, t1: float, tn: float) -> float:
    """Images per second between a run over ``n1`` images (``t1`` seconds) and one over ``n`` (``tn``), so that
    start-up costs cancel; the whole run's rate when the two are the same."""
    return (n - n1) / max(1e-9, tn - t1) if n > n1 else n / tn


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the DataLoader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_pipeline(shards, out, args, device, workers, precision):
    if out.exists():
        shutil.rmtree(out)
    with PeakMemory() as mem:
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        extract_features(shards, out, encoder=args.encoder, image_size=args.image_size, batch_size=args.batch_size,
                         accelerator=_Acc(device), progress=False, num_workers=workers, precision=precision,
                         decode=args.decode, threads=args.threads)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, mem.above_kib / 1024, cpu_seconds() - c0


@torch.inference_mode()
def data_path_seconds(shards, prep, args, device, workers: int) -> float:
    """Wall seconds of the pipeline's data path alone over ``shards`` (``extract.input_batches`` with the
    pipeline's settings: shards read, images decoded and preprocessed to the encoder's input on the device;
    ``prep``: the encoder's ``extract.preprocessor``)."""
    names = [s["name"] for s in load_manifest(shards)["shards"]]
    settings = {"batch_size": args.batch_size, "decode": args.decode, "channels_last": True,
                "preprocess": resolve_preprocess(args.decode, None, device)}
    t0 = time.perf_counter()
    for _ in input_batches(shards, names, prep, settings, device, workers, pin_memory=device.type == "cuda"):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_processes(shards, out, args, processes: int) -> float:
    """Wall seconds of ``python -m bench_suite.cli.features`` under ``accelerate launch`` with ``processes``
    processes (the shards dealt between them; on the CPU each takes its share of the cores)."""
    import bench_suite

    root = Path(bench_suite.__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "accelerate.yaml"),
           "--multi_gpu", "--num_processes", str(processes), "-m", "bench_suite.cli.features",
           "--shards", str(shards), "--out", str(out), "--encoder", args.encoder, "--batch-size", str(args.batch_size),
           "--precision", args.precision, "--decode", args.decode, "--force"]
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"extraction with {processes} processes failed: {res.stderr.strip().splitlines()[-1:]}")
    return seconds


@torch.inference_mode()
def bare_forward(args, device, precision, n_images: int) -> float:
    """Images/s of the encoder alone on preprocessed batches already on the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    enc = get_encoder(args.encoder, image_size=args.image_size, device=str(device))
    enc.model.to(memory_format=torch.channels_last)  # as the pipeline (extract.py: its default on both)
    photos = sample_photos()
    x = enc.preprocess(photos[np.arange(args.batch_size) % len(photos)]).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    batches = max(2, round(n_images / args.batch_size))
    c0 = cpu_seconds()
    with autocast:
        for _ in range(2):
            enc.features(x).float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batches):
            f = torch.nn.functional.normalize(enc.features(x).float(), dim=1)
        f.cpu()
        seconds = time.perf_counter() - t0
    n = batches * args.batch_size
    return n / seconds, n / (cpu_seconds() - c0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench_suite.bench.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=None, help="default: 112 for efficientnet_lite0, else the encoder's")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--photo", default="400x300", help="the JPEGs' size, WxH (4000x3000: phone photos)")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="*", help="worker counts to compare (default: the pipeline's own)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--decode", choices=["cpu", "reduced", "device"], default="cpu")
    p.add_argument("--threads", type=int, help="torch threads for the bare forward and the pipeline (CPU)")
    p.add_argument("--processes", type=int, nargs="*", default=[],
                   help="also time the pipeline under accelerate launch with these process counts (>= 2)")
    p.add_argument("--work", help="folder for the shards and stores (default: a temporary one, removed)")
    args = p.parse_args(argv)
    if args.image_size is None and args.encoder == "efficientnet_lite0":
        args.image_size = 112
    device = torch.device(resolve_device(args.device))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        width, height = (int(v) for v in args.photo.lower().split("x"))
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        p.error(f"--photo takes WxH with both positive, e.g. 4000x3000, got {args.photo!r}")
    photo = "" if (width, height) == (400, 300) else f"-{width}x{height}"
    shards = work / f"jpeg-{args.images}-{args.shard_size}{photo}"
    try:
        t0 = time.perf_counter()
        if not (shards / "manifest.json").exists():
            write_blob_shards(jpeg_samples(args.images, width, height), shards, dataset="bench-jpeg",
                              count=args.images,
                              shard_size=args.shard_size, classes=[str(i) for i in range(10)])
        n_shards = -(-args.images // args.shard_size)
        k = max(1, n_shards // 3)
        first = work / f"jpeg-{args.images}-{args.shard_size}{photo}-first{k}"
        if not first.exists():
            sub_shards(shards, first, k)
        n1 = min(args.images, k * args.shard_size)
        print(f"shards: {args.images} JPEGs {width}x{height} in {n_shards} shards ({time.perf_counter() - t0:.1f} s to write); "
              f"device {device}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
              f"{args.encoder} at {args.image_size} px, batch {args.batch_size}, {args.precision}, decode {args.decode}")
        bare, bare_cpu = bare_forward(args, device, args.precision, args.images)
        print(f"bare forward: {bare:,.0f} images/s ({bare_cpu:,.0f} images per CPU second)")
        rates = []
        prep = preprocessor(get_encoder(args.encoder, image_size=args.image_size, device="cpu"))
        for workers in (args.workers if args.workers else [default_workers(device)]):
            t1, m1, c1 = run_pipeline(first, work / "store-first", args, device, workers, args.precision)
            tn, mn, cn = run_pipeline(shards, work / "store-all", args, device, workers, args.precision)
            rate, rate_cpu = marginal_rate(n1, args.images, t1, tn), marginal_rate(n1, args.images, c1, cn)
            rates.append((workers, rate, rate_cpu))
            print(f"pipeline, {workers} workers: {rate:,.0f} images/s marginal ({n1} images {t1:.1f} s, {args.images} "
                  f"images {tn:.1f} s, {args.images / tn:,.0f} images/s overall; {rate_cpu:,.0f} images per CPU "
                  f"second marginal); ratio to the bare forward {rate / bare:.2f} (per CPU second "
                  f"{rate_cpu / bare_cpu:.2f}); main-process peak memory +{m1:.0f} MiB ({n1} images), "
                  f"+{mn:.0f} MiB ({args.images})")
            # after the pipeline: its one-time costs (nvJPEG, pinned memory, kernels loaded) are paid, so neither
            # timed run of the data path carries them, and a cut-off loses this line, not the pipeline's
            d1, dn = (data_path_seconds(sh, prep, args, device, workers) for sh in (first, shards))
            data_rate = marginal_rate(n1, args.images, d1, dn)
            print(f"data path alone, {workers} workers: {data_rate:,.0f} images/s marginal ({n1} images {d1:.1f} s, "
                  f"{args.images} images {dn:.1f} s; read, decode {args.decode}, preprocess to the device's input, "
                  f"no encoder): {data_rate / bare:.2f} x the bare forward")
        for procs in args.processes:
            if procs < 2:
                continue
            t1 = run_processes(first, work / "store-first-p", args, procs)
            tn = run_processes(shards, work / "store-all-p", args, procs)
            rate = marginal_rate(n1, args.images, t1, tn)
            rates.append((f"{procs} processes", rate, None))
            print(f"pipeline, {procs} processes (accelerate launch): {rate:,.0f} images/s marginal ({n1} images "
                  f"{t1:.1f} s, {args.images} images {tn:.1f} s, both with start-up); ratio to the bare forward "
                  f"{rate / bare:.2f}")
        bare_after, bare_cpu_after = bare_forward(args, device, args.precision, args.images)
        mean = (bare + bare_after) / 2
        print(f"bare forward again: {bare_after:,.0f} images/s; ratio of the pipeline to the mean bare forward: "
              + ", ".join(f"{w if isinstance(w, str) else f'{w} workers'} {r / mean:.2f}" for w, r, _ in rates)
              + f"; load average now {os.getloadavg()[0]:.2f}")
        if args.precision == "bf16":
            run_pipeline(shards, work / "store-fp32", args, device, (args.workers or [default_workers(device)])[-1],
                         "fp32")
            a = np.asarray(FeatureStore.open(work / "store-all").features)
            b = np.asarray(FeatureStore.open(work / "store-fp32").features)
            cos = (a * b).sum(1)
            print(f"bf16 vs fp32 features: cosine per row min {cos.min():.5f}, mean {cos.mean():.5f} "
                  f"({(cos >= 0.999).mean() * 100:.2f}% of rows >= 0.999)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
