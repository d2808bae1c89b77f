"""The extraction pipeline (bench_suite.extract): 0 and 2 DataLoader workers write byte-identical stores, equal
to the encoder run batch by batch on each shard, channels-last (extraction version 2); the
GPU code paths run on the CPU (resize/normalise on the device, torchvision JPEG decoding, channels_last,
bf16 autocast) and stay close to fp32; a SIGKILL mid-extraction is resumed from the first unfinished shard,
to the same bytes."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_suite import extract
from bench_suite.data import shards as wshards
from bench_suite.encoders import get_encoder
from bench_suite.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
ENC = dict(encoder="efficientnet_lite0", image_size=32, batch_size=50, progress=False, threads=1)


class Acc:
    process_index, num_processes, device = 0, 1, torch.device("cpu")

    def wait_for_everyone(self):
        pass


def store_bytes(path):
    return {n: (Path(path) / n).read_bytes() for n in ("features.npy", "ids.npy", "labels.npy")}


@torch.inference_mode()
def reference_store(shard_dir, image_size, batch_size):
    """Features as extraction version 2 computes them: each shard on its own, batches of ``batch_size``,
    ``enc.preprocess`` + ``enc.features`` (channels-last) + L2 normalisation, rows in global-id order."""
    enc = get_encoder("efficientnet_lite0", image_size=image_size)
    enc.model.to(memory_format=torch.channels_last)
    manifest = wshards.load_manifest(shard_dir)
    ids, feats = [], []
    for s in manifest["shards"]:
        for b_ids, b_imgs, *_ in wshards.iter_samples(shard_dir, [s["name"]], batch_size=batch_size):
            f = enc.features(enc.preprocess(b_imgs).contiguous(memory_format=torch.channels_last)).float()
            ids.append(b_ids)
            feats.append(torch.nn.functional.normalize(f, dim=1).numpy())
    ids, feats = np.concatenate(ids), np.concatenate(feats)
    order = np.argsort(ids, kind="stable")
    return ids[order], feats[order]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """300 digits in 6 shards of 50."""
    out = tmp_path_factory.mktemp("small") / "shards"
    wshards.write_shards("digits", "train", out, limit=300, shard_size=50)
    return out


@pytest.fixture(scope="module")
def whole_store(small_shards, tmp_path_factory):
    """An uninterrupted extraction with no workers."""
    out = tmp_path_factory.mktemp("whole") / "w0"
    extract.extract_features(small_shards, out, accelerator=Acc(), num_workers=0, **ENC)
    return out


def test_workers_give_identical_stores_equal_to_the_reference(small_shards, whole_store, tmp_path):
    extract.extract_features(small_shards, tmp_path / "w2", accelerator=Acc(), num_workers=2, **ENC)
    assert store_bytes(whole_store) == store_bytes(tmp_path / "w2")
    store = FeatureStore.open(tmp_path / "w2")
    torch.set_num_threads(1)
    ids, feats = reference_store(small_shards, 32, 50)
    assert np.array_equal(store.ids, ids)
    assert np.asarray(store.features).tobytes() == feats.tobytes()  # bit for bit
    meta = json.loads((tmp_path / "w2" / "meta.json").read_text())
    assert meta["extraction"]["workers"] == 2 and "variant" not in meta
    assert not list(tmp_path.glob(".*parts*")), "the parts folder must be removed"


def photo_shards(root):
    from PIL import Image

    from bench_suite.encoders.assets import sample_photos

    photos = sample_photos()
    folder = root / "photos"
    folder.mkdir()
    for i in range(16):
        size = (100, 140) if i % 2 else (90, 90)
        im = Image.fromarray(photos[i % 4][i * 7:i * 7 + size[0], i * 5:i * 5 + size[1]])
        im = im.convert("L") if i % 5 == 0 else im
        im.save(folder / (f"p{i:02d}.png" if i % 4 == 0 else f"p{i:02d}.jpg"), quality=90)
    wshards.write_folder_shards(folder, root / "shards", shard_size=6)
    return root / "shards"


def test_device_code_paths_on_the_cpu(tmp_path):
    """The GPU paths, run on the CPU: the resize/normalise on the device is bit-identical to the workers';
    torchvision's JPEG decoding and the contiguous layout (channels_last is the default) stay within cosine
    0.999 of the default, row by row; device decoding is a new fingerprint, the layout is not."""
    shards = photo_shards(tmp_path)
    kw = dict(ENC, image_size=64, batch_size=4, accelerator=Acc(), num_workers=1)
    base = extract.extract_features(shards, tmp_path / "base", **kw)
    dev = extract.extract_features(shards, tmp_path / "dev", preprocess="device", **kw)
    assert store_bytes(tmp_path / "base") == store_bytes(tmp_path / "dev")
    assert dev.meta["fingerprint"] == base.meta["fingerprint"]
    ref = np.asarray(base.features)
    for name, opts in [("jpeg", dict(decode="device")), ("contiguous", dict(channels_last=False))]:
        store = extract.extract_features(shards, tmp_path / name, **opts, **kw)
        cos = (np.asarray(store.features) * ref).sum(1)
        print(f"{name}: cosine to the default per row: min {cos.min():.6f} mean {cos.mean():.6f}")
        assert cos.min() >= 0.999, (name, cos.min())
        assert (store.meta["fingerprint"] != base.meta["fingerprint"]) == (name == "jpeg")


def test_bf16_matches_fp32_for_a_vit(tmp_path):
    """bf16 autocast on a ViT (DINOv2-S/14 at 56 px here): every row within cosine 0.999 of fp32, and the
    store records the first batch's own check. (EfficientNet-Lite0 does not make it: min 0.997 at 112 px on
    photos, measured; extraction warns.)"""
    shards = photo_shards(tmp_path)
    kw = dict(ENC, encoder="dinov2_vits14", image_size=56, batch_size=8, accelerator=Acc(), num_workers=0)
    fp32 = extract.extract_features(shards, tmp_path / "fp32", **kw)
    bf16 = extract.extract_features(shards, tmp_path / "bf16", precision="bf16", **kw)
    cos = (np.asarray(bf16.features) * np.asarray(fp32.features)).sum(1)
    print(f"bf16 vs fp32: cosine per row min {cos.min():.6f} mean {cos.mean():.6f}")
    assert cos.min() >= 0.999
    assert bf16.meta["fingerprint"] != fp32.meta["fingerprint"]
    assert bf16.meta["variant"] == {"precision": "bf16", "orientation": "exif"}  # folder shards: photos oriented
    assert bf16.meta["extraction"]["bf16_min_cosine_first_batch"] >= 0.999


def test_sigkill_then_rerun_resumes_at_the_first_unfinished_shard(small_shards, whole_store, tmp_path, caplog):
    """A real ``python -m bench_suite.cli.features`` is SIGKILLed once some but not all of its shards are
    written; the rerun extracts only the others and ends with the bytes of an uninterrupted run."""
    out = tmp_path / "store"
    parts = lambda: list(tmp_path.glob(".store.parts-*"))  # noqa: E731
    done = lambda: sorted(p.name for d in parts() for p in d.glob("*.feats.npy"))  # noqa: E731
    cmd = [sys.executable, "-m", "bench_suite.cli.features", "--shards", str(small_shards), "--encoder",
           "efficientnet_lite0", "--image-size", "32", "--batch-size", "50", "--workers", "0", "--threads", "1",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for attempt in range(3):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while len(done()) < 1 + attempt and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if not (out / "meta.json").exists():
            break
        import shutil

        shutil.rmtree(out)
    finished = done()
    assert proc.returncode == -signal.SIGKILL and 1 <= len(finished) < 6, (finished, proc.stderr.read()[-2000:])
    assert not (out / "meta.json").exists()

    written = []
    real = extract._ShardWriter.__init__

    def spy(self, parts_dir, name, *a, **k):
        written.append(name)
        real(self, parts_dir, name, *a, **k)

    caplog.set_level(logging.INFO, logger="bench_suite.extract")
    extract._ShardWriter.__init__ = spy
    try:
        extract.extract_features(small_shards, out, accelerator=Acc(), num_workers=0, **ENC)
    finally:
        extract._ShardWriter.__init__ = real
    names = [s["name"] for s in wshards.load_manifest(small_shards)["shards"]]
    finished_shards = sorted(n.removesuffix(".feats.npy") for n in finished)
    assert written == [n for n in names if n not in finished_shards]
    first = written[0]
    assert f"resuming extraction: {len(finished)} of 6 shards already extracted; starting at {first}" in caplog.text
    assert store_bytes(out) == store_bytes(whole_store)


def _jpeg(mode: str, size=(48, 40), **save) -> bytes:
    import io

    from PIL import Image

    gen = np.random.default_rng(len(mode))
    arr = gen.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def test_jpeg_component_count_from_the_frame_header():
    assert extract._jpeg_components(_jpeg("RGB")) == 3
    assert extract._jpeg_components(_jpeg("L")) == 1
    assert extract._jpeg_components(_jpeg("CMYK")) == 4
    assert extract._jpeg_components(_jpeg("RGB", progressive=True)) == 3  # SOF2
    assert extract._jpeg_components(_jpeg("RGB")[:20]) is None  # cut before its frame header
    assert extract._jpeg_components(b"\xff\xd8\xff\xda\x00\x02") is None  # a scan before any frame header


def test_device_decoding_packs_each_batch_takes_cmyk_and_names_a_corrupt_jpeg(tmp_path):
    """``decode="device"`` (torchvision's decoder, here on the CPU): a batch reaches the main process as one packed
    tensor; a CMYK JPEG goes to the worker's decoder (nvJPEG has no CMYK output) and the store matches the CPU
    decode's; a JPEG cut short (both decoders refuse it) is named in a one-line error."""
    rgb, cmyk, gray = _jpeg("RGB"), _jpeg("CMYK"), _jpeg("L")
    blobs = [rgb, cmyk, gray, _jpeg("RGB", size=(30, 50)), rgb, cmyk]
    shards = tmp_path / "shards"
    wshards.write_blob_shards(((i, b, i % 2) for i, b in enumerate(blobs)), shards, dataset="mixed",
                              count=len(blobs), shard_size=4, classes=["a", "b"])
    prep = extract.preprocessor(get_encoder("efficientnet_lite0", image_size=32))
    batches = list(extract.ShardBatches(shards, sorted(p.name for p in shards.glob("*.tar")), 4, prep,
                                        preprocess="device", decode="device"))
    assert [b["encoded"] for b in batches] == [[True, False, True, True], [True, False]]
    assert all(torch.is_tensor(b["packed"]) and b["packed"].dim() == 1 for b in batches)
    kw = dict(ENC, batch_size=4, accelerator=Acc(), num_workers=1)
    cpu = extract.extract_features(shards, tmp_path / "cpu", **kw)
    dev = extract.extract_features(shards, tmp_path / "dev", decode="device", **kw)
    cos = (np.asarray(dev.features) * np.asarray(cpu.features)).sum(1)
    assert cos.min() >= 0.999, cos

    cut = rgb[: len(rgb) // 2]  # a valid frame header (3 components), half of the image data
    corrupt = tmp_path / "corrupt"
    wshards.write_blob_shards(((i, b, 0) for i, b in enumerate([rgb, cut])), corrupt, dataset="corrupt",
                              count=2, shard_size=4, classes=["a"])
    with pytest.raises(extract.CorruptDataError, match="sample 1 in shard .*: cannot decode its image"):
        extract.extract_features(corrupt, tmp_path / "c", decode="device", **kw)


def test_extraction_benchmark_runs_every_part_on_the_cpu(tmp_path, capsys):
    """``bench.extract`` as gpu_check runs it (bf16, device decoding, given worker count and work folder), tiny:
    it prints the bare forward, the data path alone, the pipeline, and the bf16-vs-fp32 cosine, with rates that
    are numbers; a second run reuses the shards it wrote."""
    import re

    from bench_suite.bench import extract as bench

    argv = ["--device", "cpu", "--encoder", "efficientnet_lite0", "--image-size", "32", "--images", "48",
            "--shard-size", "12", "--batch-size", "8", "--workers", "1", "--precision", "bf16", "--decode", "device",
            "--threads", "1", "--work", str(tmp_path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for line in ("bare forward: ", "data path alone, 1 workers: ", "pipeline, 1 workers: ", "bare forward again: ",
                 "bf16 vs fp32 features: cosine per row min "):
        assert line in out, out
    assert float(re.search(r"data path alone, 1 workers: ([\d,.]+) images/s", out).group(1).replace(",", "")) > 0
    assert re.search(r"cosine per row min 0\.9\d+", out), out
    assert bench.main(argv) == 0 and "(0.0 s to write)" in capsys.readouterr().out
    assert bench.marginal_rate(100, 400, 2.0, 5.0) == 100.0 and bench.marginal_rate(400, 400, 2.0, 4.0) == 100.0


def test_preprocessing_one_image_at_a_time_or_in_slices_gives_the_batch_bytes(monkeypatch):
    """The workers preprocess each image as it is decoded and the device preprocesses big batches in slices: both
    give bit for bit what ``Encoder.preprocess`` gives for the stacked batch (the stores' bytes do not depend on
    it), photos shrunk (antialiased) and digits enlarged, RGB and gray."""
    from bench_suite.encoders.assets import sample_photos

    enc = get_encoder("efficientnet_lite0", image_size=48)
    prep = extract.preprocessor(enc)
    photos = sample_photos()[:, :300, :400]  # 4 x 300 x 400 x 3 (cut to the crop size)
    from sklearn.datasets import load_digits

    digits = (load_digits().images[:5] * 15).astype(np.uint8)  # 8 x 8, gray
    batches = [photos, photos.mean(-1).astype(np.uint8), digits]
    for images in batches:
        whole = enc.preprocess(images)
        one_by_one = torch.cat([extract.preprocess_image(prep, im) for im in images])
        x = torch.from_numpy(images[..., None] if images.ndim == 3 else images).permute(0, 3, 1, 2).contiguous()
        monkeypatch.setattr(extract, "PREPROCESS_SLICE_BYTES", 2 * 4 * x[0].numel())  # two images per slice
        sliced = extract.preprocess_stacked(x, prep)
        assert whole.shape[1:] == (3, 48, 48)
        assert torch.equal(one_by_one, whole) and torch.equal(sliced, whole)

    # a large image goes to float in numpy, a small one in torch (FLOAT_IN_NUMPY_BYTES): the same value for each
    # of the 256 (no resize here, so nothing would hide a difference), in gray and in RGB
    import types

    from bench_suite.encoders.base import FLOAT_IN_NUMPY_BYTES, Encoder

    side = 1024
    assert side * side * 4 >= FLOAT_IN_NUMPY_BYTES > 300 * 400 * 3 * 4
    same_size = types.SimpleNamespace(**{**vars(prep), "image_size": side})
    values = np.resize(np.arange(256, dtype=np.uint8), side * side * 3)
    for image in (values[:side * side].reshape(1, side, side), values.reshape(1, side, side, 3)):
        x = torch.from_numpy(image[..., None] if image.ndim == 3 else image).permute(0, 3, 1, 2)
        assert torch.equal(Encoder.preprocess(same_size, image), extract.preprocess_tensor(x, side, prep.mean, prep.std))


def test_reduced_decoding_keeps_twice_the_input_and_stays_close(tmp_path):
    """``decode="reduced"``: a JPEG more than twice the input on both sides is decoded at a smaller scale that still
    keeps twice the input (PNGs and smaller JPEGs whole); the features stay close to the exact decode's and are a
    store of their own (fingerprint, variant)."""
    from bench_suite.data.sources import decode_image

    jpeg = _jpeg("RGB", size=(140, 100))  # 100 high, 140 wide
    assert decode_image(jpeg).shape == (100, 140, 3)
    assert decode_image(jpeg, reduce_to=48).shape == (50, 70, 3)  # 1/2: both sides still >= 48
    assert decode_image(jpeg, reduce_to=24).shape == (25, 35, 3)  # 1/4
    assert decode_image(jpeg, reduce_to=60).shape == (100, 140, 3)  # 1/2 would leave 50 < 60
    from bench_suite.bench.extract import jpeg_samples

    shards = tmp_path / "shards"  # 400 x 300 JPEGs of real photos: decoded at 1/2 for a 48-pixel input
    wshards.write_blob_shards(jpeg_samples(12), shards, dataset="photos", count=12, shard_size=6,
                              classes=[str(i) for i in range(10)])
    kw = dict(ENC, image_size=48, batch_size=4, accelerator=Acc(), num_workers=1)
    exact = extract.extract_features(shards, tmp_path / "exact", **kw)
    reduced = extract.extract_features(shards, tmp_path / "reduced", decode="reduced", **kw)
    cos = (np.asarray(reduced.features) * np.asarray(exact.features)).sum(1)
    print(f"reduced vs exact decoding: cosine per row min {cos.min():.6f} mean {cos.mean():.6f}")
    assert cos.min() >= 0.999 and (cos < 1 - 1e-6).any()  # reduced JPEGs (0.9997 measured), close to the exact
    assert reduced.meta["fingerprint"] != exact.meta["fingerprint"]
    assert reduced.meta["variant"] == {"decode": "reduced"}


def test_batches_of_full_size_images_are_cut_by_bytes(small_shards, tmp_path, monkeypatch):
    """Where the device resizes, a worker's batch is cut once its decoded images reach ``BATCH_IMAGE_BYTES`` (here
    ten 8 x 8 digits): the cuts depend on the shards alone, so 0 and 2 workers still write the same store."""
    monkeypatch.setattr(extract, "BATCH_IMAGE_BYTES", 10 * 8 * 8)
    prep = extract.preprocessor(get_encoder("efficientnet_lite0", image_size=32))
    names = [s["name"] for s in wshards.load_manifest(small_shards)["shards"]]
    batches = list(extract.ShardBatches(small_shards, names[:2], 50, prep, preprocess="device", decode="cpu"))
    assert [(b["shard"], b["start"], len(b["ids"])) for b in batches] == \
        [(n, start, 10) for n in names[:2] for start in range(0, 50, 10)]
    kw = dict(ENC, accelerator=Acc(), preprocess="device")
    a = extract.extract_features(small_shards, tmp_path / "w0", num_workers=0, **kw)
    b = extract.extract_features(small_shards, tmp_path / "w2", num_workers=2, **kw)
    assert store_bytes(tmp_path / "w0") == store_bytes(tmp_path / "w2") and len(a.ids) == len(b.ids) == 300
    whole = list(extract.ShardBatches(small_shards, names[:1], 50, prep, preprocess="workers", decode="cpu"))
    assert [len(b["ids"]) for b in whole] == [50]  # preprocessed images are not counted
