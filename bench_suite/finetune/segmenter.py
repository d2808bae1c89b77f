"""Segmenter (Strudel et al., ICCV 2021) in plain torch on a timm backbone, and mIoU the standard way.

The backbone's patch tokens (timm ``forward_features``: prefix tokens + patches after the final norm;
the prefix - CLS and register tokens - is dropped) feed one of Segmenter's two decoders:

- ``linear``: a linear layer from each patch token to class logits;
- ``mask_transformer``: learnable class embeddings are appended to the projected patch tokens and go
  through ``decoder_layers`` transformer blocks; the class masks are the scalar products of the
  L2-normalised patch and class embeddings, followed by a LayerNorm over classes (Segmenter's MaskTransformer).

Both give logits on the patch grid; they are bilinearly upsampled to the label size.

mIoU: one confusion matrix over the whole split (pixels whose label is the ignore index - 255 - are
skipped), per-class IoU = TP / (TP + FP + FN), classes absent from both prediction and labels are NaN and
left out of the mean (as mmsegmentation's IoUMetric does).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- metric
def confusion_matrix(pred, target, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes x num_classes) int64 counts, rows = label, columns = prediction; ignored pixels skipped."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.max()) >= num_classes or int(target.min()) < 0):
        raise ValueError(f"label outside 0..{num_classes - 1} (and not the ignore index {ignore_index})")
    if pred.numel() and (int(pred.max()) >= num_classes or int(pred.min()) < 0):
        raise ValueError(f"prediction outside 0..{num_classes - 1}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes).numpy().astype(np.int64)


def iou_from_confusion(conf: np.ndarray) -> dict:
    """Per-class IoU and accuracy (NaN where undefined), mIoU (nan-mean) and overall pixel accuracy."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(1)
    pr = conf.sum(0)
    union = gt + pr - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    valid = ~np.isnan(iou)
    return {"iou": iou, "acc": acc, "miou": float(iou[valid].mean()) if valid.any() else float("nan"),
            "aacc": float(tp.sum() / conf.sum()) if conf.sum() else float("nan")}


# --------------------------------------------------------------------------- model
class LinearDecoder(nn.Module):
    def __init__(self, d_encoder: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(d_encoder, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens, grid):
        b, _, _ = tokens.shape
        return self.head(tokens).transpose(1, 2).reshape(b, -1, *grid)


class MaskTransformer(nn.Module):
    def __init__(self, d_encoder: int, num_classes: int, n_layers: int = 2, n_heads: int | None = None,
                 d_model: int | None = None, mlp_ratio: float = 4.0, dropout: float = 0.1, drop_path: float = 0.0):
        super().__init__()
        from timm.models.vision_transformer import Block  # timm costs ~3 s to import: only where it is used

        d_model = d_model or d_encoder
        n_heads = n_heads or max(1, d_model // 64)
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(d_encoder, d_model)
        dpr = [drop_path * i / max(1, n_layers - 1) for i in range(n_layers)]
        self.blocks = nn.ModuleList([Block(d_model, n_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout,
                                           drop_path=dpr[i]) for i in range(n_layers)])
        scale = d_model ** -0.5
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, d_model))
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, tokens, grid):
        b, n, _ = tokens.shape
        x = self.proj_dec(tokens)
        x = torch.cat([x, self.cls_emb.expand(b, -1, -1)], 1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, cls_feat = x[:, :n] @ self.proj_patch, x[:, n:] @ self.proj_classes
        patches = F.normalize(patches, dim=-1)
        cls_feat = F.normalize(cls_feat, dim=-1)
        masks = self.mask_norm(patches @ cls_feat.transpose(1, 2))  # (B, P, C)
        return masks.transpose(1, 2).reshape(b, self.num_classes, *grid)


def patch_tokens(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, P, d) patch tokens and the patch grid of a timm ViT (prefix tokens dropped) or CNN feature map."""
    feats = backbone.forward_features(x)
    if feats.ndim == 4:  # CNN: (B, C, h, w)
        b, c, h, w = feats.shape
        return feats.flatten(2).transpose(1, 2), (h, w)
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    tokens = feats[:, prefix:]
    ps = backbone.patch_embed.patch_size
    ph, pw = (ps, ps) if isinstance(ps, int) else ps
    h, w = x.shape[-2] // ph, x.shape[-1] // pw
    if h * w != tokens.shape[1]:
        side = int(math.isqrt(tokens.shape[1]))
        h, w = side, tokens.shape[1] // side
    return tokens, (h, w)


class Segmenter(nn.Module):
    """Backbone patch tokens -> decoder -> logits on the patch grid, (B, C, h, w)."""

    def __init__(self, backbone: nn.Module, d_encoder: int, num_classes: int, decoder: str = "mask_transformer",
                 decoder_layers: int = 2, decoder_dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        if decoder == "linear":
            self.decoder = LinearDecoder(d_encoder, num_classes)
        elif decoder == "mask_transformer":
            self.decoder = MaskTransformer(d_encoder, num_classes, n_layers=decoder_layers, dropout=decoder_dropout)
        else:
            raise ValueError(f"unknown decoder {decoder!r}")

        self.prefix = None  # a bench_suite.finetune.backbone.FrozenPrefix: forward then also takes its cached tokens

    def forward(self, x):
        if x.ndim == 3:  # tokens after the frozen prefix (square patch grid)
            tokens = self.prefix.rest(x)[:, self.prefix.num_prefix_tokens:]
            side = math.isqrt(tokens.shape[1])
            return self.decoder(tokens, (side, tokens.shape[1] // side))
        tokens, grid = patch_tokens(self.backbone, x)
        return self.decoder(tokens, grid)
