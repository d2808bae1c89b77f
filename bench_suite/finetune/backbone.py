"""What a finetuning trains of a timm backbone, and the frozen-prefix shortcut that follows from it.

``trainable_blocks: K`` trains only the backbone's last K blocks and everything registered after them
(final norm, head); ``drop_path`` sets stochastic depth over the blocks. When the first blocks are frozen
and the inputs are not augmented, their output never changes during training, so ``FrozenPrefix``
computes it once per sample and the model then runs only its last blocks: the same numbers (checked on
a batch before use) for a fraction of the compute. Frozen submodules are kept in eval mode.
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn as nn

from bench_suite.errors import BadInputError

log = logging.getLogger(__name__)


def find_blocks(module: nn.Module) -> tuple[str, list[nn.Module]]:
    """The backbone's block sequence (timm ViT ``blocks``; EfficientNet ``blocks`` stages flattened)."""
    for name, sub in module.named_modules():
        if name.split(".")[-1] == "blocks" and isinstance(sub, (nn.Sequential, nn.ModuleList)):
            blocks = []
            for child in sub:
                if isinstance(child, (nn.Sequential, nn.ModuleList)) and not hasattr(child, "attn"):
                    blocks.extend(list(child))
                else:
                    blocks.append(child)
            return name, blocks
    raise BadInputError(f"{type(module).__name__}: no `blocks` sequence found; use trainable_blocks: all")


def set_trainable(backbone: nn.Module, trainable_blocks) -> dict:
    """Freeze all but the last K blocks and everything registered after them (final norm, head)."""
    params = list(backbone.named_parameters())
    if trainable_blocks == "all":
        for _, p in params:
            p.requires_grad_(True)
        return {"trainable_blocks": "all", "total_blocks": None}
    name, blocks = find_blocks(backbone)
    k = int(trainable_blocks)
    if k > len(blocks):
        raise BadInputError(f"trainable_blocks={k} but the backbone has {len(blocks)} blocks")
    train_ids = {id(p) for b in blocks[len(blocks) - k:] for p in b.parameters()}
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    last_block_pos = max((i for i, (_, p) in enumerate(params) if id(p) in block_ids), default=-1)
    for i, (_, p) in enumerate(params):
        p.requires_grad_(id(p) in train_ids or (i > last_block_pos and id(p) not in block_ids))
    return {"trainable_blocks": k, "total_blocks": len(blocks)}


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth increasing linearly over the blocks (0 .. rate), as timm's drop_path_rate does."""
    if rate <= 0:
        return
    from timm.layers import DropPath  # timm costs ~3 s to import: only where it is used (CLI start-up)

    _, blocks = find_blocks(backbone)
    n = len(blocks)
    for i, block in enumerate(blocks):
        r = rate * i / max(1, n - 1)
        for attr in ("drop_path", "drop_path1", "drop_path2"):
            if hasattr(block, attr) and isinstance(getattr(block, attr), (nn.Identity, DropPath)):
                setattr(block, attr, DropPath(r) if r > 0 else nn.Identity())
                if hasattr(getattr(block, attr), "drop_prob"):
                    getattr(block, attr).drop_prob = r


class FrozenPrefix:
    """The frozen first blocks of a timm ViT, run once per sample and cached as tokens.

    With ``trainable_blocks: K`` and no train-time augmentation, the input of block N-K never changes
    during training, so it is computed once (train subset and test split) and the model then runs only
    its last K blocks, final norm and head: the same numbers (checked on a batch before use) for a
    fraction of the compute.
    """

    def __init__(self, vit: nn.Module, start: int):
        self.vit, self.start = vit, start
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        self._digest: str | None = None

    def digest(self) -> str:
        """A digest of everything the tokens depend on besides the input: the model class, the frozen block
        count and the frozen weights (embeddings, pre-norm, the first ``start`` blocks), so two copies of the same
        pretrained backbone share cached tokens and anything else does not."""
        if self._digest is None:
            h = hashlib.blake2b(f"{type(self.vit).__name__}:{self.start}".encode(), digest_size=16)
            v = self.vit
            named = [(n, t) for m in self._modules() if m is not None for n, t in m.state_dict().items()]
            named += [(a, getattr(v, a)) for a in ("pos_embed", "cls_token", "reg_token")
                      if isinstance(getattr(v, a, None), torch.Tensor)]
            for name, t in named:
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def _modules(self):
        v = self.vit
        return [v.patch_embed, getattr(v, "pos_drop", None), v.patch_drop, v.norm_pre, *v.blocks[:self.start]]

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        mods = [m for m in self._modules() if m is not None]
        modes = [m.training for m in mods]
        for m in mods:
            m.eval()
        try:
            v = self.vit
            t = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
            for block in v.blocks[:self.start]:
                t = block(t)
        finally:
            for m, mode in zip(mods, modes):
                m.train(mode)
        return t

    def rest(self, t: torch.Tensor) -> torch.Tensor:
        for block in self.vit.blocks[self.start:]:
            t = block(t)
        return self.vit.norm(t)


def frozen_prefix(backbone: nn.Module, trainable_blocks) -> FrozenPrefix | None:
    """A FrozenPrefix when the backbone is a timm ViT whose first blocks are frozen; else None."""
    vit = getattr(backbone, "model", backbone)
    needed = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm")
    if trainable_blocks == "all" or not all(hasattr(vit, a) for a in needed):
        return None
    start = len(vit.blocks) - int(trainable_blocks)
    if start <= 0:
        return None
    frozen = [vit.patch_embed, *vit.blocks[:start]]
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        return None
    if any(getattr(vit, a, None) is not None and getattr(vit, a).requires_grad for a in ("pos_embed", "cls_token")):
        return None
    return FrozenPrefix(vit, start)


def enable_prefix(model: nn.Module, recipe: dict, x: torch.Tensor) -> FrozenPrefix | None:
    """Give ``model`` (with ``.backbone`` and a ``prefix`` attribute that its forward honours for 3-D token
    inputs) a FrozenPrefix, after checking on ``x`` that the token path gives the same outputs."""
    prefix = frozen_prefix(model.backbone, recipe["trainable_blocks"])
    if prefix is None:
        return None
    was = model.training
    model.to(x.device).eval()
    try:
        with torch.no_grad():
            ref = model(x)
            model.prefix = prefix
            got = model(prefix.tokens(x))
    finally:
        model.train(was)
    if not torch.allclose(ref, got, rtol=1e-4, atol=1e-4):
        model.prefix = None
        log.warning("frozen-prefix caching disabled: token path differs from the image path by %.2e",
                    float((ref - got).abs().max()))
        return None
    return prefix


def freeze_frozen_modules(model: nn.Module) -> None:
    """Keep fully frozen submodules in eval mode (batch-norm statistics, dropout, drop-path stay fixed)."""
    for m in model.modules():
        ps = list(m.parameters())
        if ps and not any(p.requires_grad for p in ps):
            m.eval()
