"""``python -m bench_suite.cli.select --images DIR``: a folder of real photos (crops of scikit-learn's two
sample photos: JPEGs and PNGs, several sizes, grey and RGB, in sub-folders) -> shards -> features ->
selection in one command; each stage cached; the JSON names the selected images by their relative paths;
``--shards`` on the same shards gives the same selection."""

import json
import os

import numpy as np
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
