"""The options of ActiveFT: one typed dataclass (checked by ``bench_suite.options.coerce``) and the old names.

``ActiveFT(**options)`` coerces and checks them (``ActiveFT(...).options`` is an ``Options``); the loop
(``optimize``) reads them. The defaults are the paper's (Sec. 4.1) and the released code's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench_suite.activeft.init import INITS
from bench_suite.activeft.objectives import OBJECTIVES, REGULARIZERS
from bench_suite.options import coerce, opt


def _positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "a positive number"


@dataclass
class Options:
    objective: str = opt("official", choices=OBJECTIVES,
                         doc="official: the released code's loss (the paper's numbers) | paper: Eq. 11")
    regularizer: str = opt("ours", choices=REGULARIZERS, doc="ours | none (S1) | infonce (S2), Table 5b")
    temperature: float = opt(0.07, check=_positive, doc="tau")
    iters: int = opt(300, minimum=0, doc="T, optimisation steps (0: the initial rows are the selection)")
    lr: float = opt(1e-3, check=_positive, doc="Adam learning rate")
    init: str = opt("random", choices=INITS, doc="initial parameters: random rows | farthest-point")
    update_assign: bool = opt(True, doc="False: nearest parameters frozen at init (Table 5a No-Update)")
    balance: float = opt(1.0, check=_positive,
                         doc="lambda: weight of the repulsion (paper) / of R in the log-ratio (official)")
    scheduler: str = opt("none", choices=("none", "cosine"), doc="learning-rate schedule (the released --scheduler)")
    subset: int = opt(0, role="protocol", minimum=0, doc="M random samples per iteration, Sec. 3.5 (0: the whole pool)")
    prune: bool | None = opt(None, role="runtime",
                             doc="certified candidate pruning of the nearest-parameter search (None: auto, "
                                 "on a CPU when B >= 512, where it beats the full product; off on a GPU)")
    screen: str = opt("auto", role="runtime", choices=("auto", "fp32", "tf32", "bf16"),
                      doc="precision of the full pass's screening product (auto: bf16 on a GPU, fp32 on a CPU); "
                          "rows it cannot decide (top-2 margin within its rounding bound) are decided exactly among "
                          "their 8 best, or by the float32 pass, so the assignments are the same")
    top2_kernel: str = opt("auto", role="runtime", choices=("auto", "on", "off"),
                           doc="the screened pass's product and top-2 in one Triton kernel, nothing of size N x B "
                               "written (auto: on a GPU with screen bf16 or tf32, after a self-check on the pool's "
                               "rows); the same assignments")
    loop: str = opt("auto", role="runtime", choices=("auto", "eager", "static", "graph"),
                    doc="the iteration loop: eager | static (fixed shapes, no host sync inside an iteration) | graph "
                        "(static, replayed from one CUDA graph) | auto (graph on a GPU with one process for the "
                        "default objective, else eager); the same assignments")
    candidates: int = opt(16, role="runtime", minimum=1, doc="K: candidates kept per sample by the pruning")
    block_size: int = opt(0, role="runtime", minimum=0,
                          doc="rows per block (0: auto, block x B float32 near 256 MiB)")
    snap_candidates: int = opt(8, role="runtime", minimum=1,
                               doc="per-parameter candidates kept by the distributed snapping")
    bb_dtype: str = opt("auto", role="runtime", choices=("auto", "float32", "float64"),
                        doc="dtype of the B x B repulsion (auto: float64 if B <= 512)")
    device: str = opt("auto", role="runtime", doc="auto (the rank's local GPU, else cpu) | cpu | cuda | cuda:N")
    threads: int = opt(0, role="runtime", minimum=0,
                       doc="torch CPU threads during the selection (0: leave torch's setting)")
    progress: bool | None = opt(None, role="runtime",
                                doc="rich progress bar on rank 0 (None: when stderr is a terminal)")
    verify: bool = opt(False, role="runtime", doc="debug: check every pruned assignment against the full computation")


# old option names -> new (the released code's and the paper's symbols)
ALIASES = {"tau": "temperature", "T": "iters", "max_iter": "iters", "M": "subset", "K": "candidates",
           "lambda_": "balance"}


@dataclass
class _NoUpdate:
    no_update: bool = False


def fold_no_update(given: dict, where: str) -> dict:
    """``no_update=true`` (Table 5a's name) is ``update_assign=false``; as for every alias, the new name wins."""
    given = dict(given)
    if "no_update" in given:
        flag = coerce(_NoUpdate, {"no_update": given.pop("no_update")}, where).no_update
        given.setdefault("update_assign", not flag)
    return given
