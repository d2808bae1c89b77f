"""Shared machinery of the five active-learning baselines: coreset, vaal, learnloss, tavaal, alfamix.

The protocol (ActiveFT paper, appendix B.3)
------------------------------------------
A random initial set of ``init_size`` samples is drawn (seeded) and its labels are bought from the oracle;
then, round after round, the task model is retrained from scratch on every label bought so far, the method
picks a batch of ``batch_size`` unlabelled samples, and their labels are bought, until exactly ``budget``
ids are labelled (the last batch is truncated to fill the budget). The returned Selection lists the ids in
the order they were labelled (initial set first). Sizes: ``init_ratio`` (default 0.01) x N, ``batch_ratio``
(default = init_ratio) x N, or absolute ``init_size`` / ``batch_size``; the paper uses 0.5% (CIFAR-10),
1% (CIFAR-100) and 2.5% (ImageNet) for both, which is profile data.

Labels come only through ``oracle(ids)``, and a method only ever asks for the ids it returns (the oracle's
``queried`` list equals the selection). ``store.labels`` is never read here.

The task model
--------------
The paper retrains DeiT-S (DINO) in every round. On the cpu profile the task model is the frozen encoder
(its features are the FeatureStore) plus a trainable head: an MLP ``d -> hidden... -> C`` (default one
hidden layer of 256 ReLU units) trained with a fixed, seeded recipe (``head_*`` options, default Adam,
lr 1e-2, weight decay 5e-4, batch 64, 100 epochs, lr / 10 after 80% of the epochs as in the originals'
step schedules). The head's last hidden layer is "the model's embedding" (CoreSet's feature space,
ALFA-Mix's mixing space) and its hidden layers are LearnLoss's intermediate features. Training is
deterministic for a seed (own RNG streams; the global torch RNG is forked, not disturbed).

The classes: C = max(meta["num_classes"], len(meta["classes"]), 1 + largest label bought so far).

Options shared by the five: init_ratio, batch_ratio, init_size, batch_size, device ("auto": cuda when
available), cpu_threads (0: leave the thread pools alone; n: torch and the OpenMP/BLAS pools of numpy and
scikit-learn use n threads during the selection, restored after; 1 is the right value on a busy CPU box),
and the head_* recipe (hidden, epochs, lr, optimizer, momentum, weight_decay, batch_size, lr_step).

Scale: every pass over the pool runs in row blocks (O(N) memory besides the N x hidden embedding). The AL
methods need the whole pool in one process: under a distributed launch rank 0 computes the selection and
broadcasts it (the other ranks never query the oracle).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_suite.errors import BadInputError, MissingDataError
from bench_suite.methods.selection import Selection, check_budget

log = logging.getLogger(__name__)

BLOCK = 65536  # rows per block in passes over the pool


# --------------------------------------------------------------------------- head recipe and model
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
    def from_kwargs(cls, kw: dict) -> "HeadRecipe":
        """Pop the ``head_*`` options out of ``kw``."""
        r = cls()
        for key in list(kw):
            if not key.startswith("head_"):
                continue
            field = key[len("head_"):]
            if field not in r.__dataclass_fields__:
                continue
            setattr(r, field, kw.pop(key))
        r.hidden = parse_hidden(r.hidden)
        if r.optimizer not in ("adam", "sgd"):
            raise BadInputError(f"head_optimizer must be 'adam' or 'sgd', got {r.optimizer!r}")
        for name in ("epochs", "batch_size"):
            setattr(r, name, positive_int(f"head_{name}", getattr(r, name)))
        for name in ("lr", "momentum", "weight_decay", "lr_step"):
            if not isinstance(getattr(r, name), (int, float)) or isinstance(getattr(r, name), bool) or getattr(r, name) < 0:
                raise BadInputError(f"head_{name} must be a non-negative number, got {getattr(r, name)!r}")
        if r.lr <= 0:
            raise BadInputError(f"head_lr must be positive, got {r.lr!r}")
        return r

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return {f"head_{k}": v for k, v in d.items()}


def positive_int(key: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise BadInputError(f"{key} must be a positive integer, got {v!r}")
    return int(v)


def parse_hidden(value) -> tuple:
    """256 | "256,128" | [256, 128] | "" / 0 (a linear head) -> tuple of widths."""
    if value is None or value == "" or value == 0:
        return ()
    if isinstance(value, (int, np.integer)):
        vals = (int(value),)
    elif isinstance(value, str):
        try:
            vals = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError as exc:
            raise BadInputError(f"head_hidden must be widths like 256 or '512,256', got {value!r}") from exc
    else:
        vals = tuple(int(v) for v in value)
    if any(v <= 0 for v in vals):
        raise BadInputError(f"head_hidden widths must be positive, got {value!r}")
    return vals


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


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise BadInputError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from exc


class _Forked:
    """Fork the global torch RNG (cpu, and cuda when used) and seed it; restore it on exit."""

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


class cpu_threads:
    """Scope the CPU thread pools (torch intra-op, and numpy's / scikit-learn's OpenMP and BLAS) to ``n``
    threads (0: leave them alone); restored on exit. Set once per selection (option ``cpu_threads``).

    Why it exists: on an oversubscribed machine (more busy threads than cores - e.g. several jobs on the
    2-core reference box) OpenMP's spin-waiting made the same small computation 10-100x slower with 2
    threads than with 1 (measured here: one head training 125 s vs 1.3 s; scikit-learn k-means on 5000 x 256,
    K = 100: 124 s vs 10 s). Toggling the thread count often is itself slow, so it is set once, not per call.
    """

    def __init__(self, n: int):
        self.n = int(n or 0)
        self.old = None
        self.pools = None

    def __enter__(self):
        if self.n > 0:
            old = torch.get_num_threads()
            try:  # scikit-learn's k-means and numpy's BLAS run on their own OpenMP / BLAS pools
                from threadpoolctl import threadpool_limits

                self.pools = threadpool_limits(limits=self.n)
            except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
                self.pools = None
            self.old = old
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        # pools first: restoring OpenMP's limit also moves torch's (same libgomp), then torch's own value
        if self.pools is not None:
            self.pools.restore_original_limits()
        if self.old is not None:
            torch.set_num_threads(self.old)
        return False



def _optimizer(params, recipe: HeadRecipe):
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def train_head(x, y, num_classes: int, recipe: HeadRecipe, *, seed: int, device, loss_module: bool = False,
               ranking: str = "margin", margin: float = 1.0, weight: float = 1.0, stop_grad_epoch: int | None = None):
    """Train a fresh head (and, with ``loss_module``, a LossNet jointly as in Yoo & Kweon) on (x, y).

    Returns ``(head, lossnet_or_None, stats)``; both modules are left in eval mode on ``device``.
    LearnLoss joint training: loss = mean CE + weight * loss_pred_loss(pred, per-sample CE); after epoch
    ``stop_grad_epoch`` (the original: 120 of 200) the taps are detached, so the ranking loss no longer
    shapes the target model.
    """
    device = resolve_device(device)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
    n = len(y)
    with _Forked(seed, device):
        head = MLPHead(x.shape[1], recipe.hidden, num_classes).to(device)
        net = LossNet(head.tap_dims).to(device) if loss_module else None
        opt = _optimizer(head.parameters(), recipe)
        opt_m = _optimizer(net.parameters(), recipe) if net is not None else None
        gen = torch.Generator().manual_seed(int(seed) + 1)
        step_at = int(math.ceil(recipe.lr_step * recipe.epochs)) if recipe.lr_step < 1 else recipe.epochs + 1
        last = {}
        for epoch in range(recipe.epochs):
            if epoch == step_at:
                for o in (opt, opt_m):
                    if o is not None:
                        for g in o.param_groups:
                            g["lr"] = g["lr"] / 10
            perm = torch.randperm(n, generator=gen).to(device)
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
                opt.zero_grad(set_to_none=True)
                if opt_m is not None:
                    opt_m.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if opt_m is not None:
                    opt_m.step()
                last["loss"] = float(loss.detach())
    head.eval()
    if net is not None:
        net.eval()
    with torch.no_grad():
        acc = float((head(x).argmax(1) == y).float().mean()) if n else float("nan")
    stats = {"train_acc": round(acc, 4), "final_loss": round(last.get("loss", float("nan")), 5)}
    if "module_loss" in last:
        stats["final_module_loss"] = round(last["module_loss"], 5)
    return head, net, stats


@torch.no_grad()
def head_outputs(head: MLPHead, store, rows=None, *, device, what=("embed", "logits"), lossnet=None,
                 block: int = BLOCK) -> dict:
    """Embeddings / logits / predicted losses of ``rows`` (default all) in blocks; numpy float32 arrays."""
    device = resolve_device(device)
    rows = np.arange(len(store)) if rows is None else np.asarray(rows)
    out = {k: [] for k in what}
    if lossnet is not None:
        out["pred_loss"] = []
    for start in range(0, len(rows), block):
        r = rows[start:start + block]
        x = torch.as_tensor(_take(store, r), device=device)
        logits, feats = head(x, taps=True)
        if "embed" in out:
            out["embed"].append(feats[-1].float().cpu().numpy())
        if "logits" in out:
            out["logits"].append(logits.float().cpu().numpy())
        if lossnet is not None:
            out["pred_loss"].append(lossnet(feats).float().cpu().numpy())
    return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in out.items()}


def _take(store, rows) -> np.ndarray:
    rows = np.asarray(rows)
    if len(rows) and np.all(np.diff(rows) == 1):  # a contiguous run: one slice of the memmap
        return np.asarray(store.features[rows[0]:rows[-1] + 1], dtype=np.float32)
    return np.asarray(store.features[rows], dtype=np.float32)


# --------------------------------------------------------------------------- images (VAAL, TA-VAAL)
def load_pool_images(store, size: int = 32, method: str = "vaal") -> np.ndarray:
    """The pool's images as ``N x 3 x size x size`` uint8, row-aligned with the store.

    Read from the WebDataset shard folder in ``store.meta["shards"]`` (recorded by bench_suite.extract),
    resized with PIL bilinear (antialiased when shrinking), grey repeated to 3 channels. Labels in the shards
    are never read. Images are decoded one by one, so pools with images of mixed sizes (ImageNet) work.
    """
    from PIL import Image

    from bench_suite.data import shards as wshards

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
    manifest = wshards.load_manifest(shard_dir)
    ids = np.asarray(store.ids, dtype=np.int64)
    out = np.zeros((len(ids), 3, size, size), dtype=np.uint8)
    seen = np.zeros(len(ids), dtype=bool)
    names = [s["name"] for s in manifest["shards"]]
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    for b_ids, b_imgs, *_ in wshards.iter_samples(shard_dir, names, batch_size=1, ids=ids):
        row = int(order[np.searchsorted(sorted_ids, int(b_ids[0]))])
        im = Image.fromarray(np.asarray(b_imgs[0]))
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        out[row] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        seen[row] = True
    if not seen.all():
        missing = ids[~seen][:5].tolist()
        raise MissingDataError(f"{method}: {int((~seen).sum())} pool ids have no image in {shard_dir} "
                               f"(first: {missing}); the store and the shard folder do not match")
    return out


def to_unit_range(images_u8: np.ndarray, device) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (VAAL's Normalize(mean 0.5, std 0.5))."""
    return torch.as_tensor(images_u8, device=device).float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------- the protocol
PROTOCOL_DEFAULTS = {"init_ratio": 0.01, "batch_ratio": None, "init_size": None, "batch_size": None, "device": "auto",
                     "cpu_threads": 0}


class RoundState:
    """What a method sees in one round: the pool, the labels bought so far, its RNGs."""

    def __init__(self, selector, store, labelled_rows, labels, num_classes, round_idx, seed, device):
        self.selector = selector
        self.store = store
        self.labelled_rows = np.asarray(labelled_rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.round = int(round_idx)
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.device = device
        mask = np.ones(len(store), dtype=bool)
        mask[self.labelled_rows] = False
        self.unlabelled_rows = np.flatnonzero(mask)
        self.info: dict = {}

    def train_head(self, **kw):
        """Retrain the task model (fresh head) on every label bought so far, with the method's recipe."""
        t0 = time.perf_counter()
        head, net, stats = train_head(_take(self.store, self.labelled_rows), self.labels, self.num_classes,
                                      self.selector.head, seed=self.seed, device=self.device, **kw)
        self.info["train_seconds"] = round(time.perf_counter() - t0, 4)
        self.info.update(stats)
        return head, net

    def random_subset(self, size: int, k: int) -> np.ndarray:
        """A random subset of the unlabelled pool (LearnLoss / TA-VAAL); at least 10 x k when that is more."""
        eff = min(len(self.unlabelled_rows), max(int(size), 10 * k) if size > 0 else len(self.unlabelled_rows))
        if 0 < size < 10 * k and eff > size:
            log.info("%s: unlabelled subset raised from %d to %d (10 x the batch of %d)", self.selector.name, size, eff, k)
        self.info["subset_size"] = int(eff)
        if eff >= len(self.unlabelled_rows):
            return self.unlabelled_rows.copy()
        return np.sort(self.rng.choice(self.unlabelled_rows, size=eff, replace=False))


class ActiveLearner:
    """Base class: the B.3 protocol loop; subclasses implement ``query(state, k) -> rows``."""

    name = "?"
    description = "?"
    label_free = False
    method_defaults: dict = {}
    uses_head = True

    def __init__(self, **config):
        kw = dict(config)
        self.head = HeadRecipe.from_kwargs(kw) if self.uses_head else None
        proto = {k: kw.pop(k, v) for k, v in PROTOCOL_DEFAULTS.items()}
        method = {k: kw.pop(k, v) for k, v in self.method_defaults.items()}
        if kw:
            known = sorted(list(PROTOCOL_DEFAULTS) + list(self.method_defaults)
                           + (list(HeadRecipe().to_dict()) if self.uses_head else []))
            raise BadInputError(f"{self.name}: unknown option(s) {sorted(kw)}; known: {', '.join(known)}")
        for key in ("init_ratio", "batch_ratio"):
            v = proto[key]
            if v is not None and not (isinstance(v, (int, float)) and 0 < float(v) <= 1):
                raise BadInputError(f"{self.name}: {key} must be in (0, 1], got {v!r}")
        for key in ("init_size", "batch_size"):
            v = proto[key]
            if v is not None and not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0):
                raise BadInputError(f"{self.name}: {key} must be a positive integer, got {v!r}")
        ct = proto["cpu_threads"]
        if isinstance(ct, bool) or not isinstance(ct, (int, np.integer)) or ct < 0:
            raise BadInputError(f"{self.name}: cpu_threads must be an integer >= 0 (0 = torch's setting), got {ct!r}")
        self.proto = proto
        self.opts = method
        self.device = resolve_device(proto["device"])
        self.check_options()

    def check_options(self) -> None:  # subclasses validate their own options
        pass

    # ----------------------------------------------------------------- sizes
    def sizes(self, n: int) -> tuple[int, int]:
        p = self.proto
        init = int(p["init_size"]) if p["init_size"] is not None else max(1, int(round(float(p["init_ratio"]) * n)))
        if p["batch_size"] is not None:
            batch = int(p["batch_size"])
        else:
            ratio = p["batch_ratio"] if p["batch_ratio"] is not None else (
                p["init_ratio"] if p["init_size"] is None else None)
            batch = max(1, int(round(float(ratio) * n))) if ratio is not None else init
        return init, batch

    def config(self) -> dict:
        cfg = {**self.proto, "device": str(self.device), **self.opts}
        if self.uses_head:
            cfg.update(self.head.to_dict())
        return cfg

    # ----------------------------------------------------------------- the loop
    def select(self, store, budget, *, seed: int, oracle=None, dist=None) -> Selection:
        if dist is not None and getattr(dist, "active", False) and dist.world > 1:
            # the whole protocol runs on rank 0 (one oracle, one pool); the others receive the result
            sel, payload = None, None
            if dist.is_main:
                try:
                    sel = self._select(store, budget, seed=seed, oracle=oracle)
                    payload = sel.to_json()
                except BadInputError as exc:
                    payload = {"error": str(exc)}
                    dist.broadcast_object(payload)
                    raise
            payload = dist.broadcast_object(payload)
            if "error" in payload:
                raise BadInputError(payload["error"])
            if sel is None:
                sel = Selection(np.asarray(payload["ids"]), payload["method"], payload["budget"], payload["seed"],
                                payload["seconds"], payload["config"], payload["info"])
            return sel
        return self._select(store, budget, seed=seed, oracle=oracle)

    def _select(self, store, budget, *, seed: int, oracle=None) -> Selection:
        with cpu_threads(self.proto["cpu_threads"]):
            return self._protocol(store, budget, seed=seed, oracle=oracle)

    def _protocol(self, store, budget, *, seed: int, oracle=None) -> Selection:
        t_start = time.perf_counter()
        if oracle is None:
            raise BadInputError(
                f"{self.name} is an active-learning method and needs an oracle for the labels of its picks "
                "(on the CLI: --labels FILE.npy or --labels store)")
        n = len(store)
        if store.total_rows is not None and store.total_rows != n:
            raise BadInputError(f"{self.name} needs the whole pool, got a slice of {n} of {store.total_rows} rows")
        budget = check_budget(budget, n)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise BadInputError(f"{self.name}: seed must be a non-negative integer, got {seed!r}")
        init, batch = self.sizes(n)
        if budget < init:
            raise BadInputError(
                f"{self.name}: budget {budget} is smaller than the active-learning initial random set ({init} of "
                f"{n} samples); raise the budget or lower init_ratio / init_size")
        rng = np.random.default_rng(seed)
        round_seeds = np.random.SeedSequence(seed).generate_state(1 + (budget - init + batch - 1) // batch)
        labelled = rng.choice(n, size=init, replace=False).astype(np.int64)
        labels = self._ask(oracle, store, labelled)
        meta = store.meta or {}
        meta_c = max(int(meta.get("num_classes") or 0), len(meta.get("classes") or []))
        t_prep = time.perf_counter()
        ctx = self.prepare(store, seed)
        prepare_seconds = time.perf_counter() - t_prep
        rounds = []
        r = 0
        while len(labelled) < budget:
            k = min(batch, budget - len(labelled))
            num_classes = max(meta_c, int(labels.max()) + 1)
            state = RoundState(self, store, labelled, labels, num_classes, r, int(round_seeds[r]), self.device)
            t0 = time.perf_counter()
            picks = np.asarray(self.query(state, k, ctx), dtype=np.int64)
            self._check_picks(picks, k, state)
            state.info["select_seconds"] = round(time.perf_counter() - t0 - state.info.get("train_seconds", 0), 4)
            new_labels = self._ask(oracle, store, picks)
            labelled = np.concatenate([labelled, picks])
            labels = np.concatenate([labels, new_labels])
            rounds.append({"round": r, "labelled_before": int(len(labelled) - k), "picked": int(k),
                           "oracle_queries_so_far": int(len(labelled)), "num_classes": num_classes,
                           "seconds": round(time.perf_counter() - t0, 4), **state.info})
            log.debug("%s round %d: %d labelled, %.2fs", self.name, r, len(labelled), rounds[-1]["seconds"])
            r += 1
        seconds = time.perf_counter() - t_start
        info = {
            "protocol": "ActiveFT appendix B.3: random initial set, then rounds of retrain -> select a batch",
            "task_model": ("frozen encoder features + MLP head" if self.uses_head else "none (selection by VAE + discriminator)"),
            "init_size": int(init), "batch_size": int(batch), "n_rounds": len(rounds),
            "labelled_sizes": [int(init)] + [int(x["labelled_before"] + x["picked"]) for x in rounds],
            "oracle_queries": int(len(labelled)), "rounds": rounds, "prepare_seconds": round(prepare_seconds, 4),
            "seconds_note": "wall time of the whole protocol: image loading, every retraining and every query",
        }
        return Selection(store.ids[labelled], self.name, budget, int(seed), seconds, self.config(), info)

    def prepare(self, store, seed) -> dict:
        """Once per selection, before the rounds (VAAL loads the images here); timed into the total."""
        return {}

    def query(self, state: RoundState, k: int, ctx: dict) -> np.ndarray:
        raise NotImplementedError

    def _ask(self, oracle, store, rows) -> np.ndarray:
        ids = np.asarray(store.ids[rows], dtype=np.int64)
        y = np.asarray(oracle(ids))
        if y.shape != ids.shape:
            raise BadInputError(f"{self.name}: the oracle answered {y.shape} labels for {len(ids)} ids")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.equal(np.mod(y, 1), 0)):
                raise BadInputError(f"{self.name}: the oracle returned non-integer labels")
        y = y.astype(np.int64)
        if (y < 0).any():
            bad = ids[y < 0][:5].tolist()
            raise BadInputError(f"{self.name}: the oracle has no label (got {int(y[y < 0][0])}) for ids {bad}; "
                                "the labels file must cover every pool sample")
        return y

    def _check_picks(self, picks, k, state) -> None:
        if len(picks) != k or len(np.unique(picks)) != k:
            raise AssertionError(f"{self.name}: round {state.round} picked {len(picks)} rows "
                                 f"({len(np.unique(picks))} unique), wanted {k}")
        taken = np.zeros(len(state.store), dtype=bool)
        taken[state.labelled_rows] = True
        if picks.min() < 0 or picks.max() >= len(state.store) or taken[picks].any():
            raise AssertionError(f"{self.name}: round {state.round} picked labelled or invalid rows")


def fill_random(picks: np.ndarray, k: int, state: RoundState) -> tuple[np.ndarray, int]:
    """Top ``picks`` up to ``k`` with random unlabelled rows not already picked (without replacement)."""
    picks = np.asarray(picks, dtype=np.int64)
    missing = k - len(picks)
    if missing <= 0:
        return picks[:k], 0
    pool = np.setdiff1d(state.unlabelled_rows, picks)
    extra = state.rng.choice(pool, size=missing, replace=False)
    return np.concatenate([picks, extra.astype(np.int64)]), int(missing)
