"""``python -m bench_suite.cli.select --images DIR``: a folder of real photos (crops of scikit-learn's two
sample photos: JPEGs and PNGs, several sizes, grey and RGB, in sub-folders) -> shards -> features ->
selection in one command; each stage cached; the JSON names the selected images by their relative paths;
``--shards`` on the same shards gives the same selection."""

import json
import socket

import numpy as np
import pytest
from PIL import Image

from bench_suite.cli import select as select_cli
from bench_suite.encoders.assets import sample_photos


def photo_folder(root):
    photos = sample_photos()  # 4 x 427 x 427 x 3, real photos
    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        src = photos[i % 4]
        h, w = [(120, 160), (96, 96), (150, 100)][i % 3]
        y, x = rng.integers(0, 427 - h), rng.integers(0, 427 - w)
        im = Image.fromarray(src[y:y + h, x:x + w])
        if i % 5 == 0:
            im = im.convert("L")
        sub = root / ("outdoor" if i % 2 else "misc/b")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"img{i:02d}.png" if i % 4 == 0 else f"img{i:02d}.jpg")
        im.save(path)
        paths.append(path.relative_to(root).as_posix())
    (root / "notes.txt").write_text("not an image")
    return sorted(paths)


def test_images_folder_to_selection_in_one_command(tmp_path):
    images = tmp_path / "photos"
    paths = photo_folder(images)
    work = tmp_path / "work"
    common = ["--encoder", "efficientnet_lite0", "--image-size", "64", "--budget", "5", "--method", "activeft",
              "--set", "iters=20", "--work", str(work)]
    out, picks = tmp_path / "sel.json", tmp_path / "picks.txt"
    assert select_cli.main(["--images", str(images), *common, "--out", str(out), "--out-list", str(picks)]) == 0
    sel = json.loads(out.read_text())
    assert len(sel["ids"]) == 5 and len(set(sel["ids"])) == 5
    assert sel["paths"] == [paths[i] for i in sel["ids"]]  # id i is the i-th image in sorted path order
    assert picks.read_text().splitlines() == sel["paths"]
    assert all((images / p).is_file() for p in sel["paths"])

    # rerun: every stage comes from the cache (the shard folder, the store and the selection are not rewritten)
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    assert select_cli.main(["--images", str(images), *common, "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["paths"] == sel["paths"]
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == stamps

    # --shards on the same shard folder: the same selection, the same paths (the store is reused too)
    shard_dir = next((work / "shards").glob("images-photos-*[!k]"))
    assert select_cli.main(["--shards", str(shard_dir), *common, "--out", str(tmp_path / "shards.json")]) == 0
    assert json.loads((tmp_path / "shards.json").read_text())["paths"] == sel["paths"]

    # a new or changed image changes the folder's key (new shards next time); a non-image file does not
    from bench_suite.data.shards import folder_key

    key = folder_key(images)
    (images / "more notes.txt").write_text("still not an image")
    assert folder_key(images) == key
    Image.fromarray(sample_photos()[0][:100, :100]).save(images / "zz_new.jpg")
    assert folder_key(images) != key


def test_images_errors(tmp_path, cli_error):
    (tmp_path / "empty").mkdir()
    assert "needs --encoder" in cli_error(select_cli.main, ["--images", tmp_path / "empty", "--budget", "2",
                                                            "--out", tmp_path / "s.json"])
    assert "no image files" in cli_error(select_cli.main, ["--images", tmp_path / "empty", "--encoder",
                                                           "efficientnet_lite0", "--budget", "2", "--work",
                                                           tmp_path / "w", "--out", tmp_path / "s.json"])
    assert "give one of" in cli_error(select_cli.main, ["--images", tmp_path, "--shards", tmp_path, "--budget", "2",
                                                        "--out", tmp_path / "s.json"])


def test_unreadable_images_and_a_budget_too_large_stop_the_run_before_any_work(tmp_path, cli_error):
    """A folder with an empty .jpg and a text file named .png fails at once, naming both (no shards written); a
    budget larger than the folder and an unknown encoder fail before the folder is sharded too."""
    images = tmp_path / "photos"
    photo_folder(images)
    (images / "notes.txt").unlink()  # its note in the log would be a second line on stderr
    (images / "empty.jpg").write_bytes(b"")
    (images / "misc" / "fake.png").write_text("not a png")
    work = tmp_path / "work"
    common = ["--encoder", "efficientnet_lite0", "--budget", "3", "--work", work, "--out", tmp_path / "s.json"]
    err = cli_error(select_cli.main, ["--images", images, *common])
    assert "2 of 26 files are not readable images: empty.jpg (empty file), misc/fake.png (" in err, err
    assert not (work / "shards").exists() or not any((work / "shards").iterdir())
    (images / "empty.jpg").unlink()
    (images / "misc" / "fake.png").unlink()
    err = cli_error(select_cli.main, ["--images", images, *common[:3], "100", *common[4:]])
    assert err == "error: budget 100 is larger than the pool (24 samples)", err
    err = cli_error(select_cli.main, ["--images", images, "--encoder", "effnet", *common[2:]])
    assert "effnet" in err and "efficientnet_lite0" in err, err
    assert not (work / "shards").exists() or not any((work / "shards").iterdir())


def _jpeg_bytes(array, **save):
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def last_error_line(argv, capsys) -> str:
    """Run the command line in this process where it fails after some work: exit status 2, and its last line on
    stderr (after the progress lines), which is returned."""
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        select_cli.main([str(a) for a in argv])
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_image_cut_short_is_named_by_its_path(tmp_path, capsys):
    """A JPEG whose header reads but whose data is cut short passes the folder check and fails in extraction:
    the error (one line, after the progress lines) names its path, from the worker (1 worker) as from the main
    process (0 workers)."""
    images = tmp_path / "photos"
    photo_folder(images)
    whole = _jpeg_bytes(sample_photos()[1][:200, :200])
    (images / "outdoor" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    for workers in (0, 1):
        argv = ["--images", images, "--encoder", "efficientnet_lite0", "--image-size", "32", "--budget", "3",
                "--workers", workers, "--work", tmp_path / "w", "--out", tmp_path / "s.json"]
        err = last_error_line(argv, capsys)
        assert err.startswith(f"error: {images.resolve() / 'outdoor' / 'cut.jpg'}: sample ") and \
            "cannot decode its image: OSError: image file is truncated" in err, err


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (as phones store portraits) gets the features of the
    same photo stored upright when it comes from a folder (PNG: the same pixels, so the same row); shards of a
    dataset keep images as stored (the paper's loaders), where the two differ."""
    from bench_suite import extract
    from bench_suite.data import shards as wshards
    from bench_suite.store import FeatureStore

    upright = Image.fromarray(sample_photos()[2][:120, :180])
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    folder = tmp_path / "photos"
    folder.mkdir()
    upright.save(folder / "a_upright.png")
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "b_sideways.png", exif=exif.tobytes())
    Image.fromarray(sample_photos()[3][:120, :180]).save(folder / "c_other.png")
    kw = dict(encoder="efficientnet_lite0", image_size=48, batch_size=4, progress=False, threads=1, num_workers=0)
    wshards.write_folder_shards(folder, tmp_path / "folder-shards")
    oriented = np.asarray(extract.extract_features(tmp_path / "folder-shards", tmp_path / "f1", **kw).features)
    assert np.array_equal(oriented[0], oriented[1])
    blobs = [(folder / n).read_bytes() for n in ("a_upright.png", "b_sideways.png", "c_other.png")]
    wshards.write_blob_shards(((i, b, 0) for i, b in enumerate(blobs)), tmp_path / "set-shards", dataset="set",
                              count=3, classes=["x"])
    stored = np.asarray(extract.extract_features(tmp_path / "set-shards", tmp_path / "f2", **kw).features)
    assert float(stored[0] @ stored[1]) < 0.99
    assert FeatureStore.open(tmp_path / "f1").meta["variant"] == {"orientation": "exif"}


def test_device_decoding_leaves_an_oriented_jpeg_to_the_worker(tmp_path):
    """With device decoding, a JPEG with an EXIF orientation goes to the worker's decoder, which turns it."""
    from bench_suite import extract
    from bench_suite.data import shards as wshards
    from bench_suite.encoders import get_encoder

    photo = sample_photos()[0][:64, :96]
    exif = Image.Exif()
    exif[0x0112] = 8
    blobs = [_jpeg_bytes(photo), _jpeg_bytes(photo, exif=exif.tobytes())]
    wshards.write_blob_shards(((i, b, 0) for i, b in enumerate(blobs)), tmp_path / "s", dataset="d", count=2,
                              classes=["x"])
    prep = extract.preprocessor(get_encoder("efficientnet_lite0", image_size=32))
    names = [p.name for p in (tmp_path / "s").glob("*.tar")]
    for orient, flags in ((True, [True, False]), (False, [True, True])):
        batch, = extract.ShardBatches(tmp_path / "s", names, 4, prep, preprocess="device", decode="device",
                                      orient=orient)
        assert batch["encoded"] == flags
        if orient:
            assert batch["shapes"][1] == (3, 96, 64)  # turned: 96 high, 64 wide


def test_folder_shard_size_leaves_the_workers_shards_to_share():
    from bench_suite.data.shards import folder_shard_size

    assert [folder_shard_size(n) for n in (1, 24, 900, 5000, 20000, 10**6)] == [64, 64, 64, 128, 512, 1024]
    assert folder_shard_size(900, batch_size=256) == 256 and folder_shard_size(10**6, batch_size=2048) == 2048
    assert folder_shard_size(20000) == folder_shard_size(20000 + 100) == folder_shard_size(20000 - 100)


def test_content_cuts_keep_the_shards_an_added_or_removed_image_leaves_alone():
    """Shards cut by the paths' hashes: about the target size (half to twice it), the same cuts every time, and
    an image added or removed anywhere changes at most two shards (fixed-size cuts would change every later one)."""
    from bench_suite.data.shards import content_cuts

    names = sorted(f"trip{i // 300:02d}/IMG_{i:05d}.JPG" for i in range(6000))

    def shards(listing):
        sizes, out, at = content_cuts(listing, 128), [], 0
        assert sum(sizes) == len(listing) and all(s <= 256 for s in sizes) and all(s >= 64 for s in sizes[:-1])
        for size in sizes:
            out.append(tuple(listing[at:at + size]))
            at += size
        return out

    before = shards(names)
    assert shards(names) == before and 30 <= len(before) <= 70
    rng = np.random.default_rng(0)
    changed = []
    for i in rng.choice(len(names), 20, replace=False).tolist():
        for after in (shards(sorted(names + [names[i] + ".copy.jpg"])), shards(names[:i] + names[i + 1:])):
            changed.append(len(set(after) - set(before)))
    assert max(changed) <= 3 and np.mean(changed) <= 1.5, changed  # measured on 200 changes: 1.16 on average
    assert content_cuts([], 64) == [0] and content_cuts(["a"], 64) == [1]


def test_a_folder_with_photos_added_extracts_only_their_shards(tmp_path, capsys, monkeypatch):
    """select --images on a folder, then on the same folder with two photos added and one removed: the shards
    they leave alone get their features from the first store, and the new store is byte for byte the one a fresh
    extraction writes (--force in another work folder), as is the selection."""
    import shutil

    from bench_suite.store import FeatureStore

    monkeypatch.setenv("BENCH_SUITE_THREADS", "1")  # the stores' thread count (another is tried below)
    images = tmp_path / "photos"
    photo_folder(images)
    work = tmp_path / "work"
    common = ["--encoder", "efficientnet_lite0", "--image-size", "32", "--shard-size", "3", "--budget", "4",
              "--set", "iters=20", "--work", str(work)]
    assert select_cli.main(["--images", str(images), *common, "--out", str(tmp_path / "a.json")]) == 0
    shutil.copy(images / "outdoor" / "img01.jpg", images / "outdoor" / "img01b.jpg")
    Image.fromarray(sample_photos()[3][:90, :90]).save(images / "misc" / "b" / "img99.png")
    (images / "misc" / "b" / "img10.jpg").unlink()
    capsys.readouterr()
    assert select_cli.main(["--images", str(images), *common, "--out", str(tmp_path / "b.json")]) == 0
    err = capsys.readouterr().err
    reused = [line for line in err.splitlines() if " reused the features of " in line]
    assert len(reused) == 1, reused
    assert "1 shard folders of " in err and "'s earlier versions" in err, err  # a copy each: named, to delete
    # every shard of the new folder whose images an old shard held, and only those, is reused
    manifests = sorted((json.loads(m.read_text()) for m in (work / "shards").glob("images-photos-*/manifest.json")),
                       key=lambda m: m["count"])  # 24 images, then 25
    old_contents = {sh["content"] for sh in manifests[0]["shards"]}
    same = [sh for sh in manifests[1]["shards"] if sh["content"] in old_contents]
    assert len(same) >= 3 and f"reused the features of {len(same)} shards ({sum(sh['count'] for sh in same)} " \
        "images)" in reused[0], (reused, len(same))
    fresh = ["--images", str(images), *common[:-1], str(tmp_path / "fresh"), "--force"]
    assert select_cli.main([*fresh, "--out", str(tmp_path / "c.json")]) == 0
    stores = [max((w / "features").glob("images-photos-*[!k]"), key=lambda p: p.stat().st_mtime_ns)
              for w in (work, tmp_path / "fresh")]
    for name in ("features.npy", "ids.npy", "labels.npy"):
        assert (stores[0] / name).read_bytes() == (stores[1] / name).read_bytes(), name
    assert FeatureStore.open(stores[0]).meta["fingerprint"] == FeatureStore.open(stores[1]).meta["fingerprint"]
    b, c = (json.loads((tmp_path / n).read_text()) for n in ("b.json", "c.json"))
    assert b["ids"] == c["ids"] and b["paths"] == c["paths"] and len(b["paths"]) == 4

    # --drop-old-shards: once the features are stored, the earlier versions' shard folders go (and what a killed
    # deletion left); one that another run is writing (its lock held) and another folder's shards stay; the
    # features of the dropped folders are still reused
    from bench_suite import atomic, locks
    from bench_suite.data import shards as wshards

    shard_dirs = sorted((work / "shards").glob("images-photos-*[!k]"))
    assert len(shard_dirs) == 2
    leftover = work / "shards" / f".{shard_dirs[0].name}.tmp.999999999.{socket.gethostname()}.x"
    leftover.mkdir()
    (leftover / "shard-000000.tar").write_bytes(b"half gone")
    other_folder = tmp_path / "other" / "photos"
    photo_folder(other_folder)
    assert select_cli.main(["--images", str(other_folder), *common, "--out", str(tmp_path / "d.json")]) == 0
    (images / "misc" / "b" / "img99.png").unlink()
    busy = shard_dirs[1].with_name(shard_dirs[1].name + ".lock")
    assert locks.try_lock(busy)
    capsys.readouterr()
    drop = ["--images", str(images), *common, "--drop-old-shards"]
    assert select_cli.main([*drop, "--out", str(tmp_path / "e.json")]) == 0
    err = capsys.readouterr().err
    assert " reused the features of " in err and "deleted 1 shard folders of " in err, err
    assert f"left {shard_dirs[1]}: another run is writing it" in err, err
    assert not shard_dirs[0].exists() and shard_dirs[1].is_dir() and not leftover.exists()
    locks.release(busy)
    busy = work / "features" / f"{shard_dirs[1].name}-0123abcd-efficientnet_lite0-32-default-fp32.lock"
    assert locks.try_lock(busy)
    assert select_cli.main([*drop, "--out", str(tmp_path / "f.json")]) == 0
    assert f"left {shard_dirs[1]}: another run is extracting its features" in capsys.readouterr().err
    locks.release(busy)
    assert select_cli.main([*drop, "--out", str(tmp_path / "f.json")]) == 0
    assert "deleted 1 shard folders of " in capsys.readouterr().err
    left = [p for p in (work / "shards").iterdir()]
    assert len(left) == 2 and not shard_dirs[1].exists(), left  # this version's copy and the other folder's
    assert {wshards.load_manifest(p)["source"] for p in left} == {str(images.resolve()), str(other_folder.resolve())}
    # the same version at another shard size is not an earlier version: both stay
    assert select_cli.main([*drop, "--shard-size", "4", "--out", str(tmp_path / "g.json")]) == 0
    assert "deleted" not in capsys.readouterr().err and len(list((work / "shards").iterdir())) == 3
    # a folder that cannot be renamed away (here: gone) raises, and no temporary folder is left beside it
    with pytest.raises(FileNotFoundError):
        atomic.remove_dir(work / "shards" / "gone")
    assert sorted(p.name for p in (work / "shards").iterdir() if p.name.startswith(".")) == []
    assert len(list((work / "features").glob("images-photos-*[!k]"))) == 5  # the stores stay (the 5th: size 4)

    # another batch size or thread count could round differently: nothing is reused from stores made otherwise
    for i, (option, env) in enumerate([(["--batch-size", "3"], "1"), ([], "2")]):
        (images / "outdoor" / f"img0{2 * i + 1}.jpg").unlink()
        capsys.readouterr()
        monkeypatch.setenv("BENCH_SUITE_THREADS", env)
        argv = ["--images", str(images), *common, *option, "--out", str(tmp_path / "d.json")]
        assert select_cli.main(argv) == 0
        assert " reused the features of " not in capsys.readouterr().err

    # a damaged earlier store is passed over, with a warning naming it
    monkeypatch.setenv("BENCH_SUITE_THREADS", "1")
    for store in (work / "features").glob("images-photos-*[!k]"):
        data = bytearray((store / "features.npy").read_bytes())
        data[-7] ^= 0x10
        (store / "features.npy").write_bytes(bytes(data))
    (images / "outdoor" / "img05.jpg").unlink()
    capsys.readouterr()
    assert select_cli.main(["--images", str(images), *common, "--out", str(tmp_path / "f.json")]) == 0
    err = capsys.readouterr().err
    assert " reused the features of " not in err and "not reusing features from " in err, err


def test_small_images_are_named_in_a_warning(tmp_path, caplog):
    import logging

    from bench_suite.data import shards as wshards

    images = tmp_path / "photos"
    photo_folder(images)
    Image.fromarray(sample_photos()[0][:20, :30]).save(images / "misc" / "icon.png")
    files = wshards.list_images(images, note_skipped=False)
    with caplog.at_level(logging.WARNING, logger="bench_suite.data.shards"):
        wshards.check_images(images, files)
        wshards.check_images(images, files, warn_small=False)  # another rank: says nothing
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "1 of 25 images are under 64 pixels on a side" in warned[0], warned
    assert warned[0].endswith("misc/icon.png (30x20)"), warned


def test_a_line_break_in_a_picked_name_writes_the_json_but_no_list(tmp_path, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    for i, name in enumerate(["a.png", "b\nc.png", "d.png"]):
        Image.fromarray(sample_photos()[i][:40, :40]).save(images / name)
    out, picks = tmp_path / "sel.json", tmp_path / "picks.txt"
    out.write_text('{"old": "stale"}')
    err = last_error_line(["--images", images, "--encoder", "efficientnet_lite0", "--image-size", "32", "--budget", "3",
                           "--set", "iters=5", "--work", tmp_path / "w", "--out", out, "--out-list", picks], capsys)
    assert "b\\nc.png has a line break in its name, so no list is written" in err, err
    assert sorted(json.loads(out.read_text())["paths"]) == ["a.png", "b\nc.png", "d.png"] and not picks.exists()
