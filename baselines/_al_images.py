"""The pool's images for the baselines that train on pixels (vaal, tavaal): read from the store's shards.

A FeatureStore made by ``bench_suite.extract --shards DIR`` records the WebDataset folder its features came
from in ``meta["shards"]``; the images are read from there, row-aligned with the store. Labels in the shards
are never read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_suite.data import shards as wshards
from bench_suite.errors import BadInputError, MissingDataError


def _shard_dir(store, method: str) -> Path:
    shard_dir = (store.meta or {}).get("shards")
    if not shard_dir:
        raise BadInputError(
            f"{method} trains a VAE on the images, but this feature store's meta has no 'shards' folder; use a "
            "store made by `python -m bench_suite.extract --shards DIR` (it records the folder) or set "
            "meta['shards'] to the WebDataset folder the features came from")
    shard_dir = Path(shard_dir)
    if not shard_dir.exists():
        raise MissingDataError(f"{method}: the store's shard folder {shard_dir} does not exist (re-run "
                               "launchers.prepare_shards or fix meta['shards'])")
    return shard_dir


def _to_rgb_u8(image, size: int) -> np.ndarray:
    """One image -> 3 x size x size uint8 (PIL bilinear, antialiased when shrinking; grey -> 3 channels)."""
    im = Image.fromarray(np.asarray(image))
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def load_pool_images(store, size: int = 32, method: str = "vaal") -> np.ndarray:
    """The pool's images as ``N x 3 x size x size`` uint8, row-aligned with the store.

    Read from the WebDataset shard folder in ``store.meta["shards"]`` (recorded by bench_suite.extract),
    resized with PIL bilinear (antialiased when shrinking), grey repeated to 3 channels. Labels in the shards
    are never read. Images are decoded one by one, so pools with images of mixed sizes (ImageNet) work.
    """
    shard_dir = _shard_dir(store, method)
    manifest = wshards.load_manifest(shard_dir)
    wshards.verify_shards(shard_dir)  # a truncated or damaged shard is an error, never missing images
    ids = np.asarray(store.ids, dtype=np.int64)
    out = np.zeros((len(ids), 3, size, size), dtype=np.uint8)
    seen = np.zeros(len(ids), dtype=bool)
    names = [s["name"] for s in manifest["shards"]]
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    for b_ids, b_imgs, *_ in wshards.iter_samples(shard_dir, names, batch_size=1, ids=ids):
        row = int(order[np.searchsorted(sorted_ids, int(b_ids[0]))])
        out[row] = _to_rgb_u8(b_imgs[0], size)
        seen[row] = True
    if not seen.all():
        missing = ids[~seen][:5].tolist()
        raise MissingDataError(f"{method}: {int((~seen).sum())} pool ids have no image in {shard_dir} "
                               f"(first: {missing}); the store and the shard folder do not match")
    return out


def to_unit_range(images_u8: np.ndarray, device) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (VAAL's Normalize(mean 0.5, std 0.5))."""
    return torch.as_tensor(images_u8, device=device).float().div_(127.5).sub_(1.0)
