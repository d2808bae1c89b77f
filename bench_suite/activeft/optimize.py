"""The ActiveFT optimisation loop (Algorithm 1) on a pool that may be split across ranks.

Per iteration: exact nearest parameters of the samples in the pass (``assign.Assigner``, pruned), per-sample
terms reduced to B x d sums and B scalars, ONE all_reduce of that buffer (O(B d) bytes, independent of N),
the B x B repulsion computed identically on every rank, an Adam step in float64 on every rank. The
per-sample sums are accumulated in float64, so a split pool gives the same parameters as one process up to
float64 rounding, and the same assignments and selection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as tnf

from bench_suite.activeft import objectives as obj
from bench_suite.activeft.assign import Assigner
from bench_suite.activeft.snap import decision_eps, fps_init, gather_rows, random_init, snap
from bench_suite.errors import BadInputError


@dataclass
class Config:
    objective: str = "official"  # official | paper
    regularizer: str = "ours"  # ours | none (S1) | infonce (S2)
    temperature: float = 0.07
    iters: int = 300
    lr: float = 1e-3
    init: str = "random"  # random | fps
    update_assign: bool = True  # False: nearest parameters frozen at init (Table 5a "No-Update")
    balance: float = 1.0  # lambda: weight of the repulsion (paper) / of R in the log-ratio (official)
    scheduler: str = "none"  # none | cosine (as the released code's --scheduler)
    subset: int = 0  # M: random samples per iteration (0 = the whole pool), Sec. 3.5
    prune: bool = True  # certified candidate pruning of the nearest-parameter search
    candidates: int = 16  # K: candidates kept per sample for the pruning
    block_size: int = 0  # rows per block (0 = auto, so that block x B float32 stays near 256 MiB)
    snap_candidates: int = 8  # per-parameter candidates kept by the distributed snapping
    bb_dtype: str = "auto"  # dtype of the B x B repulsion: float32 | float64 | auto (float64 if B <= 512)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    threads: int = 0  # torch CPU threads during the selection (0 = leave torch's setting)
    progress: bool | None = None  # rich progress bar on rank 0 (None: only when stderr is a terminal)
    verify: bool = False  # debug: check every pruned assignment against the full computation

    @classmethod
    def from_kwargs(cls, **kw) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        aliases = {"tau": "temperature", "T": "iters", "max_iter": "iters", "M": "subset", "K": "candidates",
                   "lambda_": "balance"}
        clean = {}
        for key, val in kw.items():
            key = aliases.get(key, key)
            if key == "no_update":
                key, val = "update_assign", not _as_bool("no_update", val)
            if key not in names:
                raise BadInputError(f"unknown ActiveFT option {key!r}; known: {', '.join(sorted(names))}")
            clean[key] = val
        cfg = cls(**clean)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        obj.check_names(self.objective, self.regularizer)
        from bench_suite.errors import unknown

        if self.init not in ("random", "fps"):
            raise unknown("ActiveFT init", self.init, ("random", "fps"))
        if self.scheduler not in ("none", "cosine"):
            raise unknown("ActiveFT scheduler", self.scheduler, ("none", "cosine"))
        if self.bb_dtype not in ("auto", "float32", "float64"):
            raise unknown("ActiveFT bb_dtype", self.bb_dtype, ("auto", "float32", "float64"))
        for name in ("temperature", "lr", "balance"):
            v = _as_number(name, getattr(self, name))
            if not math.isfinite(v) or v <= 0:
                raise BadInputError(f"ActiveFT option {name} must be a positive number, got {v!r}")
            setattr(self, name, float(v))
        for name, lo in (("iters", 0), ("subset", 0), ("candidates", 1), ("block_size", 0), ("snap_candidates", 1),
                         ("threads", 0)):
            v = _as_number(name, getattr(self, name))
            if not float(v).is_integer():
                raise BadInputError(f"ActiveFT option {name} must be an integer, got {v!r}")
            if int(v) < lo:
                raise BadInputError(f"ActiveFT option {name} must be >= {lo}, got {int(v)}")
            setattr(self, name, int(v))
        for name in ("update_assign", "prune", "verify"):
            setattr(self, name, _as_bool(name, getattr(self, name)))
        if self.progress is not None:
            self.progress = _as_bool("progress", self.progress)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_number(name, v) -> float:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise BadInputError(f"ActiveFT option {name} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise BadInputError(f"ActiveFT option {name} must be a number, got {v!r}")
    return float(v)


def _as_bool(name, v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
        return v.lower() in ("true", "yes", "1")
    raise BadInputError(f"ActiveFT option {name} must be true or false, got {v!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # one process per GPU: each rank takes its node-local GPU (all on cuda:0 would collide under NCCL)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {name!r} requested but CUDA is not available (use device=cpu)")
    return dev


class _InfoNCE:
    """Streaming ``Z_j = logsumexp_k <f_k, c_j>/tau`` and ``sum_k softmax_k f_k`` over the pass (S2)."""

    def __init__(self, b: int, d: int, device):
        self.m = torch.full((b,), -math.inf, dtype=torch.float64, device=device)
        self.s = torch.zeros(b, dtype=torch.float64, device=device)
        self.w = torch.zeros(b, d, dtype=torch.float64, device=device)

    def add(self, fr: torch.Tensor, assigner, tau: float) -> None:
        if fr.shape[0] == 0:
            return
        x = assigner.sims(fr).div_(tau)
        m_new = torch.maximum(self.m, x.max(dim=0).values.double())
        scale = torch.exp(self.m - m_new)
        e = x.sub_(m_new.float()[None, :]).exp_()
        self.s = self.s * scale + e.sum(dim=0).double()
        self.w = self.w * scale[:, None] + (e.T @ fr).double()
        self.m = m_new

    def finish(self, dist):
        gm = dist.all_reduce(self.m.clone(), "max")
        scale = torch.where(torch.isfinite(self.m), torch.exp(self.m - gm), torch.zeros_like(self.m))
        buf = torch.cat([self.s * scale, (self.w * scale[:, None]).reshape(-1)])
        dist.all_reduce(buf)
        b = self.s.shape[0]
        s, w = buf[:b], buf[b:].reshape(b, -1)
        return gm + torch.log(s), w / s[:, None]


def auto_block(b: int, requested: int = 0) -> int:
    """Rows per block: small enough for the cache-bound per-row work, block x B float32 <= 256 MiB."""
    if requested:
        return requested
    return int(max(256, min(8192, (64 * 2 ** 20) // max(b, 1))))


@contextlib.contextmanager
def full_fp32_matmul():
    """Plain float32 GEMMs (no TF32 / bf16 shortcuts) while selecting: the certified margins assume them."""
    before = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def optimize(feats: torch.Tensor, shard: slice, n_total: int, budget: int, cfg: Config, *, seed: int, dist,
             progress=None, snap_result: bool = True) -> dict:
    """Run ActiveFT on this rank's rows ``feats`` (= global rows ``shard``) and snap to ``budget`` rows.

    See ``_optimize``; this wrapper only pins the float32 matmul precision for the duration.
    """
    with full_fp32_matmul():
        return _optimize(feats, shard, n_total, budget, cfg, seed=seed, dist=dist, progress=progress,
                         snap_result=snap_result)


def _optimize(feats: torch.Tensor, shard: slice, n_total: int, budget: int, cfg: Config, *, seed: int, dist,
              progress=None, snap_result: bool = True) -> dict:
    """Run ActiveFT on this rank's rows ``feats`` (= global rows ``shard``) and snap to ``budget`` rows.

    Returns a dict with ``rows`` (global row indices, parameter order), ``losses`` (one per iteration, the
    loss before that iteration's step), ``final_loss`` (at the final parameters) and diagnostics.
    ``progress`` is called as ``progress(iteration, loss)`` after each step (rank 0 decides to show it).
    ``snap_result=False`` skips the snapping pass (benchmarks of the loop alone); ``rows`` is then None.
    """
    t_start = time.perf_counter()
    dev = feats.device
    b, d = int(budget), int(feats.shape[1])
    tau = cfg.temperature
    fnorm = torch.tensor([float(feats.norm(dim=1).max()) if feats.shape[0] else 0.0], dtype=torch.float64,
                         device=dev)
    fnorm = float(dist.all_reduce(fnorm, "max")[0])
    eps = decision_eps(d, fnorm)
    block = auto_block(b, cfg.block_size)
    bb_dtype = torch.float64 if (cfg.bb_dtype == "float64" or (cfg.bb_dtype == "auto" and b <= 512)) else torch.float32
    official_param = cfg.objective == "official"

    # ---- initialisation
    if cfg.init == "random":
        init_rows = random_init(n_total, b, seed)
    else:
        init_rows = fps_init(feats, shard, n_total, b, seed, dist, eps)
    theta = torch.nn.Parameter(gather_rows(feats, shard, init_rows, dist))
    if not official_param:
        with torch.no_grad():
            theta.data = tnf.normalize(theta.data, dim=1)
    opt = torch.optim.Adam([theta], lr=cfg.lr, foreach=False)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.iters, 1), eta_min=1e-6)
             if cfg.scheduler == "cosine" else None)
    t_init = time.perf_counter() - t_start

    assigner = Assigner(feats, b, candidates=cfg.candidates, block=block, prune=cfg.prune,
                        max_steps=cfg.iters + 1, fnorm_max=fnorm, verify=cfg.verify)
    ws = assigner.ws
    sub_gen = None
    if cfg.subset and cfg.subset < n_total:
        sub_gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), 1]).generate_state(1)[0]))
    n_act = min(cfg.subset, n_total) if sub_gen is not None else n_total
    log_bal = math.log(cfg.balance)
    losses: list[float] = []
    timing = {"accumulate": 0.0, "repulsion": 0.0, "reduce": 0.0, "step": 0.0}
    final_loss = float("nan")
    iter_seconds: list[float] = []
    for t in range(cfg.iters + 1):
        t_it = time.perf_counter()
        with torch.no_grad():
            th = theta.detach()
            th_norm = th.norm(dim=1)
            c64 = th / th_norm.clamp_min(1e-12)[:, None] if official_param else th
        assigner.set_params(c64)
        if t == 0 and not cfg.update_assign:
            assigner.assign_all()
        rows = None
        if sub_gen is not None:
            glob = torch.randperm(n_total, generator=sub_gen)[:n_act]
            glob = glob[(glob >= shard.start) & (glob < shard.stop)].sort().values - shard.start
            rows = glob.to(dev)
        use_official = official_param and cfg.regularizer == "ours"
        if use_official:
            t_rep = time.perf_counter()
            log_r, qc = obj.official_repulsion(c64, tau, dtype=bb_dtype)
            shift = log_r + log_bal
            timing["repulsion"] += time.perf_counter() - t_rep
        buf = torch.zeros(b * d + b + 1, dtype=torch.float64, device=dev)
        s_sum, g_sum = buf[: b * d].view(b, d), buf[b * d: b * d + b]
        loss_acc = torch.zeros((), dtype=torch.float64, device=dev)
        nce = _InfoNCE(b, d, dev) if cfg.regularizer == "infonce" else None
        for fr, p_r, a_r in assigner.iterate(rows, update=cfg.update_assign):
            t_acc = time.perf_counter()
            a64 = a_r.double() / tau
            if use_official:
                z = shift[p_r] - a64
                loss_acc += tnf.softplus(z).sum()
                w = torch.sigmoid(z)
                s_sum.index_add_(0, p_r, ws.get("acc", tuple(fr.shape), torch.float64).copy_(fr).mul_(w[:, None]))
                g_sum += torch.bincount(p_r, weights=w, minlength=b)
            else:
                loss_acc -= a64.sum()
                s_sum.index_add_(0, p_r, ws.get("acc", tuple(fr.shape), torch.float64).copy_(fr))
                g_sum += torch.bincount(p_r, minlength=b).double()
            if nce is not None:
                nce.add(fr, assigner, tau)
            timing["accumulate"] += time.perf_counter() - t_acc
        buf[-1] = loss_acc
        t_red = time.perf_counter()
        dist.all_reduce(buf)  # the one O(B d) reduction of the iteration
        timing["reduce"] += time.perf_counter() - t_red
        t_step = time.perf_counter()
        loss = float(buf[-1]) / n_act
        if use_official:
            grad_c = (-s_sum / tau + (g_sum / tau)[:, None] * qc) / n_act
        elif cfg.regularizer == "ours":  # paper, Eq. 11
            t_rep = time.perf_counter()
            rep, rep_grad = obj.paper_repulsion(c64, tau, dtype=bb_dtype)
            timing["repulsion"] += time.perf_counter() - t_rep
            t_step += time.perf_counter() - t_rep  # counted under "repulsion", not "step"
            loss += cfg.balance * rep
            grad_c = -s_sum / (n_act * tau) + cfg.balance * rep_grad
        elif cfg.regularizer == "none":
            grad_c = -s_sum / (n_act * tau)
        else:  # infonce
            z_j, soft = nce.finish(dist)
            loss += float((g_sum * z_j).sum()) / n_act
            grad_c = (-s_sum / tau + (g_sum / tau)[:, None] * soft) / n_act
        if t == cfg.iters:
            final_loss = loss
            break
        losses.append(loss)
        grad = obj.project_normalize_grad(grad_c, c64, th_norm) if official_param else grad_c
        theta.grad = grad.to(theta.dtype)
        opt.step()
        if sched is not None:
            sched.step()
        if not official_param:
            with torch.no_grad():
                theta.data = tnf.normalize(theta.data, dim=1)
        timing["step"] += time.perf_counter() - t_step
        iter_seconds.append(time.perf_counter() - t_it)
        if progress is not None:
            progress(t + 1, loss)
    t_opt = time.perf_counter() - t_start - t_init

    t_snap0 = time.perf_counter()
    with torch.no_grad():
        c_final = tnf.normalize(theta.detach(), dim=1)
    if snap_result:
        rows_out, snap_info = snap(feats, shard, n_total, c_final, dist, eps=eps, k=cfg.snap_candidates,
                                   block=block)
    else:
        rows_out, snap_info = None, {"snap_fallbacks": 0, "snap_collisions": 0}
    t_snap = time.perf_counter() - t_snap0
    counts = torch.bincount(assigner.p[assigner.p >= 0], minlength=b).double()
    dist.all_reduce(counts)
    tot = torch.tensor([assigner.totals[k] for k in ("certified", "refined", "refreshed", "pairs")],
                       dtype=torch.float64, device=dev)
    dist.all_reduce(tot)
    per_iter = torch.tensor([it["refreshed"] for it in assigner.per_iter], dtype=torch.float64, device=dev)
    dist.all_reduce(per_iter)
    return {
        "rows": rows_out,
        "theta": c_final,
        "init_rows": init_rows,
        "losses": losses,
        "final_loss": final_loss,
        "empty_params": int((counts == 0).sum()),
        "assign_stats": {k: int(v) for k, v in zip(("certified", "refined", "refreshed", "pairs"), tot.tolist())},
        "refreshed_per_iter": [int(v) for v in per_iter.tolist()],
        "seconds_init": t_init,
        "seconds_optimize": t_opt,
        "seconds_snap": t_snap,
        "seconds_per_iter_mean": float(np.mean(iter_seconds)) if iter_seconds else 0.0,
        "seconds_per_iter": [round(v, 4) for v in iter_seconds],
        "seconds_breakdown": {**{k: round(v, 3) for k, v in timing.items()},
                              **{k: round(v, 3) for k, v in assigner.timing.items()}},
        "n_active": n_act,
        "block_size": block,
        "bb_dtype": str(bb_dtype).replace("torch.", ""),
        "eps": eps,
        **snap_info,
    }
