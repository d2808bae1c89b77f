"""Naive ActiveFT reference: the released code's approach (full N x B matrix, autograd), for checks and timing.

It holds the whole N x B similarity matrix each iteration and differentiates through it with autograd, as
``ActiveFT_CIFAR.py`` does; ``literal=True`` also keeps its direct exponentials (``exp(prod)``, which
overflow for small temperatures). Snapping sorts every parameter's full row, as the released code does.
The fast selector must reproduce this: same assignments, same loss curve, same selection.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as tnf

from bench_suite.activeft.assign import decision_eps
from bench_suite.activeft.init import initial_rows
from bench_suite.activeft.optimize import subset_generator
from bench_suite.runtime import Runtime


def reference_select(features, budget: int, *, seed: int = 0, objective: str = "official",
                     regularizer: str = "ours", temperature: float = 0.07, iters: int = 300, lr: float = 1e-3,
                     balance: float = 1.0, update_assign: bool = True, subset: int = 0, init: str = "random",
                     scheduler: str = "none", dtype=torch.float32, literal: bool = False,
                     record_assign: bool = False, device="cpu") -> dict:
    """Run the naive reference on an in-memory N x d array (rows unit norm). Returns rows/losses/timing."""
    t0 = time.perf_counter()
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32).to(device=device, dtype=dtype)
    n, d = f.shape
    tau = float(temperature)
    f32 = f.float()
    init_rows = initial_rows(init, f32, slice(0, n), n, budget, seed, Runtime(),
                             decision_eps(d, float(f32.norm(dim=1).max())))
    theta = torch.nn.Parameter(f[torch.as_tensor(init_rows, device=f.device)].clone())
    if objective == "paper":
        with torch.no_grad():
            theta.data = tnf.normalize(theta.data, dim=1)
    opt = torch.optim.Adam([theta], lr=lr, foreach=False)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iters, 1), eta_min=1e-6)
             if scheduler == "cosine" else None)
    sub_gen, _ = subset_generator(subset, n, seed)  # the fast path's random stream
    frozen = None
    losses, assigns = [], []
    final = float("nan")
    for t in range(iters + 1):
        c = tnf.normalize(theta, dim=1) if objective == "official" else theta
        if frozen is None and not update_assign:
            with torch.no_grad():
                frozen = (f @ c.T).max(dim=1).indices
        if sub_gen is not None:
            rows = torch.randperm(n, generator=sub_gen)[:subset].sort().values.to(f.device)
            batch = f[rows]
        else:
            rows, batch = None, f
        prod = batch @ c.T / tau  # (n, B): the whole similarity matrix
        if update_assign:
            a, pk = prod.max(dim=1)
        else:
            pk = frozen if rows is None else frozen[rows]
            a = prod.gather(1, pk[:, None]).squeeze(1)
        if objective == "official" and regularizer == "ours":
            cent = c.detach() @ c.T / tau
            if literal:
                if update_assign:
                    pos, pk = torch.exp(prod).max(dim=1)
                else:
                    pos = torch.exp(a)
                csum = torch.exp(cent).sum(dim=0)
                loss = -(torch.log(pos) - torch.log(pos + csum[pk] * balance)).mean()
            else:
                log_r = torch.logsumexp(cent, dim=0)
                loss = tnf.softplus(log_r[pk] + math.log(balance) - a).mean()
        elif regularizer == "ours":  # paper Eq. 11
            g = c @ c.T / tau
            eye = torch.eye(len(c), dtype=torch.bool, device=c.device)
            rep = torch.logsumexp(g.masked_fill(eye, -math.inf), dim=1).mean() if len(c) > 1 else g.sum() * 0
            loss = -a.mean() + balance * rep
        elif regularizer == "none":
            loss = -a.mean()
        else:  # infonce (S2)
            loss = -a.mean() + torch.logsumexp(prod, dim=0)[pk].mean()
        if record_assign:
            assigns.append(pk.detach().clone())
        if t == iters:
            final = float(loss.detach())
            break
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if objective == "paper":
            with torch.no_grad():
                theta.data = tnf.normalize(theta.data, dim=1)
    if f.device.type == "cuda":
        torch.cuda.synchronize(f.device)
    t_opt = time.perf_counter() - t0
    with torch.no_grad():
        c = tnf.normalize(theta.detach(), dim=1)
        order = torch.sort(c @ f.T, dim=1, descending=True, stable=True).indices
    taken, out = set(), []
    for j in range(order.shape[0]):
        start = 0
        while len(out) == j:
            for r in order[j, start:start + 64].tolist():
                if r not in taken:
                    taken.add(r)
                    out.append(r)
                    break
            start += 64
    return {"rows": np.asarray(out, dtype=np.int64), "init_rows": init_rows, "losses": losses, "final_loss": final,
            "assignments": assigns, "seconds_optimize": t_opt, "seconds": time.perf_counter() - t0,
            "theta": c}
