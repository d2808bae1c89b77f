"""ADE20K (SceneParsing, ADEChallengeData2016) from a local copy: the paper's segmentation dataset (Table 2).

    --source ade20k=PATH   # PATH = ADEChallengeData2016/ with images/{training,validation}/*.jpg and
                           # annotations/{training,validation}/*.png (the official zip, as mmsegmentation uses it)

Sample id i is the i-th image of the split sorted by file name (ADE_train_00000001 ...): the order
``launchers/mmseg/train.py`` uses, so selections made on these features name the same images there.
Masks follow mmsegmentation's ``reduce_zero_label``: annotation 0 ("other") becomes 255 (ignored) and
class k (1..150) becomes k - 1. ADE20K has no image-level label; the shards' ``cls`` is 0.
Class names come from ``objectInfo150.txt`` (or .csv) when the copy has it, else ``class_1`` ... ``class_150``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from bench_suite.data.registry import DatasetSpec, RawSplit, register
from bench_suite.errors import MissingDataError

NUM_CLASSES = 150
SPLIT_DIR = {"train": "training", "test": "validation", "val": "validation"}


class ReducedMasks:
    """Lazy masks: reading item i decodes annotation i and applies reduce_zero_label (0 -> 255, k -> k - 1)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            ann = np.asarray(im)
        if ann.ndim != 2 or ann.max(initial=0) > NUM_CLASSES:
            raise MissingDataError(f"{self.paths[i]}: not an ADE20K class-index annotation (2-D, values 0..150)")
        return np.where(ann == 0, 255, ann.astype(np.int16) - 1).astype(np.uint8)


def class_names(root: Path) -> list[str]:
    for name in ("objectInfo150.txt", "objectInfo150.csv"):
        path = root / name
        if path.is_file():
            rows = list(csv.reader(path.read_text().splitlines(), delimiter="\t" if name.endswith(".txt") else ","))
            names = [r[-1].split(";")[0].strip() for r in rows[1:] if r]
            if len(names) == NUM_CLASSES:
                return names
    return [f"class_{k}" for k in range(1, NUM_CLASSES + 1)]


def _load(split: str, source: Path) -> RawSplit:
    root = source / "ADEChallengeData2016" if (source / "ADEChallengeData2016").is_dir() else source
    img_dir, ann_dir = root / "images" / SPLIT_DIR[split], root / "annotations" / SPLIT_DIR[split]
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise MissingDataError(f"ADE20K: {img_dir} or {ann_dir} not found (point --source at ADEChallengeData2016/)")
    images = sorted(img_dir.glob("*.jpg"))
    if not images:
        raise MissingDataError(f"ADE20K: no .jpg images in {img_dir}")
    anns = [ann_dir / f"{p.stem}.png" for p in images]
    missing = [a.name for a in anns if not a.is_file()]
    if missing:
        raise MissingDataError(f"ADE20K: {len(missing)} annotation(s) missing in {ann_dir}, e.g. {missing[0]}")
    return RawSplit(images, np.zeros(len(images), dtype=np.int64), class_names(root), masks=ReducedMasks(anns))


SPEC = register(DatasetSpec(
    "ade20k", "ADE20K SceneParsing (ADEChallengeData2016) from a local copy, 150 classes, reduce_zero_label masks",
    ("train", "test"), _load, needs_source=True,
    install_hint="ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/, unzipped", task="seg",
    label="ADE20k", split_sizes={"train": 20_210, "test": 2_000}))
