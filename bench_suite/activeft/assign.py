"""Exact nearest-parameter search ``p(i) = argmax_j <f_i, c_j>`` with certified candidate pruning.

The naive search costs N x B x d per iteration. Between iterations the parameters move little, so most
samples keep their nearest parameter; this module proves that instead of recomputing it.

State per sample (this rank's rows only), set by a *full refresh* (one row of the N x B product):

* ``cand`` - its K most similar parameters at refresh time, ``thr`` - the (K+1)-th similarity (every
  other parameter was at most ``thr``), ``t0`` - the refresh iteration;
* ``chi`` - for every candidate an upper-bound offset ``s_ik - P_k(t_ik)`` where ``s_ik`` was an exact
  similarity at iteration ``t_ik`` and ``P_k(t)`` is parameter k's cumulative path length
  ``sum_t |c_k(t+1) - c_k(t)|`` (times max |f|).

Because ``|<f, c(t)> - <f, c(s)>| <= |f| |c(t) - c(s)| <= P(t) - P(s)``, at iteration t

* candidate k:      ``<f_i, c_k> <= chi_ik + P_k(t)``
* any non-candidate: ``<f_i, c_j> <= thr_i + max_j (P_j(t) - P_j(t0_i))``

and the current assignment's similarity ``a_i`` is computed exactly anyway (the loss needs it). If ``a_i``
beats every bound by ``eps`` (a margin covering float32 rounding), the argmax is certified unchanged at
O(K) cost. Otherwise the candidates whose bound could still win are recomputed exactly (one d-dot each),
possibly certifying a new winner among the candidates; only when that cannot decide (the non-candidate
bound is too loose, or an exact tie within ``eps``) is the sample refreshed against all B parameters.

Ties and rounding: the assignment is defined as the argmax of the float64 dot product of the float32
feature with the float64 parameter, lowest index on exact ties. Float32 products decide whenever the lead
exceeds ``eps`` (>= twice the float32 error bound); closer calls are re-evaluated in float64. This makes
the assignments equal to the full computation's, independent of how rows are blocked or split across
ranks (the property the distributed equality test relies on).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch

from bench_suite.activeft import fused_top2
from bench_suite.activeft.rounding import U32, accumulation_bound

# relative rounding of an input in each screening precision of the full pass: tf32 2^-10 covers even a
# truncation of its 10-bit mantissa (the GPU converts); bf16 2^-8 is round-to-nearest of its 8-bit significand
# (torch's own conversion, done here, and of the product's bf16 output)
SCREEN_UNIT = {"fp32": 0.0, "tf32": 2.0 ** -10, "bf16": 2.0 ** -8}
# covers the float32 rounding of the per-row window's own terms and arithmetic (about 8 roundings of at most 2^-24
# relative); the rounding of the comparisons against it (``best - window``: relative to |best|) is covered by eps
WINDOW_SAFETY = 1.0 + 2.0 ** -16
# bytes of an undecided block's written-out bf16 product at once (the Triton kernel's blocks are larger than
# ``optimize.auto_block``'s 1 GiB of float32 products, so that product is taken in row chunks)
RECHECK_BYTES = 1 << 30
# candidates per undecided screened row, decided by float32 dots (a row with more in its window: full pass)
RECHECK_K = 8
# parameters examined in float64 for a float32 near-tie in fixed shapes (more within eps: flagged, redone)
NEAR_K = 4


def decision_eps(d: int, fnorm: float = 1.0) -> float:
    """Margin above which a float32 similarity comparison is certainly right (2 x the rounding bound)."""
    return accumulation_bound(d) * fnorm + 1e-7


def _rounding_terms(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``f``: ``|f - bf16(f)|`` and ``|bf16(f)|``, computed in float64, returned in float32."""
    f64, low = f.double(), f.to(torch.bfloat16).double()
    return (f64 - low).norm(dim=1).float(), low.norm(dim=1).float()


class Workspace:
    """Reusable scratch buffers. Fresh multi-MiB temporaries every block and iteration are returned to the
    OS and page-faulted back in each time, which cost more than the arithmetic; these are allocated once."""

    def __init__(self, device):
        self.device = device
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, dtype=torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self.bufs[name] = buf
        return buf[:numel].view(shape)


@contextlib.contextmanager
def _threads(n: int):
    """``torch.set_num_threads(n)`` for the duration (no-op when already n)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Assigner:
    """Nearest-parameter search over one rank's rows ``feats`` (n x d float32, rows about unit norm)."""

    def __init__(self, feats: torch.Tensor, n_params: int, *, candidates: int = 16, block: int = 8192,
                 prune: bool = True, max_steps: int = 1, fnorm_max: float = 1.0, verify: bool = False,
                 screen: str = "fp32", top2_kernel: bool = False):
        self.F = feats
        self.n, self.d = int(feats.shape[0]), int(feats.shape[1])
        self.B = int(n_params)
        self.K = max(1, min(int(candidates), self.B))
        self.block = max(1, int(block))
        self.prune = bool(prune)
        self.verify = bool(verify)
        if screen not in SCREEN_UNIT:
            raise ValueError(f"screen must be one of {sorted(SCREEN_UNIT)}, not {screen!r}")
        self.screen = screen
        # the screened pass's product and top-2 in one Triton kernel (fused_top2; the caller checked it)
        self.top2_kernel = bool(top2_kernel) and screen != "fp32" and not self.prune
        self._f_low: torch.Tensor | None = None
        self._f_terms: tuple[torch.Tensor, torch.Tensor] | None = None
        if screen == "bf16" and not self.prune:  # here, not lazily: a first use inside a capture would not fill them
            self._f_low = feats.to(torch.bfloat16)
            parts = [_rounding_terms(feats[s:s + 65536]) for s in range(0, max(self.n, 1), 65536)]
            self._f_terms = tuple(torch.cat(t) for t in zip(*parts))  # (|f - f~|, |f~|) per row, f~ = bf16(f)
        self.fnorm = float(fnorm_max)
        dev = feats.device
        self.device = dev
        self.ws = Workspace(dev)
        self.p = torch.full((self.n,), -1, dtype=torch.long, device=dev)
        if self.prune:
            self.cand = torch.zeros((self.n, self.K), dtype=torch.int32, device=dev)
            self.chi = torch.zeros((self.n, self.K), dtype=torch.float32, device=dev)
            self.thr = torch.full((self.n,), -math.inf, dtype=torch.float32, device=dev)
            self.t0 = torch.full((self.n,), -1, dtype=torch.long, device=dev)
            self.ppos = torch.zeros((self.n,), dtype=torch.long, device=dev)
            self.ubo = torch.full((self.n,), math.inf, dtype=torch.float32, device=dev)
            self.tl = torch.zeros((self.n,), dtype=torch.long, device=dev)
        self.P_hist = torch.zeros((max_steps + 1, self.B), dtype=torch.float64, device=dev)
        self.step = -1
        self._prev_c64 = None
        self.eps_base = decision_eps(self.d, self.fnorm)
        self.eps = self.eps_base  # set_params adds the pruning's path terms
        self.totals = {"certified": 0, "refined": 0, "refreshed": 0, "pairs": 0, "screen_rechecked": 0,
                       "screen_full": 0, "verify_mismatches": 0}
        self.per_iter: list[dict] = []
        self.timing = {"certify": 0.0, "refresh": 0.0}
        self._mm_threads = 0  # inside _assign_block: the caller's torch threads, for the N x B products

    # ------------------------------------------------------------------ per iteration
    def set_params(self, c64: torch.Tensor) -> None:
        """Start an iteration with parameters ``c64`` (B x d float64, the values whose argmax is wanted)."""
        self.step += 1
        if self.step >= self.P_hist.shape[0]:
            self.P_hist = torch.cat([self.P_hist, torch.zeros_like(self.P_hist)])
        self.set_values(c64)
        if self._prev_c64 is not None:
            delta = (c64 - self._prev_c64).norm(dim=1) * self.fnorm * (1.0 + 1e-12)
            self.P_hist[self.step] = self.P_hist[self.step - 1] + delta
        self._prev_c64 = c64.clone()
        if not self.prune:
            self.eps = self.eps_base
            self.per_iter.append({"certified": 0, "refined": 0, "refreshed": 0, "pairs": 0})
            return
        pt = self.P_hist[self.step]
        self.Pt32 = pt.float()
        # max_j (P_j(t) - P_j(s)) for every earlier refresh iteration s
        self.dmax = (pt[None, :] - self.P_hist[: self.step + 1]).amax(dim=1).float()
        pmax = float(pt.max()) if self.B else 0.0
        self.eps = self.eps_base + 10.0 * (1.0 + pmax) * U32
        self.per_iter.append({"certified": 0, "refined": 0, "refreshed": 0, "pairs": 0})

    def set_values(self, c64: torch.Tensor) -> None:
        """The parameters' values alone (float64, float32 and the screen's): all the full product needs, and all
        that the fixed-shape iteration (``static_loop``) sets; ``set_params`` also advances the pruning's state."""
        self.c64 = c64
        self.c32 = c64.float()
        if self.screen != "fp32":
            self._set_low_params(c64)

    def _count(self, key: str, value: int) -> None:
        self.per_iter[-1][key] += int(value)
        self.totals[key] += int(value)

    def iterate(self, rows: torch.Tensor | None = None, *, update: bool = True, with_key: bool = False,
                fixed=None):
        """Yield ``(F_block, p_block, a_block)`` over ``rows`` (sorted local indices; None = all rows).

        ``a_block`` is the float32 similarity to the assigned parameter. With ``update=False`` the stored
        assignments are kept (rows never assigned are assigned exactly first). ``with_key``: yield
        ``(key, F_block, p_block, a_block)``, ``key`` the block's local rows (a slice, or an index tensor).
        ``fixed`` (the full product only): the row selections of ``static_loop``'s fixed-shape iteration, which
        also keeps the iteration's counts itself (they are not added to ``totals`` here).
        """
        n_rows = self.n if rows is None else int(rows.numel())
        for s in range(0, n_rows, self.block):
            e = min(n_rows, s + self.block)
            if rows is None:
                idx = torch.arange(s, e, device=self.device)
                fr = self.F[s:e]
            else:
                idx = rows[s:e]
                fr = self.F.index_select(0, idx)
            if update:
                p_r, a_r = self._assign_block(idx, fr, slice(s, e) if rows is None else idx, fixed)
            else:
                p_r = self.p[idx]
                missing = p_r < 0
                if bool(missing.any()):
                    mi = missing.nonzero().squeeze(1)
                    self._full(idx[mi], fr[mi])
                    p_r = self.p[idx]
                a_r = self._dot_params(fr, p_r)
            key = (slice(s, e) if rows is None else idx) if with_key else None
            yield (key, fr, p_r, a_r) if with_key else (fr, p_r, a_r)

    def assign_all(self) -> None:
        """Exact assignment of every row with the current parameters (used for frozen assignments)."""
        for _ in self.iterate(None, update=True):
            pass

    # ------------------------------------------------------------------ internals
    def _assign_block(self, idx: torch.Tensor, fr: torch.Tensor, key, fixed=None):
        if not self.prune:  # one N x B product and its top-2, on the caller's threads (timed as a refresh)
            t0 = time.perf_counter()
            try:
                return self._assign_block_impl(idx, fr, key, fixed)
            finally:
                self.timing["refresh"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        r0 = self.timing["refresh"]
        # The bookkeeping is dozens of small gather/compare/scatter ops per block: run them on one thread.
        # Multi-threaded, each one is an OpenMP fork/join, and when the cores are shared (another process
        # busy) every join waits for a time slice: measured 20-100x slower than one thread at N=5,000,
        # B=50. These ops are exact (indexing, comparisons, row-wise float32 dots), so the thread count
        # does not change their values; the N x B products (``sims``) keep the caller's threads.
        self._mm_threads = torch.get_num_threads()
        try:
            with _threads(1):
                out = self._assign_block_impl(idx, fr, key)
        finally:
            self._mm_threads = 0
        self.timing["certify"] += time.perf_counter() - t0 - (self.timing["refresh"] - r0)
        return out

    @staticmethod
    def _rows(t: torch.Tensor, key) -> torch.Tensor:
        """``t[key]``: a view for a slice, ``index_select`` for row indices. On a CPU ``index_select`` / ``take``
        gather 2-4x faster than advanced indexing (27k x 16 rows: 0.3 vs 1.1 ms), and the pruning's bookkeeping
        is mostly gathers, so they are used throughout (the same values)."""
        return t[key] if isinstance(key, slice) else t.index_select(0, key)

    def _assign_block_impl(self, idx: torch.Tensor, fr: torch.Tensor, key, fixed=None):
        """Rows ``idx`` (``key``: the same rows as a slice when contiguous, so block reads are views)."""
        nb = int(idx.numel())
        if not self.prune:
            p_new, a_new = self._exact(fr, fixed) if self.screen == "fp32" else self._screened(key, fr, fixed)
            self.p[idx] = p_new
            if fixed is None:
                self._count("refreshed", nb)
            return p_new, a_new
        eps, K = self.eps, self.K
        rows_of = self._rows
        p_r = rows_of(self.p, key)
        fresh = p_r < 0
        p_out = p_r.clone()
        # exact similarity to the current assignment (the loss needs it anyway)
        a_out = self._dot_params(fr, p_r.clamp_min(0))
        # level 0, O(1) per row: best other candidate and every non-candidate, bounded by the fastest mover
        # (t0 = -1: never refreshed, so fresh; its bound is not used)
        lim = torch.maximum(rows_of(self.ubo, key) + self.dmax.index_select(0, rows_of(self.tl, key)),
                            rows_of(self.thr, key) + self.dmax.index_select(0, rows_of(self.t0, key).clamp_min(0)))
        slow_mask = ~fresh & ~((a_out - lim) > eps)
        self._count("certified", int(nb - int(fresh.sum()) - int(slow_mask.sum())))
        to_full = fresh.clone()
        old = slow_mask.nonzero().squeeze(1)
        if old.numel():
            # level 1a, O(K) per row: per-candidate bounds (each candidate's own path length)
            go = idx.index_select(0, old)
            cand = self.cand.index_select(0, go).long()
            ub = self.chi.index_select(0, go).add_(self.Pt32.take(cand))
            pp = self.ppos.index_select(0, go)
            ub.scatter_(1, pp[:, None], -math.inf)
            om = ub.amax(dim=1)
            nonc = self.thr.index_select(0, go).add_(self.dmax.index_select(0, self.t0.index_select(0, go)))
            ok = (a_out.index_select(0, old) - torch.maximum(om, nonc)) > eps
            if bool(ok.any()):
                ki = ok.nonzero().squeeze(1)
                gk = go.index_select(0, ki)
                self.ubo.index_copy_(0, gk, om.index_select(0, ki))
                self.tl.index_fill_(0, gk, self.step)
                self._count("refined", int(ki.numel()))
                ri = (~ok).nonzero().squeeze(1)
                old, go, cand, ub, pp, nonc = (t.index_select(0, ri) for t in (old, go, cand, ub, pp, nonc))
        if old.numel():
            # level 1, O(K) per row: per-candidate bounds (level 1a's), exact recomputation of the candidates
            # that could win. Pairs are addressed by flat position row * K + candidate in the (rows x K) arrays.
            ao = a_out.index_select(0, old)
            ar = torch.arange(old.numel(), device=self.device)
            assigned = ar * K + pp
            ub.view(-1).index_copy_(0, assigned, ao)
            exact = torch.zeros_like(ub, dtype=torch.bool)
            exact.view(-1).index_fill_(0, assigned, True)
            win = torch.full((old.numel(),), -1, dtype=torch.long, device=self.device)
            full_o = torch.zeros(old.numel(), dtype=torch.bool, device=self.device)
            act = ar
            n_pairs = 0
            done = [(assigned, ao)]  # (flat position, exact similarity) of every evaluated pair
            while act.numel():
                if act is ar:  # first round: every row, whose only exact value is its assignment's
                    ub_a, ex_a, bv, bi = ub, exact, ao, pp
                else:
                    ub_a, ex_a = ub.index_select(0, act), exact.index_select(0, act)
                    bv, bi = torch.where(ex_a, ub_a, torch.full_like(ub_a, -math.inf)).max(dim=1)
                others = ub_a.clone()
                others.scatter_(1, bi[:, None], -math.inf)
                lim_a = torch.maximum(others.amax(dim=1), nonc.index_select(0, act))
                ok = (bv - lim_a) > eps
                win[act[ok]] = bi[ok]
                self._count("refined", int(ok.sum()))
                rest = ~ok
                need = (~ex_a) & (ub_a > (bv - eps)[:, None]) & rest[:, None]
                has = need.any(dim=1)
                full_o[act[rest & ~has]] = True
                if bool(has.any()):
                    rr, kk = need.nonzero(as_tuple=True)
                    gr = act.index_select(0, rr)
                    pos = gr * K + kk
                    vals = self._dot_params(fr, cand.take(pos), rows=old.index_select(0, gr))
                    ub.view(-1).index_copy_(0, pos, vals)
                    exact.view(-1).index_fill_(0, pos, True)
                    done.append((pos, vals))
                    n_pairs += int(gr.numel())
                act = act[has]
            self._count("pairs", n_pairs)
            # refreshed bounds for the exactly evaluated candidates (each pair once: no repeated position)
            dpos, dv = (torch.cat(t) for t in zip(*done))
            chi_pos = go.index_select(0, dpos // K) * K + dpos % K
            self.chi.view(-1).index_copy_(0, chi_pos, dv - self.Pt32.take(cand.take(dpos)))
            cert = (win >= 0).nonzero().squeeze(1)
            if cert.numel():
                wc = win.index_select(0, cert)
                gc = go.index_select(0, cert)
                oc = old.index_select(0, cert)
                flat = cert * K + wc
                newp = cand.take(flat)
                p_out.index_copy_(0, oc, newp)
                a_out.index_copy_(0, oc, ub.take(flat))  # an exact row-dot value
                self.ppos.index_copy_(0, gc, wc)
                self.p.index_copy_(0, gc, newp)
                others = ub.index_select(0, cert)
                others.scatter_(1, wc[:, None], -math.inf)
                self.ubo.index_copy_(0, gc, others.amax(dim=1))
                self.tl.index_fill_(0, gc, self.step)
            to_full[old[full_o]] = True
        fi = to_full.nonzero().squeeze(1)
        if fi.numel():
            # level 2: the row against all B parameters (new candidates and threshold)
            pf, af = self._full(idx[fi], fr.index_select(0, fi))
            p_out[fi] = pf
            a_out[fi] = af
        if self.verify:
            p_ref, _ = self._exact(fr)
            bad = int((p_ref != p_out).sum())
            self.totals["verify_mismatches"] += bad
            if bad:
                raise AssertionError(f"certified assignment differs from the full computation on {bad} rows")
        return p_out, a_out

    def _dot_params(self, fr: torch.Tensor, params: torch.Tensor, rows: torch.Tensor | None = None):
        """``<fr[rows_i], c32[params_i]>`` for every i (float32; ``rows``: None = 0..n-1, else ascending).

        On a CPU: one sampled dense-dense product (SDDMM, ``torch.sparse.sampled_addmm``) with the pairs as a
        CSR pattern, which reads each row and parameter in place. Measured on 2 cores, 1 thread, d = 384:
        23 ms for one pair per row over 50k rows and 5 ms for 20k pairs over an 8k-row block, against 73 and
        39 ms gathering both sides (``index_select``) then multiplying. Each value is its own float32 dot, the
        same whatever the block, the thread count or the rank split (tested). Elsewhere: the gathers (the
        CUDA SDDMM is unmeasured; a GPU runs the full product by default anyway)."""
        n = int(params.numel())
        if n == 0:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        if self.device.type == "cpu":
            m = int(fr.shape[0])
            crow = torch.arange(n + 1, device=self.device) if rows is None else \
                torch.searchsorted(rows, torch.arange(m + 1, device=self.device))
            zeros = torch.zeros(n, dtype=torch.float32, device=self.device)  # the pattern's (ignored) values
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, params, zeros, (m if rows is not None else n, self.B))
            with self._product_threads(n >= 8192):
                return torch.sparse.sampled_addmm(pattern, fr, self.c32.T, beta=0.0).values()
        g = self.ws.get("dot_c", (n, self.d))
        torch.index_select(self.c32, 0, params, out=g)
        if rows is None:
            g.mul_(fr)
        else:
            f = self.ws.get("dot_f", (n, self.d))
            torch.index_select(fr, 0, rows, out=f)
            g.mul_(f)
        return g.sum(dim=1)

    def _product_threads(self, large: bool = True):
        """The caller's threads for one large product (inside ``_assign_block`` the bookkeeping around it runs
        on one thread); a small one stays where it is."""
        return _threads(self._mm_threads or torch.get_num_threads()) if large else contextlib.nullcontext()

    def sims(self, fr: torch.Tensor) -> torch.Tensor:
        """``fr @ c32.T`` into a reusable buffer (valid until the next call)."""
        out = self.ws.get("sims", (int(fr.shape[0]), self.B))
        with self._product_threads():
            return torch.mm(fr, self.c32.T, out=out)

    def _exact(self, fr: torch.Tensor, fixed=None, real=None):
        """Canonical argmax over all B parameters for the rows ``fr`` (no state change); ``fixed`` and ``real``:
        see ``_decide_ties``."""
        s = self.sims(fr)
        tv, ti = s.topk(min(2, self.B), dim=1)
        p = self._decide_ties(fr, s, tv, ti, fixed, real)
        return p, s.gather(1, p[:, None]).squeeze(1)

    def _rows_where(self, mask: torch.Tensor, kind: str, fixed, stat: str | None = None):
        """``(indices of mask, real)`` (counted under ``stat``). Without ``fixed``: all of them, ``real`` None.
        With it: its compaction of fixed size, and ``real`` marks the entries that are not padding."""
        if fixed is None:
            idx = mask.nonzero().squeeze(1)
            if stat:
                self.totals[stat] += int(idx.numel())
            return idx, None
        if stat:
            fixed.count(stat, mask.sum())
        return fixed.compact(mask, kind)

    @staticmethod
    def _put(p: torch.Tensor, rows: torch.Tensor, real, values: torch.Tensor) -> torch.Tensor:
        """``p`` with ``p[rows] = values``. The padding of a fixed compaction (``real`` False: repeats of row 0,
        which may have taken another route than row 0's own entry) is written to a spare slot, never over a row."""
        if real is None:
            return p.index_copy_(0, rows, values)
        n = int(p.shape[0])
        ext = torch.cat([p, p[:1]])
        ext.index_copy_(0, torch.where(real, rows, n), values)
        return ext[:n]

    def _decide_ties(self, fr, s, tv, ti, fixed=None, real=None) -> torch.Tensor:
        """``_resolve_ties``. With ``fixed`` (``static_loop.Compactor``, not dynamic) in fixed shapes and with no host
        sync: the tied rows are compacted and decided in float64 among their ``NEAR_K`` best (more near
        candidates than that are flagged: the caller redoes the iteration). ``real``: which rows of ``fr`` are not
        the padding of an enclosing compaction (padding rows are left out, so they cannot fill a capacity)."""
        if tv.shape[1] < 2:
            return ti[:, 0].clone()
        if fixed is None:
            return self._resolve_ties(fr, s, tv, ti)
        tie = (tv[:, 0] - tv[:, 1]) <= self.eps
        if fixed.dynamic:
            fixed.compact(tie, "tie")  # counted: the fixed capacities are sized from dynamic iterations
            return self._resolve_ties(fr, s, tv, ti)
        if real is not None:
            tie &= real
        rr, real_t = fixed.compact(tie, "tie")
        k = min(NEAR_K, self.B)
        cv, ci = s.index_select(0, rr).topk(k, dim=1)
        if k < self.B:  # maybe more near candidates than examined
            fixed.flag(((cv[:, -1] >= cv[:, 0] - self.eps) & real_t).sum())
        return self._put(ti[:, 0].clone(), rr, real_t, self.f64_among(fr.index_select(0, rr), cv, ci))

    def screen_windows(self, key=None, fr: torch.Tensor | None = None):
        """``(screen, written)``: rows whose screened top-2 margin exceeds ``screen`` have the exact (canonical) argmax
        as their screened one; ``written`` is the same bound for the product written out in bf16 (the candidates'
        values). They differ only with the Triton kernel, whose values are not rounded on output.

        Every screened similarity is within ``bound`` of the exact one; a window is ``2 bound + eps``. The bound
        has three parts: the inputs' rounding, the float32 accumulation (counted at twice its round-to-nearest
        bound: tensor cores are not documented to round to nearest) and, for a product written in bf16, the
        output's rounding.

        tf32, or no rows given: floats, with the inputs' worst case ``|f| (2u + u^2)``, ``|f| <= fnorm``. bf16 with
        the block's rows (``key``, ``fr``): one window per row (tensors), whose inputs' part is measured, not
        assumed. By Cauchy-Schwarz ``|<f, c> - <f~, c~>| <= |f - f~| |c| + |f~| |c - c~|``, with the row's own
        rounding residual and the iteration's largest parameter residual (``_set_low_params``). Those residuals
        are about 0.42 u (a uniform rounding's root mean square), so the window is well under the worst case's.
        On a 50k x 384 clustered pool with B = 1000, 22% of the rows were undecided instead of 38%, and 12%
        without the output's rounding (the Triton kernel, ``fused_top2``)."""
        u = SCREEN_UNIT[self.screen]
        acc = accumulation_bound(self.d)
        out = u if self.screen == "bf16" else 0.0
        if self.screen != "bf16" or fr is None:
            written = 2 * self.fnorm * (2 * u + u * u + acc + out) + self.eps
            return (written - 2 * self.fnorm * out if self.top2_kernel else written), written
        df, fl = self._row_terms(key, fr)
        cmax, dcmax, clmax = self._c_terms
        base = df * cmax + fl * (dcmax + clmax * acc)
        written = (2 * WINDOW_SAFETY) * (base + fl * (clmax * out * (1 + acc))) + self.eps
        return ((2 * WINDOW_SAFETY) * base + self.eps if self.top2_kernel else written), written

    def _set_low_params(self, c64: torch.Tensor) -> None:
        """The iteration's parameters in the screen's precision (rounded once per iteration, not per block) and,
        for bf16, the window's parameter terms ``max |c|, max |c - c~|, max |c~|`` as device scalars (no host sync:
        the fixed-shape loop captures this)."""
        if self.screen == "tf32":
            self._c_low = self.c32
            return
        self._c_low = self.c32.to(torch.bfloat16)
        low64 = self._c_low.double()
        terms = torch.stack([c64.norm(dim=1).max(), (c64 - low64).norm(dim=1).max(), low64.norm(dim=1).max()])
        self._c_terms = tuple(terms.float().unbind())

    def _row_terms(self, key, fr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(|f - f~|, |f~|)`` of a block's rows (``f~``: bf16), float32: measured for the whole rank once (in
        ``__init__``, in chunks: no float64 copy of the pool), then read by ``key``; rows without a key are measured
        on the spot."""
        if key is None:
            return _rounding_terms(fr)
        return self._rows(self._f_terms[0], key), self._rows(self._f_terms[1], key)

    def _screened(self, key, fr: torch.Tensor, fixed=None):
        """The full pass in reduced precision (``screen``), exact where it cannot decide.

        A row whose screened top-2 margin exceeds its window (``screen_windows``) keeps its screened argmax. For
        the others, a parameter outside the row's screened top ``RECHECK_K`` that is also outside the window below
        its best cannot be (or tie with) the exact argmax, so the row is decided exactly among those candidates
        (``best_among``: RECHECK_K float32 dots, not B); a row with more candidates in its window takes the
        exact float32 pass. The similarity to the winner is then one float32 row dot (the loss needs it exact).
        With ``top2_kernel`` the block's top-2 comes from the Triton kernel (``fused_top2``) and only the
        undecided rows' products are written (in bf16, so their window counts the output's rounding).
        ``fixed``: the row selections are fixed-size compactions (``static_loop``), no host sync.
        """
        f_low, c_low = self._low_inputs(key, fr)
        window, window_written = self.screen_windows(key, fr)
        k = min(RECHECK_K, self.B)
        if self.top2_kernel:
            m = int(fr.shape[0])
            tv, i1 = fused_top2.top2(f_low, c_low, out=(self.ws.get("top2_v", (m, 2)),
                                                        self.ws.get("top2_i", (m,), torch.long)))
            p = i1.clone()

            def candidates(rows):  # the rows' bf16 product written out, in chunks of at most RECHECK_BYTES
                step = max(1, RECHECK_BYTES // (2 * self.B))
                # at least one chunk: no rows to recheck (a dynamic iteration's block) gives empty candidates
                parts = [self._low_product(f_low.index_select(0, rows[s:s + step]), c_low).topk(k, dim=1)
                         for s in range(0, max(1, int(rows.shape[0])), step)]
                if len(parts) == 1:
                    return parts[0]
                return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
        else:
            s = self._low_product(f_low, c_low)
            tv, ti = s.topk(min(2, self.B), dim=1)
            tv = tv.float()  # margins in float32 (bf16 values are exact there)
            p = ti[:, 0].clone()

            def candidates(rows):
                return s.index_select(0, rows).topk(k, dim=1)
        if self.B > 1:
            unsure = (tv[:, 0] - tv[:, 1]) <= window
            rr, real = self._rows_where(unsure, "screen", fixed, "screen_rechecked")
            if fixed is not None or rr.numel():
                fu = fr.index_select(0, rr)
                cv, ci = candidates(rr)
                cv = cv.float()
                pu = self.best_among(fu, ci, fixed, real)
                if RECHECK_K < self.B:
                    w = window_written.index_select(0, rr) if torch.is_tensor(window_written) else window_written
                    full = cv[:, -1] >= cv[:, 0] - w
                    if real is not None:
                        full &= real
                    rf, real_f = self._rows_where(full, "full", fixed, "screen_full")
                    if fixed is not None or rf.numel():
                        pu = self._put(pu, rf, real_f, self._exact(fu.index_select(0, rf), fixed, real_f)[0])
                p = self._put(p, rr, real, pu)
        return p, self._dot_params(fr, p)

    def best_among(self, fu: torch.Tensor, ci: torch.Tensor, fixed=None, real=None) -> torch.Tensor:
        """The canonical argmax of each row of ``fu`` among its candidate parameters ``ci`` (m x k), which hold
        it: float32 dots of the candidates, then float64 among those within ``eps`` of the best (lowest index
        on an exact tie). ``fixed``, ``real``: as for ``_decide_ties``."""
        m, k = int(ci.shape[0]), int(ci.shape[1])
        cf = self.c32.index_select(0, ci.reshape(-1)).view(m, k, self.d)
        ev = torch.bmm(cf, fu.unsqueeze(2)).squeeze(2)
        ev, order = ev.sort(dim=1, descending=True, stable=True)
        ci = ci.gather(1, order)
        p = ci[:, 0].clone()
        if k > 1:
            tie = (ev[:, 0] - ev[:, 1]) <= self.eps
            if real is not None:
                tie &= real
            rr, real_t = self._rows_where(tie, "tie", fixed)
            if fixed is not None or rr.numel():
                p = self._put(p, rr, real_t, self.f64_among(fu.index_select(0, rr), ev.index_select(0, rr),
                                                            ci.index_select(0, rr)))
        return p

    def f64_among(self, fu: torch.Tensor, cv: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
        """Among candidates ``ci`` with float32 similarities ``cv`` (m x k, descending), those within ``eps`` of the
        best are compared in float64; the lowest index wins an exact tie (``_resolve_ties``, fixed shapes)."""
        m, k = int(ci.shape[0]), int(ci.shape[1])
        near = cv >= (cv[:, :1] - self.eps)
        f64 = fu.double()[:, None, :].expand(m, k, self.d).reshape(m * k, self.d)
        v64 = (f64 * self.c64.index_select(0, ci.reshape(-1))).sum(dim=1).view(m, k)
        v64 = torch.where(near, v64, torch.full_like(v64, -math.inf))
        at_max = near & (v64 == v64.amax(dim=1, keepdim=True))
        return torch.where(at_max, ci, torch.full_like(ci, self.B)).amin(dim=1)

    def _low_inputs(self, key, fr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's rows and the parameters in the screening precision: float32 (TF32 in the product), or
        bfloat16 (the rank's rows converted once, in ``__init__``: half the float32 pool's memory)."""
        if self.screen == "tf32":
            return fr, self._c_low
        return (self._f_low[key] if key is not None else fr.to(torch.bfloat16)), self._c_low

    def _low_product(self, f_low: torch.Tensor, c_low: torch.Tensor) -> torch.Tensor:
        """``f_low @ c_low.T`` in the screening precision: TF32 inputs, or bfloat16 values (a top-k needs no float32
        copy), always accumulated in float32: the bound of ``screen_windows`` assumes it, so the GPU's
        reduced-precision bf16 reductions (split-K partial sums in bf16) are turned off for the product."""
        cuda = torch.backends.cuda.matmul
        if self.screen == "tf32":
            before = cuda.allow_tf32
            cuda.allow_tf32 = True
            try:
                return f_low @ c_low.T  # on a CPU there is no TF32: this is the float32 product
            finally:
                cuda.allow_tf32 = before
        before = cuda.allow_bf16_reduced_precision_reduction
        cuda.allow_bf16_reduced_precision_reduction = False
        try:
            return f_low @ c_low.T
        finally:
            cuda.allow_bf16_reduced_precision_reduction = before

    def _resolve_ties(self, fr, s, tv, ti):
        p = ti[:, 0].clone()
        if tv.shape[1] < 2:
            return p
        tie = (tv[:, 0] - tv[:, 1]) <= self.eps
        if bool(tie.any()):
            tr = tie.nonzero().squeeze(1)
            near = s[tr] >= (tv[tr, 0] - self.eps)[:, None]
            r, j = near.nonzero(as_tuple=True)
            v64 = (fr[tr][r].double() * self.c64[j]).sum(dim=1)
            rowmax = torch.full((tr.numel(),), -math.inf, dtype=torch.float64, device=self.device)
            rowmax = rowmax.scatter_reduce(0, r, v64, reduce="amax")
            at_max = v64 == rowmax[r]
            jmin = torch.full((tr.numel(),), self.B, dtype=torch.long, device=self.device)
            jmin = jmin.scatter_reduce(0, r[at_max], j[at_max], reduce="amin")
            p[tr] = jmin
        return p

    def _full(self, gidx: torch.Tensor, fr: torch.Tensor):
        """Full refresh of rows ``gidx`` (features ``fr``): exact argmax plus new candidates/threshold."""
        t_start = time.perf_counter()
        try:
            return self._full_impl(gidx, fr)
        finally:
            self.timing["refresh"] += time.perf_counter() - t_start

    def _full_impl(self, gidx: torch.Tensor, fr: torch.Tensor):
        n = int(gidx.numel())
        self._count("refreshed", n)
        s = self.sims(fr)
        k1 = min(self.K + 1, self.B)
        # the top K+1 of a row costs about twice its GEMM (15 vs 8.5 us per row at B = 1000, one thread): a large
        # refresh takes the caller's threads, as the product does (per-row results, the same on any thread count)
        with self._product_threads(n >= 1024):
            tv, ti = s.topk(k1, dim=1)
        p = self._resolve_ties(fr, s, tv, ti)
        a = s.gather(1, p[:, None]).squeeze(1)
        self.p.index_copy_(0, gidx, p)
        if not self.prune:
            return p, a
        K = self.K
        cand = ti[:, :K].clone()
        vals = tv[:, :K].clone()
        thr = tv[:, K].clone() if self.B > K else torch.full((n,), -math.inf, device=self.device)
        match = cand == p[:, None]
        inc = match.any(dim=1)
        ppos = match.int().argmax(dim=1)
        if not bool(inc.all()):
            # more than K parameters tie at the top: make p a candidate, demoting the last one to the bound
            r = (~inc).nonzero().squeeze(1)
            thr[r] = torch.maximum(thr[r], vals[r, K - 1])
            cand[r, K - 1] = p[r]
            vals[r, K - 1] = a[r]
            ppos[r] = K - 1
        self.cand.index_copy_(0, gidx, cand.int())
        self.chi.index_copy_(0, gidx, vals - self.Pt32.take(cand))
        if K > 1:
            others = vals.clone()
            others.scatter_(1, ppos[:, None], -math.inf)
            self.ubo.index_copy_(0, gidx, others.amax(dim=1))
        else:
            self.ubo.index_fill_(0, gidx, -math.inf)
        self.tl.index_fill_(0, gidx, self.step)
        self.thr.index_copy_(0, gidx, thr)
        self.t0.index_fill_(0, gidx, self.step)
        self.ppos.index_copy_(0, gidx, ppos)
        return p, a
