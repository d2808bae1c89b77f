"""The cpu profile's task model of the active-learning baselines (coreset, learnloss, tavaal, alfamix): a head.

The paper retrains DeiT-S (DINO) in every round; the paper profile does too (``task_model: finetune``,
``baselines/_al_backbone.py``). With ``task_model: head`` (the default, the cpu profile) the task model is the
frozen encoder (its features are the FeatureStore) plus a trainable head: an MLP ``d -> hidden... -> C`` (default one
hidden layer of 256 ReLU units) trained with a fixed, seeded recipe (``head_*`` options, default Adam,
lr 1e-2, weight decay 5e-4, batch 64, 100 epochs, lr / 10 after 80% of the epochs as in the originals'
step schedules). The head's last hidden layer is "the model's embedding" (CoreSet's feature space,
ALFA-Mix's mixing space) and its hidden layers are LearnLoss's intermediate features. Training is
deterministic for a seed (own RNG streams; the global torch RNG is forked, not disturbed: ``forked_rng``).

Also here: LearnLoss's loss prediction module (``LossNet``, ``loss_pred_loss``, trained jointly with the head
by ``train_head(loss_module=True)``) and its options (``RankerOptions``, shared by learnloss and tavaal).

Options (``HeadOptions``, a field mixin of the protocol's options): head_hidden, head_epochs, head_lr,
head_optimizer, head_momentum, head_weight_decay, head_batch_size, head_lr_step.

Scale: every pass over the pool runs in row blocks (``BLOCK`` rows; O(N) memory besides the N x hidden
embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_suite.errors import BadInputError
from bench_suite.options import opt

BLOCK = 65536  # rows per block in passes over the pool


def _positive(v) -> str | None:
    return None if v > 0 else "positive"


# --------------------------------------------------------------------------- options and recipe
@dataclass
class HeadOptions:
    """The ``head_*`` options (a mixin: the protocol's ``LearnerOptions`` extends it)."""

    head_hidden: tuple[int, ...] = opt((256,), minimum=1, doc="hidden widths, e.g. 256 or '512,256'; '' = linear")
    head_epochs: int = opt(100, minimum=1)
    head_lr: float = opt(1e-2, check=_positive)
    head_optimizer: str = opt("adam", choices=("adam", "sgd"))
    head_momentum: float = opt(0.9, minimum=0, doc="sgd only")
    head_weight_decay: float = opt(5e-4, minimum=0)
    head_batch_size: int = opt(64, minimum=1)
    head_lr_step: float = opt(0.8, minimum=0, doc="lr /= 10 from this fraction of the epochs on (>= 1 disables)")


@dataclass
class RankerOptions:
    """LearnLoss's ranker (loss prediction module) options, shared by learnloss and tavaal (a mixin)."""

    subset_size: int = opt(10000, minimum=0, doc="random unlabelled subset scored per round (0 = all)")
    margin: float = opt(1.0, minimum=0)
    loss_weight: float = opt(1.0, minimum=0)
    stop_grad_frac: float = opt(0.6, minimum=0, maximum=1)


@dataclass
class HeadRecipe:
    hidden: tuple = (256,)
    epochs: int = 100
    lr: float = 1e-2
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    batch_size: int = 64
    lr_step: float = 0.8  # lr /= 10 from this fraction of the epochs on (>= 1 disables)

    @classmethod
    def from_options(cls, options: HeadOptions) -> "HeadRecipe":
        """The recipe of checked ``head_*`` options."""
        return cls(hidden=tuple(options.head_hidden), epochs=options.head_epochs, lr=options.head_lr,
                   optimizer=options.head_optimizer, momentum=options.head_momentum,
                   weight_decay=options.head_weight_decay, batch_size=options.head_batch_size,
                   lr_step=options.head_lr_step)


# --------------------------------------------------------------------------- models
class MLPHead(nn.Module):
    """The trainable part of the task model: ``d -> hidden... -> C`` with ReLU; exposes its hidden layers."""

    def __init__(self, dim: int, hidden: tuple, num_classes: int):
        super().__init__()
        blocks, prev = [], dim
        for h in hidden:
            blocks.append(nn.Sequential(nn.Linear(prev, h), nn.ReLU()))
            prev = h
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(prev, num_classes)
        self.embed_dim = prev
        self.tap_dims = [dim] + list(hidden)

    def forward(self, x, taps: bool = False):
        feats = [x]
        h = x
        for b in self.blocks:
            h = b(h)
            feats.append(h)
        out = self.fc(h)
        return (out, feats) if taps else out

    def embed(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class LossNet(nn.Module):
    """Yoo & Kweon's loss prediction module: per tap GAP -> FC(interm) -> ReLU, concatenate, FC(1).

    The taps of a vector head are vectors already, so GAP is the identity.
    """

    def __init__(self, tap_dims, interm_dim: int = 128):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(d, interm_dim) for d in tap_dims])
        self.linear = nn.Linear(len(tap_dims) * interm_dim, 1)

    def forward(self, feats):
        outs = [F.relu(fc(f.flatten(1))) for fc, f in zip(self.fcs, feats)]
        return self.linear(torch.cat(outs, 1)).view(-1)


def loss_pred_loss(pred, target, *, margin: float = 1.0, kind: str = "margin"):
    """The pairwise loss-prediction loss over a batch split into halves (pair i with 2B-1-i).

    ``margin``: Yoo & Kweon's ranking loss ``max(0, -sign(l_i - l_j) (p_i - p_j) + margin)``, mean over pairs
    (their released code). ``bce``: TA-VAAL's released variant, BCE(sigmoid(p_i - p_j), [l_i > l_j]).
    An odd batch drops its last sample from this loss.
    """
    n = (len(pred) // 2) * 2
    if n == 0:
        return pred.sum() * 0.0
    pred, target = pred[:n], target[:n].detach()
    diff = (pred - pred.flip(0))[: n // 2]
    tdiff = (target - target.flip(0))[: n // 2]
    if kind == "margin":
        one = 2 * torch.sign(torch.clamp(tdiff, min=0)) - 1
        return torch.clamp(margin - one * diff, min=0).sum() / diff.size(0)
    if kind == "bce":
        return F.binary_cross_entropy(torch.sigmoid(diff), torch.sign(torch.clamp(tdiff, min=0)))
    raise BadInputError(f"ranking loss must be 'margin' or 'bce', got {kind!r}")


class forked_rng:
    """Fork the global torch RNG (cpu, and cuda when used) and seed it; restore it on exit.

    Every model the AL baselines train (heads, loss modules, VAEs) is initialised and trained inside one, so a
    selection is deterministic for its seed and leaves the caller's RNG as it was.
    """

    def __init__(self, seed: int, device: torch.device):
        devs = [device.index or 0] if device.type == "cuda" else []
        self._ctx = torch.random.fork_rng(devices=devs)
        self.seed = int(seed)

    def __enter__(self):
        self._ctx.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------- training and inference
def _optimizer(params, recipe: HeadRecipe):
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def _epochs(head, net, opts, x, y, recipe: HeadRecipe, gen, *, ranking, margin, weight, stop_grad_epoch) -> dict:
    """The training loop of ``train_head`` (inside its forked RNG); returns the last losses."""
    n = len(y)
    step_at = int(math.ceil(recipe.lr_step * recipe.epochs)) if recipe.lr_step < 1 else recipe.epochs + 1
    last = {}
    for epoch in range(recipe.epochs):
        if epoch == step_at:
            for o in opts:
                for g in o.param_groups:
                    g["lr"] = g["lr"] / 10
        perm = torch.randperm(n, generator=gen).to(x.device)
        head.train()
        for start in range(0, n, recipe.batch_size):
            idx = perm[start:start + recipe.batch_size]
            out, feats = head(x[idx], taps=True)
            target_loss = F.cross_entropy(out, y[idx], reduction="none")
            loss = target_loss.mean()
            if net is not None:
                if stop_grad_epoch is not None and epoch > stop_grad_epoch:  # `epoch > epoch_loss` as the original
                    feats = [f.detach() for f in feats]
                m_loss = loss_pred_loss(net(feats), target_loss, margin=margin, kind=ranking)
                loss = loss + weight * m_loss
                last["module_loss"] = float(m_loss.detach())
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            last["loss"] = float(loss.detach())
    return last


def train_head(x, y, num_classes: int, recipe: HeadRecipe, *, seed: int, device, loss_module: bool = False,
               ranking: str = "margin", margin: float = 1.0, weight: float = 1.0, stop_grad_epoch: int | None = None):
    """Train a fresh head (and, with ``loss_module``, a LossNet jointly as in Yoo & Kweon) on (x, y).

    Returns ``(head, lossnet_or_None, stats)``; both modules are left in eval mode on ``device``.
    LearnLoss joint training: loss = mean CE + weight * loss_pred_loss(pred, per-sample CE); after epoch
    ``stop_grad_epoch`` (the original: 120 of 200) the taps are detached, so the ranking loss no longer
    shapes the target model.
    """
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
    with forked_rng(seed, device):
        head = MLPHead(x.shape[1], recipe.hidden, num_classes).to(device)
        net = LossNet(head.tap_dims).to(device) if loss_module else None
        opts = [_optimizer(head.parameters(), recipe)]
        if net is not None:
            opts.append(_optimizer(net.parameters(), recipe))
        gen = torch.Generator().manual_seed(int(seed) + 1)
        last = _epochs(head, net, opts, x, y, recipe, gen, ranking=ranking, margin=margin, weight=weight,
                       stop_grad_epoch=stop_grad_epoch)
    head.eval()
    if net is not None:
        net.eval()
    with torch.no_grad():
        acc = float((head(x).argmax(1) == y).float().mean()) if len(y) else float("nan")
    stats = {"train_acc": round(acc, 4), "final_loss": round(last.get("loss", float("nan")), 5)}
    if "module_loss" in last:
        stats["final_module_loss"] = round(last["module_loss"], 5)
    return head, net, stats


def take_rows(store, rows) -> np.ndarray:
    """``store.features[rows]`` as a writable float32 array (one memmap slice, copied, when the rows are a
    contiguous run: torch warns on a read-only memmap view, "The given NumPy array is not writable")."""
    rows = np.asarray(rows)
    if len(rows) and np.all(np.diff(rows) == 1):
        return np.array(store.features[rows[0]:rows[-1] + 1], dtype=np.float32)
    return np.asarray(store.features[rows], dtype=np.float32)


@torch.no_grad()
def head_outputs(head: MLPHead, store, rows=None, *, device, what=("embed", "logits"), lossnet=None,
                 block: int = BLOCK) -> dict:
    """Embeddings / logits / predicted losses of ``rows`` (default all) in blocks; numpy float32 arrays."""
    device = torch.device(device)
    rows = np.arange(len(store)) if rows is None else np.asarray(rows)
    out = {k: [] for k in what}
    if lossnet is not None:
        out["pred_loss"] = []
    for start in range(0, len(rows), block):
        r = rows[start:start + block]
        x = torch.as_tensor(take_rows(store, r), device=device)
        logits, feats = head(x, taps=True)
        if "embed" in out:
            out["embed"].append(feats[-1].float().cpu().numpy())
        if "logits" in out:
            out["logits"].append(logits.float().cpu().numpy())
        if lossnet is not None:
            out["pred_loss"].append(lossnet(feats).float().cpu().numpy())
    return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in out.items()}


class HeadTaskModel:
    """One round's head on the frozen features (``task_model: head``): the outputs the methods read over rows
    of the pool, with the same interface as ``baselines/_al_backbone.FinetunedTaskModel``."""

    kind = "head"

    def __init__(self, head: MLPHead, net: LossNet | None, store, device):
        self.head, self.net, self.store, self.device = head, net, store, device
        self.fc = head.fc  # ALFA-Mix's classifier g over the embedding

    def outputs(self, rows=None, *, what=("embed", "logits"), lossnet: bool = False) -> dict:
        return head_outputs(self.head, self.store, rows, device=self.device, what=what,
                            lossnet=self.net if lossnet else None)
