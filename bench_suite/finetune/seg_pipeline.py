"""mmsegmentation's ADE20K data pipeline (the Segmenter configs' one) in numpy + torch, without mmcv.

Training, per image (``configs/_base_/datasets/ade20k.py`` of mmsegmentation 1.2.2):

1. ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``: a ratio r ~ U(0.5, 2.0)
   gives the target scale (int(2048 r), int(512 r)); the image is rescaled keeping its aspect ratio so that
   its long side fits the first number and its short side the second (mmcv ``rescale_size``: factor
   min(long / max(h, w), short / min(h, w)), size int(w f + 0.5) x int(h f + 0.5)); bilinear for the image,
   nearest for the labels.
2. ``RandomCrop(crop_size=512, cat_max_ratio=0.75)``: a random 512 x 512 window (smaller where the image is);
   up to 10 redraws while one class covers 75% or more of the window's labelled pixels (or only one class
   is present); the 11th draw is kept whatever it holds.
3. ``RandomFlip(prob=0.5)``, horizontal.
4. ``PhotoMetricDistortion``: brightness (+U(-32, 32)), contrast (x U(0.5, 1.5)) before or after the
   saturation (x U(0.5, 1.5) on HSV's S) and hue (+U{-18..17} on HSV's H, of 180) changes, each with
   probability 0.5, on uint8 values (clipped and truncated after each step, as mmseg does).
5. ``SegDataPreProcessor``: normalised with the encoder's mean / std, then padded at the bottom / right to
   512 x 512 with 0 (labels with the ignore index 255).

The random draws come from a ``numpy.random.RandomState`` seeded with (seed, epoch, sample id): the same
numbers in the same order as mmseg's transforms draw them from ``numpy.random``, so
``np.random.seed([seed, epoch, id, SALT])`` before mmseg's pipeline reproduces our parameters exactly
(``tests/test_seg_pipeline_mmseg.py`` compares the two pipelines' outputs on the same images). They do not
depend on the process or the batch a sample lands in.

Evaluation (``test_pipeline`` + ``test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341))``):
the image is rescaled to fit 2048 x 512 (keeping its aspect ratio), cut into 512 x 512 windows every 341
pixels (the last window of a row / column flush with the border), the windows' logits are upsampled to the
window and averaged where windows overlap, and the result is upsampled (bilinear) to the original image size
before the argmax; labels stay at their original size.

How close to mmseg (tests/test_seg_pipeline_mmseg.py): the resizes reproduce OpenCV's (which mmcv calls) bit
for bit - nearest by its index rule, bilinear by its 11-bit fixed-point arithmetic - and so do the crops, flips
and every random draw: label maps come out identical. RGB->HSV is OpenCV's integer formula (exact); HSV->RGB
follows OpenCV's vectorised float kernel, which differs from it on about 5e-5 of the values by one grey level,
so after the photometric distortion about 5e-4 of the image values differ, by at most 3 levels. Images are
decoded by PIL (mmseg: OpenCV; the same libjpeg output on the files tested). A window narrower than the crop (an
image whose short side stays under 512 after the resize, aspect ratio above 4) is padded for our fixed-size
ViT, where mmseg runs its ViT on the smaller window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SALT = 4271  # the 4th word of each sample's seed: keeps these draws apart from other per-sample streams


@dataclass(frozen=True)
class SegPipeline:
    """The pipeline's settings (a seg_finetune recipe's fields of the same names; ``crop`` = image_size)."""

    crop: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    slide_stride: int = 341
    ignore_index: int = 255
    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    @classmethod
    def of_recipe(cls, recipe: dict) -> "SegPipeline":
        return cls(crop=int(recipe["image_size"]), scale=tuple(int(v) for v in recipe["scale"]),
                   ratio_range=tuple(float(v) for v in recipe["ratio_range"]),
                   cat_max_ratio=float(recipe["cat_max_ratio"]), flip_prob=float(recipe["flip_prob"]),
                   photometric=bool(recipe["photometric"]), slide_stride=int(recipe["slide_stride"]),
                   ignore_index=int(recipe["ignore_index"]))


def sample_rng(seed: int, epoch: int, gid: int) -> np.random.RandomState:
    """The random stream of one sample in one epoch (legacy RandomState: mmseg draws from np.random)."""
    return np.random.RandomState([int(seed) & 0xFFFFFFFF, int(epoch), int(gid), SALT])


# --------------------------------------------------------------------------- geometry
def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new_h, new_w) of mmcv.imrescale(img, scale): the long side fits max(scale), the short min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel for OpenCV's INTER_NEAREST: floor(x * src / dst)."""
    return np.minimum(np.floor(np.arange(dst) * (src / dst)).astype(np.int64), src - 1)


def resize_nearest(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    if mask.shape[:2] == (h, w):
        return mask
    return mask[nearest_index(mask.shape[0], h)[:, None], nearest_index(mask.shape[1], w)[None, :]]


def _linear_taps(src: int, dst: int, lo: int, hi: int, clamp_weight: bool):
    """Source indices and 11-bit weights of destination pixels lo..hi-1 for OpenCV's INTER_LINEAR.

    OpenCV (resize.cpp, resizeGeneric_): f = float((d + 0.5) / (dst / src) - 0.5), s = floor(f), weights
    round((1 - frac) * 2048) and round(frac * 2048). Along x a tap left of 0 or right of src - 1 gets its
    weight set to (2048, 0); along y only the row indices are clamped, the weights stay.
    """
    f = ((np.arange(lo, hi, dtype=np.float64) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_weight:
        out = (s < 0) | (s >= src - 1)
        f[out] = 0
        s = np.clip(s, 0, src - 1)
    s0, s1 = np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1)
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
    w1 = np.rint(f * np.float32(2048)).astype(np.int64)
    return [torch.from_numpy(a) for a in (s0, s1, w0, w1)]


def resize_bilinear(x: torch.Tensor, h: int, w: int, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """(C, H, W) uint8 values -> the (C, h, w) bilinear resize, or only its ``box`` (y1, y2, x1, x2) window.

    Bit-exact with OpenCV's uint8 INTER_LINEAR (what mmcv.imresize calls): 11-bit fixed-point weights, the
    horizontal pass in integers, the vertical pass as OpenCV's SIMD kernel rounds it,
    ((((S0 >> 4) * b0) >> 16) + (((S1 >> 4) * b1) >> 16) + 2) >> 2 (checked against cv2 on random images).
    """
    y1, y2, x1, x2 = box or (0, h, 0, w)
    if tuple(x.shape[-2:]) == (h, w):
        return x[:, y1:y2, x1:x2]
    dev = x.device
    r0, r1, b0, b1 = (t.to(dev) for t in _linear_taps(x.shape[-2], h, y1, y2, clamp_weight=False))
    c0, c1, a0, a1 = (t.to(dev) for t in _linear_taps(x.shape[-1], w, x1, x2, clamp_weight=True))
    xi = x.to(torch.int64)
    rows = torch.unique(torch.cat([r0, r1]))
    pos = torch.zeros(x.shape[-2], dtype=torch.int64, device=dev)
    pos[rows] = torch.arange(len(rows), device=dev)
    hx = xi[:, rows][:, :, c0] * a0 + xi[:, rows][:, :, c1] * a1  # horizontal pass on the rows needed
    s0, s1 = hx[:, pos[r0]], hx[:, pos[r1]]
    out = ((((s0 >> 4) * b0[:, None]) >> 16) + (((s1 >> 4) * b1[:, None]) >> 16) + 2) >> 2
    return out.clamp_(0, 255).to(torch.float32)


def crop_box(mask: np.ndarray, rng: np.random.RandomState, crop: int, cat_max_ratio: float,
             ignore_index: int) -> tuple[int, int, int, int]:
    """mmseg RandomCrop.crop_bbox: (y1, y2, x1, x2), redrawn up to 10 times while one class dominates."""
    h, w = mask.shape[:2]

    def draw():
        oy = rng.randint(0, max(h - crop, 0) + 1)
        ox = rng.randint(0, max(w - crop, 0) + 1)
        return oy, oy + crop, ox, ox + crop

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            cnt = np.bincount(mask[y1:y2, x1:x2].ravel(), minlength=256)
            cnt[ignore_index] = 0
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            box = draw()
    return box


# --------------------------------------------------------------------------- photometric distortion
@dataclass(frozen=True)
class Photometric:
    brightness: float | None = None
    contrast_first: bool = False  # mmseg's mode 1: contrast before saturation / hue, else after
    contrast: float | None = None
    saturation: float | None = None
    hue: int | None = None


def draw_photometric(rng: np.random.RandomState, p: SegPipeline) -> Photometric:
    """mmseg PhotoMetricDistortion's draws, in its order."""
    brightness = rng.uniform(-p.brightness_delta, p.brightness_delta) if rng.randint(2) else None
    mode = rng.randint(2)
    contrast = None
    if mode == 1 and rng.randint(2):
        contrast = rng.uniform(*p.contrast_range)
    saturation = rng.uniform(*p.saturation_range) if rng.randint(2) else None
    hue = int(rng.randint(-p.hue_delta, p.hue_delta)) if rng.randint(2) else None
    if mode == 0 and rng.randint(2):
        contrast = rng.uniform(*p.contrast_range)
    return Photometric(brightness, mode == 1, contrast, saturation, hue)


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg's convert: float32 x * alpha + beta, clipped to [0, 255], truncated to uint8."""
    return (x * np.float32(alpha) + np.float32(beta)).clamp_(0, 255).floor_()


_SDIV = torch.tensor([0] + [round((255 << 12) / i) for i in range(1, 256)], dtype=torch.int64)
_HDIV = torch.tensor([0] + [round((180 << 12) / (6 * i)) for i in range(1, 256)], dtype=torch.int64)


def rgb_to_hsv_u8(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB uint8 values -> OpenCV's uint8 HSV (H in 0..179), integer arithmetic as OpenCV's."""
    r, g, b = x.long().unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    vmin = torch.minimum(torch.minimum(r, g), b)
    diff = v - vmin
    sdiv, hdiv = _SDIV.to(x.device), _HDIV.to(x.device)
    s = (diff * sdiv[v] + (1 << 11)) >> 12
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + (1 << 11)) >> 12
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v]).float()


def hsv_u8_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV's uint8 HSV (H of 180) -> RGB uint8 values, float32 arithmetic as OpenCV's vectorised kernel
    (HSV2RGB_simd: no s == 0 branch, values truncated; its scalar tail rounds instead, which only the last
    few pixels of a row narrower than a multiple of the vector width take)."""
    h, s, v = hsv.float().unbind(0)
    s = s * np.float32(1 / 255)
    v = v * np.float32(1 / 255)
    h = torch.fmod(h * np.float32(6 / 180), 6.0)
    sector = torch.floor(h)
    f = h - sector
    sector = sector.long().clamp_(0, 5)
    tab = torch.stack([v, v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))])  # OpenCV's tab[0..3]
    # OpenCV's sector_data gives (b, g, r) rows; as (r, g, b):
    order = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=hsv.device)
    idx = order[sector].permute(2, 0, 1)  # (3, H, W)
    rgb = torch.gather(tab, 0, idx)
    return torch.floor(rgb * np.float32(255)).clamp_(0, 255)


def photometric(x: torch.Tensor, ph: Photometric) -> torch.Tensor:
    """Apply the drawn distortion to (3, H, W) RGB uint8 values, as mmseg's transform does (on BGR)."""
    if ph.brightness is not None:
        x = _convert(x, beta=ph.brightness)
    if ph.contrast_first and ph.contrast is not None:
        x = _convert(x, alpha=ph.contrast)
    if ph.saturation is not None:
        hsv = rgb_to_hsv_u8(x)
        hsv[1] = _convert(hsv[1], alpha=ph.saturation)
        x = hsv_u8_to_rgb(hsv)
    if ph.hue is not None:
        hsv = rgb_to_hsv_u8(x)
        hsv[0] = torch.remainder(hsv[0] + ph.hue, 180)
        x = hsv_u8_to_rgb(hsv)
    if not ph.contrast_first and ph.contrast is not None:
        x = _convert(x, alpha=ph.contrast)
    return x


# --------------------------------------------------------------------------- one training sample
@dataclass(frozen=True)
class TrainParams:
    """Everything drawn for one sample: resized size, crop window, flip, photometric distortion."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool
    photo: Photometric | None


def draw_train(rng: np.random.RandomState, mask: np.ndarray, p: SegPipeline) -> tuple[TrainParams, np.ndarray]:
    """The sample's parameters (in mmseg's draw order) and its resized label map."""
    lo, hi = p.ratio_range
    ratio = rng.random_sample() * (hi - lo) + lo
    target = (int(p.scale[0] * ratio), int(p.scale[1] * ratio))
    size = rescale_size(mask.shape[0], mask.shape[1], target)
    resized = resize_nearest(mask, *size)
    box = crop_box(resized, rng, p.crop, p.cat_max_ratio, p.ignore_index)
    flip = bool(rng.choice(2, p=[p.flip_prob, 1.0 - p.flip_prob]) == 0)  # mmcv: choice([dir, None], p)
    photo = draw_photometric(rng, p) if p.photometric else None
    return TrainParams(size, box, flip, photo), resized


def to_chw(img: np.ndarray, device) -> torch.Tensor:
    """(H, W) gray or (H, W, 3) RGB uint8 -> (3, H, W) float32 of the same values."""
    t = torch.from_numpy(np.require(img, requirements=["C", "W"]))  # a copy only when read-only
    t = t[None].expand(3, -1, -1) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.to(device).float()


def train_sample(img: np.ndarray, mask: np.ndarray, rng: np.random.RandomState, p: SegPipeline,
                 device="cpu") -> tuple[torch.Tensor, torch.Tensor, TrainParams]:
    """One augmented sample before normalisation: (3, h, w) uint8 values (h, w <= crop) and (h, w) labels."""
    params, resized = draw_train(rng, mask, p)
    y1, y2, x1, x2 = params.box
    m = torch.from_numpy(np.ascontiguousarray(resized[y1:y2, x1:x2])).to(device).long()
    h, w = resized.shape[:2]
    x = resize_bilinear(to_chw(img, device), *params.size, box=(y1, min(y2, h), x1, min(x2, w)))
    if params.flip:
        x, m = x.flip(-1), m.flip(-1)
    if params.photo is not None:
        x = photometric(x, params.photo)
    return x, m, params


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 values -> the encoder's input (mean / std of images in [0, 1], as the registry's encoders)."""
    return (x / 255.0 - mean.view(-1, 1, 1).to(x.device)) / std.view(-1, 1, 1).to(x.device)


def pad_to(x: torch.Tensor, m: torch.Tensor | None, size: int, ignore_index: int):
    """Pad at the bottom / right to size x size: image with 0 (after normalisation), labels with ignore."""
    ph, pw = size - x.shape[-2], size - x.shape[-1]
    if ph > 0 or pw > 0:
        x = F.pad(x, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
        if m is not None:
            m = F.pad(m, (0, max(pw, 0), 0, max(ph, 0)), value=ignore_index)
    return x, m


# --------------------------------------------------------------------------- evaluation
def test_image(img: np.ndarray, p: SegPipeline, device="cpu") -> torch.Tensor:
    """The test pipeline's Resize(scale, keep_ratio=True): (3, h, w) uint8 values."""
    h, w = img.shape[:2]
    return resize_bilinear(to_chw(img, device), *rescale_size(h, w, p.scale))


def windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg slide_inference's windows (y1, y2, x1, x2), in its order."""
    hg = max(h - crop + stride - 1, 0) // stride + 1
    wg = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(hg):
        for j in range(wg):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def slide_logits(model_fn, x: torch.Tensor, num_classes: int, crop: int, stride: int,
                 batch: int = 4) -> torch.Tensor:
    """(1, C, H, W) logits of a normalised (1, 3, H, W) image by mmseg's sliding-window inference.

    ``model_fn`` maps (B, 3, crop, crop) to logits at any resolution; each window's logits are upsampled
    (bilinear) to the window, summed into place and divided by the number of windows covering each pixel.
    """
    _, _, h, w = x.shape
    boxes = windows(h, w, crop, stride)
    preds = x.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = x.new_zeros((1, 1, h, w), dtype=torch.float32)
    for s in range(0, len(boxes), batch):
        part = boxes[s:s + batch]
        crops = torch.cat([pad_to(x[:, :, y1:y2, x1:x2], None, crop, 0)[0] for y1, y2, x1, x2 in part])
        logits = model_fn(crops).float()
        for k, (y1, y2, x1, x2) in enumerate(part):
            if logits.shape[-2:] != (crop, crop):
                lk = F.interpolate(logits[k:k + 1], size=(crop, crop), mode="bilinear", align_corners=False)
            else:
                lk = logits[k:k + 1]
            preds[:, :, y1:y2, x1:x2] += lk[:, :, :y2 - y1, :x2 - x1]
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count
