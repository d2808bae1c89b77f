"""The ActiveFT optimisation loop (Algorithm 1) on a pool that may be split across ranks.

Per iteration: exact nearest parameters of the samples in the pass (``assign.Assigner``, pruned), per-sample
terms reduced to B x d sums and B scalars, ONE all_reduce of that buffer (O(B d) bytes, independent of N),
the B x B repulsion computed identically on every rank, an Adam step in float64 on every rank. The
per-sample sums are accumulated in float64, so a split pool gives the same parameters as one process up to
float64 rounding, and the same assignments and selection.

``optimize`` runs it; ``_Run`` holds one run's state, one method per stage: setup and initialisation,
the pass over the rows (``_pass``), the loss and gradient of the objective (``_gradient``), the Adam step
(``_step``), and the snapping and statistics at the end (``finish``).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as tnf
from torch.optim.adam import adam
from torch.optim.optimizer import _get_scalar_dtype

from bench_suite.activeft import fused_top2
from bench_suite.activeft import objectives as obj
from bench_suite.activeft.assign import Assigner, decision_eps
from bench_suite.activeft.groupsum import GroupSums
from bench_suite.activeft.init import gather_rows, initial_rows
from bench_suite.activeft.options import Options
from bench_suite.activeft.snap import snap
from bench_suite.activeft.static_loop import StaticLoop, resolve_loop
from bench_suite.errors import BadInputError

ASSIGN_STATS = ("certified", "refined", "refreshed", "pairs", "screen_rechecked", "screen_full")


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


# On 2 CPU cores the pruned search beats the full N x B product from about B = 500-1000 (measured at T = 20,
# the pruning's first iterations are its dearest: 10k x 1280, B = 500: 0.49 vs 0.38 s per iteration,
# B = 2000: 0.94 vs 1.51; 50k x 384, B = 250: 0.33 vs 0.32, B = 1000: 0.53 vs 1.01). On a GPU the
# pruning's many small ops and host syncs cost more than the product (issue 10: 7.8 s vs 0.65 s at
# 50k x 384, B = 1000, H200), so there the exact full product runs.
PRUNE_MIN_B_CPU = 512


def resolve_prune(prune: bool | None, b: int, device: torch.device) -> bool:
    """The ``prune`` option as run: None (auto) prunes on a CPU from ``PRUNE_MIN_B_CPU`` parameters."""
    if prune is not None:
        return bool(prune)
    return device.type == "cpu" and b >= PRUNE_MIN_B_CPU


def resolve_screen(screen: str, device: torch.device) -> str:
    """The ``screen`` option as run: auto is bf16 on a GPU (its product is the fastest there, and the undecided rows
    are decided exactly among their candidates: on a 50k x 384 clustered pool, B = 1000, 37% of the rows were
    undecided and 2 in 205,000 of those needed the float32 pass) and fp32 on a CPU (no faster product there)."""
    if screen != "auto":
        return screen
    return "bf16" if device.type == "cuda" else "fp32"


def resolve_top2_kernel(requested: str, screen: str, prune: bool, feats: torch.Tensor,
                        b: int) -> tuple[bool, str | None]:
    """The ``top2_kernel`` option as run, and why it is off where it was wanted. auto: the Triton kernel
    (``fused_top2``) with a reduced-precision screen on a GPU, once its self-check passed on the rank's rows; on:
    also on a CPU under ``TRITON_INTERPRET=1`` (the tests), and an error where it cannot run or has no screen."""
    if requested == "off" or (requested == "auto" and (screen == "fp32" or prune)):
        return False, None
    if screen == "fp32" or prune:
        raise BadInputError("activeft: top2_kernel=on needs screen=bf16 or tf32 and prune=false (the kernel is the "
                            "screened full pass's)")
    why = fused_top2.why_unavailable(feats.device)
    if why is not None:
        if requested == "on":
            raise BadInputError(f"activeft: top2_kernel=on: {why}")
        return False, why if feats.device.type == "cuda" else None
    why = fused_top2.self_check(feats, b, screen)
    return why is None, why


def auto_block(b: int, requested: int = 0, device: torch.device | None = None, *, prune: bool = False,
               d: int = 0, top2_kernel: bool = False) -> int:
    """Rows per block. GPU: block x B float32 <= 1 GiB, so a pass is a few large products (each block costs a host
    sync). CPU, full product: block x B float32 <= 256 MiB, at most 8192 rows (the product's scores stay near the
    cache). CPU, pruned: the same bound, at most 65536 rows, and the float64 [f, 1] rows of a block (when they are
    converted per block) <= 256 MiB. The pruning's bookkeeping is dozens of small ops per block, so fewer blocks
    pay: at 50k x 384, B = 1000, T = 300 on 2 cores, one 50k-row block took 37.7 s (clustered) and 35.7 s (blobs)
    against 49.5 s and 41.0 s in 8192-row blocks. With the Triton top-2 kernel only the undecided rows' product is
    written (in chunks), so a block is larger: block x B float32 <= 4 GiB (the float32 pass, should every row of a
    block need it) and the block's float32 rows <= 256 MiB. At ImageNet size, B = 12,812: 16 launches of 655 row
    tiles each (5 waves on an H200's 132 SMs) instead of 62 of 164 (one and a quarter)."""
    if requested:
        return requested
    if device is not None and device.type != "cpu":
        if top2_kernel:
            return int(max(4096, min((2 ** 28) // (4 * max(d, 1)), (2 ** 32) // (4 * max(b, 1)))))
        return int(max(4096, (2 ** 30) // (4 * max(b, 1))))
    rows = (64 * 2 ** 20) // max(b, 1)
    if prune:
        return int(max(256, min(65536, rows, (32 * 2 ** 20) // (max(d, 1) + 1))))
    return int(max(256, min(8192, rows)))


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


def optimize(feats: torch.Tensor, shard: slice, n_total: int, budget: int, cfg: Options, *, seed: int, dist,
             progress=None, snap_result: bool = True) -> dict:
    """Run ActiveFT on this rank's rows ``feats`` (= global rows ``shard``) and snap to ``budget`` rows.

    Returns a dict with ``rows`` (global row indices, parameter order), ``losses`` (one per iteration, the
    loss before that iteration's step), ``final_loss`` (at the final parameters) and diagnostics.
    ``progress`` is called as ``progress(iteration, loss)`` after each step (rank 0 decides to show it).
    ``snap_result=False`` skips the snapping pass (benchmarks of the loop alone); ``rows`` is then None.
    Float32 matmuls run at full precision throughout (the certified margins assume it).
    """
    with full_fp32_matmul():
        run = _Run(feats, shard, n_total, budget, cfg, seed=seed, dist=dist)
        run.loop(progress)
        return run.finish(snap_result)


def subset_generator(subset: int, n_total: int, seed: int) -> tuple[torch.Generator | None, int]:
    """The random stream of the per-iteration subsets (None: every iteration passes the whole pool), and M."""
    if not subset or subset >= n_total:
        return None, n_total
    seed_sub = int(np.random.SeedSequence([int(seed), 1]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed_sub), subset


class PlainAdam:
    """``torch.optim.Adam(foreach=False)`` at its defaults, through torch's own functional ``adam``: the same
    arithmetic and state (bit for bit), without ``torch.optim.Optimizer``, whose first construction in a process
    imports ``torch._dynamo``: 2.7 s of every selection CLI's start-up (measured, 2 cores). The cosine schedule
    needs the Optimizer and keeps it."""

    def __init__(self, param: torch.Tensor, lr: float, *, capturable: bool = False):
        self.param, self.lr, self.capturable = param, float(lr), bool(capturable)
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        # as torch.optim.Adam keeps its step: on the host; or, capturable (inside a CUDA graph), on the device in
        # float64: the capturable update computes 1 - beta^step from it on the device, and torch's float32 default
        # there moved theta by 5e-7 over 300 steps against the host's float64 arithmetic
        self.step_t = (torch.tensor(0.0, dtype=torch.float64, device=param.device) if capturable
                       else torch.tensor(0.0, dtype=_get_scalar_dtype()))

    @torch.no_grad()
    def step(self) -> None:
        adam([self.param], [self.param.grad], [self.exp_avg], [self.exp_avg_sq], [], [self.step_t], foreach=False,
             capturable=self.capturable, differentiable=False, fused=None, grad_scale=None, found_inf=None,
             has_complex=False, decoupled_weight_decay=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr,
             weight_decay=0.0, eps=1e-8, maximize=False)


class _Run:
    """One run of Algorithm 1 on this rank's rows: the fixed setup, the parameters, the optimiser state."""

    def __init__(self, feats: torch.Tensor, shard: slice, n_total: int, budget: int, cfg: Options, *, seed: int,
                 dist):
        self.t_start = time.perf_counter()
        self.feats, self.shard, self.n_total, self.cfg, self.dist = feats, shard, n_total, cfg, dist
        self.dev = feats.device
        self.b, self.d = int(budget), int(feats.shape[1])
        self.tau = cfg.temperature
        # official: c = theta/|theta| inside the loss; paper: c = theta, renormalised after every step
        self.official = cfg.objective == "official"
        self.fused = self.official and cfg.regularizer == "ours"  # sigmoid-weighted sums, repulsion before the pass
        local_max = float(feats.norm(dim=1).max()) if feats.shape[0] else 0.0
        fnorm = float(dist.all_reduce(torch.tensor([local_max], dtype=torch.float64, device=self.dev), "max")[0])
        self.eps = decision_eps(self.d, fnorm)
        self.prune = resolve_prune(cfg.prune, self.b, self.dev)
        self.loop_mode = resolve_loop(cfg.loop, cfg, self.dev, dist.world, self.prune)
        screen = resolve_screen(cfg.screen, self.dev)
        kernel, self.top2_kernel_fallback = resolve_top2_kernel(cfg.top2_kernel, screen, self.prune, feats, self.b)
        self.block = auto_block(self.b, cfg.block_size, self.dev, prune=self.prune, d=self.d, top2_kernel=kernel)
        self.bb_dtype = (torch.float64 if cfg.bb_dtype == "float64" or (cfg.bb_dtype == "auto" and self.b <= 512)
                         else torch.float32)
        self._initialise(seed)
        self.t_init = time.perf_counter() - self.t_start
        self.assigner = Assigner(feats, self.b, candidates=cfg.candidates, block=self.block, prune=self.prune,
                                 max_steps=cfg.iters + 1, fnorm_max=fnorm, verify=cfg.verify,
                                 screen=screen, top2_kernel=kernel)
        self.groups = GroupSums(feats, self.b)
        self.sub_gen, self.n_act = subset_generator(cfg.subset, n_total, seed)
        self.losses: list[float] = []
        self.final_loss = float("nan")
        self.iter_seconds: list[float] = []
        self.timing = {"accumulate": 0.0, "repulsion": 0.0, "reduce": 0.0, "step": 0.0}
        self.static: StaticLoop | None = None

    def _initialise(self, seed: int) -> None:
        """theta (float64, on every rank) at the initial rows; Adam; the optional cosine schedule."""
        cfg = self.cfg
        self.init_rows = initial_rows(cfg.init, self.feats, self.shard, self.n_total, self.b, seed, self.dist,
                                      self.eps)
        self.theta = torch.nn.Parameter(gather_rows(self.feats, self.shard, self.init_rows, self.dist))
        if not self.official:
            with torch.no_grad():
                self.theta.data = tnf.normalize(self.theta.data, dim=1)
        if cfg.scheduler == "cosine":
            self.opt = torch.optim.Adam([self.theta], lr=cfg.lr, foreach=False)
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, max(cfg.iters, 1), eta_min=1e-6)
        else:
            self.opt, self.sched = PlainAdam(self.theta, cfg.lr, capturable=self.loop_mode == "graph"), None

    # ------------------------------------------------------------------ the loop
    def loop(self, progress=None) -> None:
        """Iterations 0..T-1: loss, gradient, step. Iteration T only evaluates the final loss. ``static`` and
        ``graph`` run the same iterations with fixed shapes (``static_loop``)."""
        if self.loop_mode != "eager":
            self.static = StaticLoop(self, self.loop_mode)
            self.static.run(progress)
            return
        cfg = self.cfg
        for t in range(cfg.iters + 1):
            t_it = time.perf_counter()
            th_norm, c64 = self._params()
            self.assigner.set_params(c64)
            if t == 0 and not cfg.update_assign:
                self.assigner.assign_all()
            rows = self._subset_rows()
            shift, qc = self._official_repulsion(c64) if self.fused else (None, None)
            sums = self._pass(rows, shift)
            t_step, rep_before = time.perf_counter(), self.timing["repulsion"]
            loss, grad_c = self._gradient(*sums, c64, qc)
            loss = float(loss)
            if t == cfg.iters:
                self.final_loss = loss
                break
            self.losses.append(loss)
            self._step(grad_c, c64, th_norm)
            # the paper's repulsion, computed inside _gradient, is counted under "repulsion", not "step"
            self.timing["step"] += time.perf_counter() - t_step - (self.timing["repulsion"] - rep_before)
            self.iter_seconds.append(time.perf_counter() - t_it)
            if progress is not None:
                progress(t + 1, loss)
        self.t_opt = time.perf_counter() - self.t_start - self.t_init

    @torch.no_grad()
    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``|theta|`` per row and the parameters ``c`` the loss sees (``theta/|theta|`` for the official loss)."""
        th = self.theta.detach()
        th_norm = th.norm(dim=1)
        return th_norm, (th / th_norm.clamp_min(1e-12)[:, None] if self.official else th)

    def _subset_rows(self) -> torch.Tensor | None:
        """This rank's (local, sorted) rows of this iteration's random subset of M (Sec. 3.5); None: all rows."""
        if self.sub_gen is None:
            return None
        glob = torch.randperm(self.n_total, generator=self.sub_gen)[:self.n_act]
        glob = glob[(glob >= self.shard.start) & (glob < self.shard.stop)].sort().values - self.shard.start
        return glob.to(self.dev)

    def _official_repulsion(self, c64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log(lambda R_j)`` and ``(Q c)_j`` of the official loss (B x B, the same on every rank)."""
        t_rep = time.perf_counter()
        log_r, qc = obj.official_repulsion(c64, self.tau, dtype=self.bb_dtype)
        shift = log_r + math.log(self.cfg.balance)
        self.timing["repulsion"] += time.perf_counter() - t_rep
        return shift, qc

    def _pass(self, rows: torch.Tensor | None, shift: torch.Tensor | None, fixed=None):
        """The per-sample terms over this rank's ``rows``, summed over every rank in ONE all_reduce.

        Returns ``S`` (B x d: sum of the (weighted) features assigned to each parameter), ``g`` (B: their
        weights), the summed per-sample loss (a device scalar: no host sync) and the InfoNCE accumulator (S2
        only, else None). ``fixed``: ``static_loop``'s row selections; their overflow flag rides on the
        all_reduce, so every rank sees the sum over the ranks.
        """
        b, d, tau = self.b, self.d, self.tau
        buf = torch.zeros(b * (d + 1) + 2, dtype=torch.float64, device=self.dev)  # [S | g], loss, overflow flag
        sums = buf[: b * (d + 1)].view(b, d + 1)  # [S | g]: one CSR product per block fills both
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.dev)
        nce = _InfoNCE(b, d, self.dev) if self.cfg.regularizer == "infonce" else None
        for key, fr, p_r, a_r in self.assigner.iterate(rows, update=self.cfg.update_assign, with_key=True,
                                                       fixed=fixed):
            t_acc = time.perf_counter()
            a64 = a_r.double() / tau
            if self.fused:
                z = shift[p_r] - a64
                loss_acc += tnf.softplus(z).sum()
                self.groups.add(sums, key, fr, p_r, torch.sigmoid(z))
            else:
                loss_acc -= a64.sum()
                self.groups.add(sums, key, fr, p_r, None)
            if nce is not None:
                nce.add(fr, self.assigner, tau)
            self.timing["accumulate"] += time.perf_counter() - t_acc
        buf[-2] = loss_acc
        if fixed is not None:
            buf[-1] = fixed.overflow
        t_red = time.perf_counter()
        self.dist.all_reduce(buf)  # the one O(B d) reduction of the iteration
        self.timing["reduce"] += time.perf_counter() - t_red
        if fixed is not None:
            fixed.overflow.copy_(buf[-1])
        return sums[:, :d], sums[:, d], buf[-2], nce

    def _gradient(self, s_sum, g_sum, loss_sum: float, nce, c64, qc) -> tuple[float, torch.Tensor]:
        """The loss of the pass and its gradient with respect to c (equations: ``objectives``)."""
        cfg, tau, n_act = self.cfg, self.tau, self.n_act
        loss = loss_sum / n_act
        if self.fused:
            grad_c = (-s_sum / tau + (g_sum / tau)[:, None] * qc) / n_act
        elif cfg.regularizer == "ours":  # paper, Eq. 11
            t_rep = time.perf_counter()
            rep, rep_grad = obj.paper_repulsion(c64, tau, dtype=self.bb_dtype)
            self.timing["repulsion"] += time.perf_counter() - t_rep
            loss += cfg.balance * rep
            grad_c = -s_sum / (n_act * tau) + cfg.balance * rep_grad
        elif cfg.regularizer == "none":
            grad_c = -s_sum / (n_act * tau)
        else:  # infonce
            z_j, soft = nce.finish(self.dist)
            loss += float((g_sum * z_j).sum()) / n_act
            grad_c = (-s_sum / tau + (g_sum / tau)[:, None] * soft) / n_act
        return loss, grad_c

    def _step(self, grad_c: torch.Tensor, c64: torch.Tensor, th_norm: torch.Tensor) -> None:
        """Chain rule to theta (official), Adam, the schedule, the renormalisation (paper)."""
        grad = obj.project_normalize_grad(grad_c, c64, th_norm) if self.official else grad_c
        self.theta.grad = grad.to(self.theta.dtype)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        if not self.official:
            with torch.no_grad():
                self.theta.data = tnf.normalize(self.theta.data, dim=1)

    # ------------------------------------------------------------------ the end
    def finish(self, snap_result: bool) -> dict:
        """Snap the final parameters to unique rows (unless told not to); the result dict of ``optimize``."""
        t_snap0 = time.perf_counter()
        with torch.no_grad():
            c_final = tnf.normalize(self.theta.detach(), dim=1)
        if snap_result:
            rows_out, snap_info = snap(self.feats, self.shard, self.n_total, c_final, self.dist, eps=self.eps,
                                       k=self.cfg.snap_candidates, block=self.block)
        else:
            rows_out, snap_info = None, {"snap_fallbacks": 0, "snap_collisions": 0}
        t_snap = time.perf_counter() - t_snap0
        return {
            "rows": rows_out,
            "theta": c_final,
            "init_rows": self.init_rows,
            "losses": self.losses,
            "final_loss": self.final_loss,
            **self._assign_stats(),
            "seconds_init": self.t_init,
            "seconds_optimize": self.t_opt,
            "seconds_snap": t_snap,
            "seconds_per_iter_mean": float(np.mean(self.iter_seconds)) if self.iter_seconds else 0.0,
            "seconds_per_iter": [round(v, 4) for v in self.iter_seconds],
            "seconds_breakdown": {**{k: round(v, 3) for k, v in self.timing.items()},
                                  **{k: round(v, 3) for k, v in self.assigner.timing.items()}},
            "n_active": self.n_act,
            "block_size": self.block,
            "pruned": self.prune,
            "screen": self.assigner.screen,
            "top2_kernel": self.assigner.top2_kernel,
            "top2_kernel_fallback": self.top2_kernel_fallback,
            **(self.static.info() if self.static is not None else {"loop": "eager", "loop_fallback": None}),
            "bb_dtype": str(self.bb_dtype).replace("torch.", ""),
            "eps": self.eps,
            **snap_info,
        }

    def _assign_stats(self) -> dict:
        """Parameters that won no sample, and the pruning's counts, summed over the ranks."""
        asg, dev = self.assigner, self.dev
        counts = self.dist.all_reduce(torch.bincount(asg.p[asg.p >= 0], minlength=self.b).double())
        tot = self.dist.all_reduce(torch.tensor([asg.totals[k] for k in ASSIGN_STATS], dtype=torch.float64,
                                                device=dev))
        per_iter = self.dist.all_reduce(torch.tensor([it["refreshed"] for it in asg.per_iter], dtype=torch.float64,
                                                     device=dev))
        return {"empty_params": int((counts == 0).sum()),
                "assign_stats": {k: int(v) for k, v in zip(ASSIGN_STATS, tot.tolist())},
                "refreshed_per_iter": [int(v) for v in per_iter.tolist()]}
