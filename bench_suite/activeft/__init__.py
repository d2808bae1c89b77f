"""ActiveFT (Xie et al., CVPR 2023) as the ``activeft`` selector: exact, pruned, distributed.

Two objectives (equations and gradients in ``bench_suite.activeft.objectives``):

* ``official`` (default; the loss of the authors' released code, which produced the paper's numbers)::

      L = mean_i softplus(log(lambda R_p(i)) - a_i),  a_i = <f_i, c_p(i)>/tau,
      R_j = sum_k exp(<sg(c_k), c_j>/tau)  (all k, incl. j; sg = stop-gradient),  c = theta/|theta|

* ``paper`` (Eq. 11, Algorithm 1)::

      L = -mean_i max_j <f_i, theta_j>/tau + lambda mean_j log sum_{k != j} exp(<theta_j, theta_k>/tau),
      theta renormalised after every step

Options (keyword arguments of ``ActiveFT``, ``--set key=value`` on the CLI; the typed dataclass
``options.Options``, checked by ``bench_suite.options.coerce``): ``objective``, ``regularizer`` (ours |
none = S1 | infonce = S2, Table 5b), ``temperature`` (0.07), ``iters`` (300), ``lr`` (1e-3, Adam), ``init``
(random | fps), ``update_assign`` (False = Table 5a "No-Update"; alias ``no_update=true``), ``balance``
(lambda, 1), ``scheduler`` (none | cosine), ``subset`` (M samples per iteration, Sec. 3.5; 0 = all),
``prune``/``candidates`` (the exact pruning, K=16), ``screen``, ``loop`` (auto: on a GPU with one process, the
fixed-shape iteration replayed as a CUDA graph, ``static_loop``), ``block_size``, ``snap_candidates``, ``bb_dtype``,
``device`` (auto = the rank's local GPU, else cpu: the project's one rule, ``runtime.resolve_device``),
``threads``, ``progress``, ``verify`` (debug: check every pruned assignment against the full computation).
Old names still accepted: ``tau``, ``T``, ``max_iter``, ``M``, ``K``, ``lambda_``.

How it is fast and exact: the nearest-parameter search (N x B x d per iteration in the released code) is
either the full product in blocks (top-2 per row, float64 re-check of close calls) or, on a CPU from
B = 512 (``prune=None``, auto; ``optimize.resolve_prune``), pruned with certified bounds (``assign``:
assignments provably equal to the full argmax); gradients are closed-form B x d sums (one sorted sparse
product per block, ``groupsum``), no autograd over N x B; memory O((N + B) d + block x B). Distributed
(``ActiveFT.distributed``: every rank runs on its own shard of the pool; ``optimize``): one O(B d)
all_reduce per iteration, B x B repulsion on every rank, float64 sums, so 1 and W ranks select the same
ids. Initialisation (``init``: random rows, or farthest-point in float32 with float64 re-evaluation of close
calls) and snapping (``snap``: each parameter, in index order, takes its most similar real sample not
already taken - always B unique ids) are exact across ranks the same way.

Input rows must be L2-normalised; each rank checks its rows with the store's one row check
(``store.check_rows``): rows off by more than ``store.NORM_TOL`` are normalised with a warning, NaN/Inf and
zero rows are errors (the same error on every rank). ``reference.reference_select`` is the naive
released-code-style reference used by the tests and ``python -m bench_suite.bench.selector``.
Importing this package registers the selector.
"""

from bench_suite.activeft.objectives import OBJECTIVES, REGULARIZERS
from bench_suite.activeft.optimize import optimize
from bench_suite.activeft.options import Options
from bench_suite.activeft.reference import reference_select
from bench_suite.activeft.selector import ActiveFT

__all__ = ["ActiveFT", "OBJECTIVES", "Options", "REGULARIZERS", "optimize", "reference_select"]
