"""Train-time augmentation: a random-resized crop and a horizontal flip, as one affine resampling per sample.

The parameters of each sample are drawn from (seed, epoch, id), never from a shared random stream, so
they do not depend on which process or which batch a sample lands in: 1 and N processes train on the
same augmented images. Images are resampled bilinearly, segmentation masks with nearest neighbour
through the same transform.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def crop_flip_params(ids: np.ndarray, seed: int, epoch: int, crop_scale, hflip: bool) -> np.ndarray | None:
    """Per-sample (sx, sy, tx, ty) of an affine crop in [-1, 1] coordinates (sx < 0: flipped); None if no aug.

    Drawn from (seed, epoch, id): independent of the process and the batch a sample lands in.
    """
    if crop_scale is None and not hflip:
        return None
    out = np.zeros((len(ids), 4), np.float32)
    for k, gid in enumerate(ids.tolist()):
        rng = np.random.default_rng([seed, epoch, gid, 7919])
        w = h = 1.0
        if crop_scale is not None:
            for _ in range(10):  # torchvision's RandomResizedCrop rule (area scale, log-uniform aspect)
                area = rng.uniform(crop_scale[0], crop_scale[1])
                ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
                if cw <= 1 and ch <= 1:
                    w, h = cw, ch
                    break
        cx = rng.uniform(w / 2, 1 - w / 2) if w < 1 else 0.5
        cy = rng.uniform(h / 2, 1 - h / 2) if h < 1 else 0.5
        flip = hflip and rng.random() < 0.5
        out[k] = (-w if flip else w, h, 2 * cx - 1, 2 * cy - 1)
    return out


def apply_crop_flip(x: torch.Tensor, params: np.ndarray, mask: torch.Tensor | None = None):
    """Resample images (bilinear) and masks (nearest) through the per-sample crop/flip."""
    p = torch.as_tensor(params, device=x.device, dtype=torch.float32)
    theta = torch.zeros(len(p), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mask is None:
        return x, None
    if tuple(mask.shape[-2:]) != tuple(x.shape[-2:]):  # labels kept at their own resolution
        grid = F.affine_grid(theta, [len(p), 1, *mask.shape[-2:]], align_corners=False)
    m = F.grid_sample(mask[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False)
    return x, m[:, 0].round().long()
