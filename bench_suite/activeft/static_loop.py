"""The ActiveFT iteration with fixed shapes and no host synchronisation inside it, replayed from one CUDA graph.

Why (issue 10): the eager iteration issues about 160 torch ops and 5 host syncs (counted on a CPU with a
dispatch counter at 50k x 384, B = 1000, the GPU's one-block pass). On a GPU each op costs a launch and
each sync drains the queue: together a millisecond or more per iteration, more than the arithmetic at
that size (a float32 50k x 1000 x 384 product is about 0.6 ms on an H200). Here every shape inside an
iteration is fixed, so the iteration can be captured once as a CUDA graph and replayed: one launch and
one sync (the loss and a flag) per iteration.

What makes the shapes fixed: the rows whose argmax the first product cannot decide (float32 near-ties,
screened rows inside the rounding bound and, among those, the ones with more than ``assign.RECHECK_K``
candidates in their window: ``assign.Assigner._screened``) are compacted into fixed capacities with
``torch.nonzero_static`` (``Compactor``). The padding (repeats of row 0) is computed but never written over a
row, nor counted in an inner selection. More rows than a capacity, or more than ``assign.NEAR_K`` parameters
within the float32 margin of a row's best, raise a flag (summed over the ranks with the iteration's one
all_reduce); the iteration is then redone from its saved state with exact, dynamic shapes, and the capacities
grow. So the assignments are the eager loop's (the canonical argmax of ``assign``), only reached without syncs.

Scope: the objective and settings users run (official objective, regularizer ``ours``, assignments
updated every iteration, no schedule, the full product: ``why_not_static``). Others run the eager loop.
The graph needs one process (``world == 1``; NCCL inside a graph is not attempted) and a CUDA device;
``loop=static`` runs the same fixed-shape iteration without capture, on any device (how the CPU tests
check it against the eager loop). After capturing, the first replay is checked against the same
iteration run uncaptured; any difference, or a capture error, falls back to ``static`` and says why. The
capture itself is ``CudaGraphs`` (torch's recipe), a part the CPU tests replace with a stand-in.
"""

from __future__ import annotations

import time

import torch

from bench_suite.errors import BadInputError

LOOPS = ("auto", "eager", "static", "graph")
MIN_CAP = 16
CAP_FACTOR = 2.0  # capacity = this x the largest count seen (then a power of two)
# a replay may differ from the uncaptured iteration only by rounding; beyond this (relative to max |theta|), the
# graph is not trusted
REPLAY_TOLERANCE = 1e-7
# a graph is captured only when at least this many iterations remain (capturing and checking it costs about
# three iterations)
MIN_GRAPH_ITERS = 8


def why_not_static(cfg, prune: bool) -> str | None:
    """None when the fixed-shape iteration covers these options, else what it would need."""
    if cfg.objective != "official" or cfg.regularizer != "ours":
        return "objective=official with regularizer=ours"
    if not cfg.update_assign:
        return "update_assign=true"
    if cfg.scheduler != "none":
        return "scheduler=none"
    if prune:
        return "prune=false (the full product)"
    return None


def resolve_loop(requested: str, cfg, device: torch.device, world: int, prune: bool) -> str:
    """The loop as run: ``auto`` is ``graph`` on a GPU with one process when the options allow, else eager."""
    if requested not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, not {requested!r}")
    if requested == "eager":
        return "eager"
    why = why_not_static(cfg, prune)
    if requested == "auto":
        return "graph" if why is None and device.type == "cuda" and world == 1 else "eager"
    if why is not None:
        raise BadInputError(f"activeft: loop={requested} needs {why}")
    if requested == "graph" and (device.type != "cuda" or world != 1):
        raise BadInputError(f"activeft: loop=graph needs one process on a CUDA device (here: {device}, "
                            f"{world} processes); loop=static runs the same iteration without the graph")
    return requested


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class CudaGraphs:
    """torch's recipe for capturing a CUDA graph (``StaticLoop`` takes it as a part, so the CPU tests can run the
    loop's graph logic with a stand-in that replays the body uncaptured)."""

    @staticmethod
    def current_stream():
        return torch.cuda.current_stream()

    @staticmethod
    def warm_up(body) -> None:
        """Run ``body`` once on a side stream before capturing (lazy initialisation stays out of the graph)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)

    @staticmethod
    def capture(body) -> "torch.cuda.CUDAGraph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph

    @staticmethod
    def recover(stream) -> None:
        """After a failed capture: ``torch.cuda.graph`` skips leaving its capture stream when ``capture_end`` raises,
        so the caller's stream is made current again."""
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()


class StaticLoop:
    """Iterations 0..T-1 and the final evaluation of one ``optimize._Run`` with fixed shapes.

    Iteration 0 runs with dynamic shapes and sizes the capacities; then each iteration saves the state
    (theta, Adam's, the assignments), runs (a graph replay, or the same code uncaptured) and reads ``[loss, overflow,
    *statistics]`` in one sync; on an overflow it restores the state, redoes the iteration with dynamic
    shapes, grows the capacities and recaptures.
    """

    def __init__(self, run, mode: str, graphs=None):
        self.r = run
        self.mode = mode  # "static" or "graph"
        self.graphs = graphs if graphs is not None else CudaGraphs()  # how a graph is captured (tests: a stand-in)
        self.graph = None
        self.fallback: str | None = None
        self.caps: dict[str, int] | None = None
        self.counts = {"tie": 0, "screen": 0, "full": 0}  # largest compaction seen in a dynamic iteration (per block)
        self.rows_buf: torch.Tensor | None = None
        dev = run.dev
        # loss, overflow (all ranks), then this rank's Compactor.STATS
        self.out = torch.zeros(2 + len(Compactor.STATS), dtype=torch.float64, device=dev)
        self.captures = 0
        self.redone = 0
        run.assigner.eps = run.assigner.eps_base  # as ``Assigner.set_params`` sets it without pruning
        opt = run.opt  # for a graph, ``_Run`` made it capturable (its step counter on the device)
        # what an iteration changes: theta, Adam's state and the assignments (the warm-up and check runs of a
        # capture must leave no trace, also in the rows of a subset that are not drawn again)
        self.state = [run.theta.data, opt.exp_avg, opt.exp_avg_sq, opt.step_t, run.assigner.p]
        self.saved = [t.clone() for t in self.state]

    # ------------------------------------------------------------------ the loop
    def run(self, progress=None) -> None:
        r, cfg = self.r, self.r.cfg
        asg = r.assigner
        for t in range(cfg.iters + 1):
            t_it = time.perf_counter()
            rows = r._subset_rows()
            n_rows = asg.n if rows is None else int(rows.numel())
            asg.step += 1
            asg.per_iter.append({"certified": 0, "refined": 0, "refreshed": n_rows, "pairs": 0})
            asg.totals["refreshed"] += n_rows
            if t == cfg.iters:
                loss, _, *stats = self._dynamic(rows, step=False)
                r.final_loss = loss
                self._add_stats(stats)
                break
            if self.caps is None:
                loss, _, *stats = self._dynamic(rows, step=True)
                self._size_caps()
                if self.mode == "graph" and cfg.iters - t - 1 >= MIN_GRAPH_ITERS:
                    self._capture(rows)
                elif self.mode == "graph":
                    self.fallback = f"no CUDA graph for {cfg.iters} iterations (it pays from {MIN_GRAPH_ITERS + 1})"
                    self.mode = "static"
            else:
                self._save()
                if self.graph is not None:
                    if rows is not None:
                        self.rows_buf.copy_(rows)
                    self.graph.replay()
                else:
                    self._body(self.caps, rows, step=True)
                loss, over, *stats = self.out.tolist()
                if over > 0:  # a capacity was too small somewhere: redo this iteration exactly, then grow
                    self._restore()
                    loss, _, *stats = self._dynamic(rows, step=True)
                    self.redone += 1
                    self._size_caps()
                    if self.mode == "graph" and self.graph is not None:
                        self._capture(rows)
            self._add_stats(stats)
            r.losses.append(loss)
            r.iter_seconds.append(time.perf_counter() - t_it)
            if progress is not None:
                progress(t + 1, loss)
        r.t_opt = time.perf_counter() - r.t_start - r.t_init

    def info(self) -> dict:
        return {"loop": "graph" if self.graph is not None else "static", "loop_fallback": self.fallback,
                "loop_caps": dict(self.caps or {}), "loop_redone": self.redone, "loop_captures": self.captures}

    def _add_stats(self, stats: list[float]) -> None:
        for name, v in zip(Compactor.STATS, stats):
            self.r.assigner.totals[name] += int(v)

    def _dynamic(self, rows, step: bool) -> list[float]:
        """One iteration with exact, dynamic shapes (syncs allowed): the first, the redone ones, the final."""
        self._body(None, rows, step=step)
        return self.out.tolist()

    def _size_caps(self) -> None:
        """Capacities: ``CAP_FACTOR`` x the largest compaction seen, a power of two, at least ``MIN_CAP``, at most a
        block."""
        block = self.r.assigner.block
        self.caps = {k: min(block, _pow2_at_least(max(MIN_CAP, int(CAP_FACTOR * v)))) for k, v in self.counts.items()}

    def _save(self) -> None:
        for dst, src in zip(self.saved, self.state):
            dst.copy_(src)

    def _restore(self) -> None:
        for dst, src in zip(self.state, self.saved):
            dst.copy_(src)

    # ------------------------------------------------------------------ the graph
    def _capture(self, rows) -> None:
        """Capture one iteration (the state is left as it was), then run the next iteration both as a replay and
        uncaptured (undoing both) and keep the graph only if they agree."""
        self.graph = None
        if rows is not None:
            self.rows_buf = rows.clone()
        caps = dict(self.caps)

        def body():
            self._body(caps, self.rows_buf, step=True)

        self._save()
        stream = self.graphs.current_stream()
        try:
            self.graphs.warm_up(body)
            self._restore()
            graph = self.graphs.capture(body)
            self._restore()
            self.captures += 1
        except Exception as exc:  # noqa: BLE001 - any capture failure: run the same iteration uncaptured
            self.graphs.recover(stream)
            self._restore()
            cause = exc.__context__ or exc  # capture_end's error hides the op that broke the capture
            self.fallback = (f"CUDA graph capture failed ({type(cause).__name__}: "
                             f"{(str(cause).splitlines() or [''])[0][:200]})")
            self.mode = "static"
            return
        if not self._replay_matches(graph):
            self.mode = "static"
            return
        self.graph = graph

    def _replay_matches(self, graph) -> bool:
        """The next iteration as a replay and uncaptured, from the same state (both undone): equal up to rounding?
        (A capacity overflow in either makes the comparison unfair: the graph is kept and the sizes grow later.)"""
        graph.replay()
        replayed, out_g = self.r.theta.data.clone(), self.out.clone()
        self._restore()
        self._body(self.caps, self.rows_buf, step=True)
        ref, out_ref = self.r.theta.data.clone(), self.out.clone()
        self._restore()
        if out_g[1] > 0 or out_ref[1] > 0:
            return True
        diff = float((replayed - ref).abs().max()) / (float(ref.abs().max()) or 1.0)
        if diff <= REPLAY_TOLERANCE and bool(torch.isclose(out_g[0], out_ref[0], rtol=1e-9, atol=0.0)):
            return True
        self.fallback = (f"the CUDA graph's replay differed from the uncaptured iteration (max |d theta| {diff:.2e}"
                         f" of max |theta|): ran uncaptured")
        return False

    # ------------------------------------------------------------------ one iteration
    def _body(self, caps: dict | None, rows, *, step: bool) -> None:
        """One iteration (the eager loop's ``_pass``, ``_gradient`` and ``_step`` for the fused official
        objective) writing ``self.out``; ``caps`` None: dynamic shapes."""
        r = self.r
        th_norm, c64 = r._params()
        r.assigner.set_values(c64)
        shift, qc = r._official_repulsion(c64)
        fixed = Compactor(caps, self.counts, r.dev)
        loss, grad_c = r._gradient(*r._pass(rows, shift, fixed), c64, qc)
        if step:
            r._step(grad_c, c64, th_norm)
        self.out[0].copy_(loss)
        self.out[1].copy_(fixed.overflow)
        self.out[2:].copy_(fixed.stats)


class Compactor:
    """The row selections of one iteration for ``Assigner`` (its ``fixed`` argument).

    ``caps`` None (dynamic): all the rows of a mask, and the largest count per kind is kept in ``counts`` (to
    size the capacities). Else exactly ``caps[kind]`` rows, padded with row 0, and ``real`` marks the entries
    that are not padding: the callers leave the padding out of inner selections and write its results to a
    spare slot (``Assigner._put``). A count above the capacity adds to ``overflow``, the iteration's flag
    (a device scalar; ``_Run._pass`` sums it over the ranks); so do ``flag``-ged counts. ``count`` adds a
    statistic into ``stats`` (device scalars: no sync).
    """

    STATS = ("screen_rechecked", "screen_full")

    def __init__(self, caps: dict | None, counts: dict, device):
        self.caps, self.counts = caps, counts
        self.dynamic = caps is None
        self.overflow = torch.zeros((), dtype=torch.float64, device=device)
        self.stats = torch.zeros(len(self.STATS), dtype=torch.float64, device=device)

    def compact(self, mask: torch.Tensor, kind: str):
        """``(indices, real)``: the rows of ``mask`` and which entries are not padding (None: all are)."""
        if self.caps is None:
            idx = mask.nonzero().squeeze(1)
            self.counts[kind] = max(self.counts[kind], int(idx.numel()))
            return idx, None
        cap = min(self.caps[kind], int(mask.numel()))
        count = mask.sum()
        self.overflow += (count > cap).double()
        idx = torch.nonzero_static(mask, size=cap, fill_value=0).squeeze(1)  # ascending, then the padding
        return idx, torch.arange(cap, device=mask.device) < count

    def flag(self, n: torch.Tensor) -> None:
        self.overflow += n.double()

    def count(self, stat: str, n: torch.Tensor) -> None:
        self.stats[self.STATS.index(stat)] += n.double()
