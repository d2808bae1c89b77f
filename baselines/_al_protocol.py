"""The active-learning protocol shared by the five AL baselines: coreset, vaal, learnloss, tavaal, alfamix.

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

The task model (option ``task_model``) is retrained every round on every label bought so far:
- ``finetune`` (the paper profile, appendix B.3): the encoder's backbone (DINO DeiT-S), finetuned from its
  pretrained weights every round by the finetuning engine with the recipe ``task_recipe``
  (``baselines/_al_backbone.py``); its embedding is the backbone's pooled feature;
- ``head`` (the default; the cpu profile): the frozen encoder + an MLP head (``baselines/_al_head.py``).
VAAL trains no task model (its Options have no task_* / head_* fields), only its VAE + discriminator
(``baselines/_al_vae.py``).

The classes: C = max(meta["num_classes"], len(meta["classes"]), 1 + largest label bought so far).

Options shared by the five (``ProtocolOptions``): init_ratio, batch_ratio, init_size, batch_size, device (the
project's one rule: ``auto`` = the rank's local GPU, else the CPU), cpu_threads (0: leave the thread pools
alone; n: torch and the OpenMP/BLAS pools of numpy and scikit-learn use n threads during the selection,
restored after; 1 is the right value on a busy CPU box); the methods with a task model add its choice
(``task_model``, ``task_recipe``, ``task_epochs``, ``task_weights``, ``task_batch``) and the head_* recipe
(``LearnerOptions``: hidden, epochs, lr, optimizer, momentum, weight_decay, batch_size, lr_step; used by
``task_model: head``).

A method is an ``ActiveLearner`` (a ``Selector`` with ``label_free = False``) that implements
``query(state, k, ctx) -> rows`` for one round (and optionally ``prepare(store, seed) -> ctx`` once). The
``Selector`` base checks the options, the pool, the budget, the seed and the oracle, resolves the device,
and runs the whole protocol on rank 0 under a distributed launch (the AL methods need the whole pool in one
process; the other ranks receive the selection and never query the oracle).

After ``select``, ``learner.last_round_models`` holds the models the last round trained and selected with
(``head`` and ``ranker`` when trained through ``RoundState.train_head``; ``model`` - the finetuned classifier
- and ``ranker`` with ``task_model: finetune``; VAAL / TA-VAAL add ``vae`` and ``disc``), so a selection can be
checked against its models; only the last round's are kept (empty on the ranks that did not run the
protocol).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from baselines._al_backbone import BackboneContext, TaskModelOptions, round_recipe  # noqa: F401 (re-exported)
from baselines._al_head import HeadOptions, HeadRecipe, HeadTaskModel, RankerOptions, take_rows, train_head
from bench_suite.errors import BadInputError
from bench_suite.methods import Pool, Selector
from bench_suite.options import opt

log = logging.getLogger(__name__)


def _ratio(v) -> str | None:
    return None if 0 < v <= 1 else "in (0, 1]"


@dataclass
class ProtocolOptions:
    """The B.3 protocol's options (every AL method)."""

    init_ratio: float | None = opt(0.01, check=_ratio, role="protocol", doc="initial random set, fraction of the pool")
    batch_ratio: float | None = opt(None, check=_ratio, role="protocol",
                                    doc="batch per round, fraction of the pool (default: init_ratio)")
    init_size: int | None = opt(None, minimum=1, role="protocol",
                                doc="initial random set, samples (overrides init_ratio)")
    batch_size: int | None = opt(None, minimum=1, role="protocol", doc="batch per round, samples (overrides batch_ratio)")
    device: str = opt("auto", role="runtime", doc="auto (the rank's local GPU, else cpu) | cpu | cuda | cuda:N")
    cpu_threads: int = opt(0, minimum=0, role="runtime",
                           doc="threads of torch / OpenMP / BLAS during the selection (0 = as is)")

    def validate(self) -> str | None:
        if self.init_ratio is None and self.init_size is None:
            return "give init_ratio or init_size"
        return None


@dataclass
class LearnerOptions(HeadOptions, ProtocolOptions):
    """The protocol's options and the head's recipe (``head_*``); every AL method with a task model adds
    ``TaskModelOptions`` (``task_*``) as the FIRST base of its Options, so those fields come last (after the
    method's own, e.g. TA-VAAL's VAE sizes, in the reports' list of departures)."""


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
            self.old = torch.get_num_threads()
            self.pools = threadpool_limits(limits=self.n)  # scikit-learn's k-means, numpy's BLAS
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        # pools first: restoring OpenMP's limit also moves torch's (same libgomp), then torch's own value
        if self.pools is not None:
            self.pools.restore_original_limits()
        if self.old is not None:
            torch.set_num_threads(self.old)
        return False


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
        self.models: dict = {}  # the round's trained models (kept as the learner's last_round_models)

    def train_head(self, **kw):
        """Retrain the task model (fresh head) on every label bought so far, with the method's recipe."""
        t0 = time.perf_counter()
        head, net, stats = train_head(take_rows(self.store, self.labelled_rows), self.labels, self.num_classes,
                                      self.selector.head, seed=self.seed, device=self.device, **kw)
        self.info["train_seconds"] = round(time.perf_counter() - t0, 4)
        self.info.update(stats)
        self.models["head"] = head
        if net is not None:
            self.models["ranker"] = net
        return head, net

    def train_head_and_ranker(self, ranker: RankerOptions, ranking: str):
        """Retrain the head jointly with LearnLoss's loss prediction module (learnloss, tavaal)."""
        stop = int(round(float(ranker.stop_grad_frac) * self.selector.head.epochs))
        return self.train_head(loss_module=True, ranking=ranking, margin=float(ranker.margin),
                               weight=float(ranker.loss_weight), stop_grad_epoch=stop)

    def train_task_model(self, ranker: RankerOptions | None = None, ranking: str = "margin"):
        """Retrain the method's task model on every label bought so far (with ``ranker``: jointly with
        LearnLoss's loss prediction module); returns it as an object with ``outputs(rows, what=, lossnet=)``
        and ``fc`` (the classifier over the embedding): the finetuned backbone (``task_model: finetune``) or
        the head on the frozen features (``head``)."""
        backbone = self.selector.backbone_ctx
        if backbone is not None:
            return backbone.train(self, ranker, ranking)
        head, net = self.train_head() if ranker is None else self.train_head_and_ranker(ranker, ranking)
        return HeadTaskModel(head, net, self.store, self.device)

    def random_subset(self, size: int, k: int) -> np.ndarray:
        """A random subset of the unlabelled pool (LearnLoss / TA-VAAL); at least 10 x k when that is more."""
        eff = min(len(self.unlabelled_rows), max(int(size), 10 * k) if size > 0 else len(self.unlabelled_rows))
        if 0 < size < 10 * k and eff > size:
            log.info("%s: unlabelled subset raised from %d to %d (10 x the batch of %d)", self.selector.name, size, eff, k)
        self.info["subset_size"] = int(eff)
        if eff >= len(self.unlabelled_rows):
            return self.unlabelled_rows.copy()
        return np.sort(self.rng.choice(self.unlabelled_rows, size=eff, replace=False))


def fill_random(picks: np.ndarray, k: int, state: RoundState) -> tuple[np.ndarray, int]:
    """Top ``picks`` up to ``k`` with random unlabelled rows not already picked (without replacement)."""
    picks = np.asarray(picks, dtype=np.int64)
    missing = k - len(picks)
    if missing <= 0:
        return picks[:k], 0
    pool = np.setdiff1d(state.unlabelled_rows, picks)
    extra = state.rng.choice(pool, size=missing, replace=False)
    return np.concatenate([picks, extra.astype(np.int64)]), int(missing)


def ask_oracle(name: str, oracle, store, rows) -> np.ndarray:
    """The oracle's labels of ``rows`` (checked: one integer label >= 0 per id)."""
    ids = np.asarray(store.ids[rows], dtype=np.int64)
    y = np.asarray(oracle(ids))
    if y.shape != ids.shape:
        raise BadInputError(f"{name}: the oracle answered {y.shape} labels for {len(ids)} ids")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise BadInputError(f"{name}: the oracle returned non-integer labels")
    y = y.astype(np.int64)
    if (y < 0).any():
        bad = ids[y < 0][:5].tolist()
        raise BadInputError(f"{name}: the oracle has no label (got {int(y[y < 0][0])}) for ids {bad}; "
                            "the labels file must cover every pool sample")
    return y


def check_picks(name: str, picks, k: int, state: RoundState) -> None:
    """A round's picks: exactly ``k`` unique unlabelled rows of the pool (a method bug otherwise)."""
    if len(picks) != k or len(np.unique(picks)) != k:
        raise AssertionError(f"{name}: round {state.round} picked {len(picks)} rows "
                             f"({len(np.unique(picks))} unique), wanted {k}")
    taken = np.zeros(len(state.store), dtype=bool)
    taken[state.labelled_rows] = True
    if picks.min() < 0 or picks.max() >= len(state.store) or taken[picks].any():
        raise AssertionError(f"{name}: round {state.round} picked labelled or invalid rows")


class ActiveLearner(Selector):
    """Base class of the AL baselines: the B.3 protocol loop; subclasses implement ``query(state, k, ctx)``."""

    label_free = False
    shares_work_across_budgets = True  # a shorter run of the protocol is a prefix of a longer one (al_prefix)
    Options: ClassVar[type] = LearnerOptions

    def __init__(self, **options):
        super().__init__(**options)
        self.head = HeadRecipe.from_options(self.options) if isinstance(self.options, HeadOptions) else None
        self.last_round_models: dict = {}  # the last round's trained models (see the module docstring)
        self.backbone_ctx: BackboneContext | None = None  # task_model finetune: set per selection

    def config(self) -> dict:
        """The resolved options; with ``task_model: finetune`` also the round recipe's resolved settings (so a
        table cell's key changes when the catalogue entry does)."""
        cfg = super().config()
        if self.finetunes:
            cfg["task_recipe_settings"] = round_recipe(self.name, self.options)
        return cfg

    @property
    def finetunes(self) -> bool:
        """True when the task model is the backbone, finetuned every round (``task_model: finetune``)."""
        return getattr(self.options, "task_model", "head") == "finetune"

    @property
    def uses_head(self) -> bool:
        return self.head is not None

    # ----------------------------------------------------------------- what subclasses implement
    def prepare(self, store, seed) -> dict:
        """Once per selection, before the rounds (VAAL loads the images here); timed into the total."""
        return {}

    def query(self, state: RoundState, k: int, ctx: dict) -> np.ndarray:
        raise NotImplementedError

    # ----------------------------------------------------------------- sizes
    def initial_set(self, n: int) -> int:
        return self.sizes(n)[0]

    def sizes(self, n: int) -> tuple[int, int]:
        """(initial set, batch per round) for a pool of ``n``."""
        o = self.options
        init = int(o.init_size) if o.init_size is not None else max(1, int(round(float(o.init_ratio) * n)))
        if o.batch_size is not None:
            return init, int(o.batch_size)
        ratio = o.batch_ratio if o.batch_ratio is not None else (o.init_ratio if o.init_size is None else None)
        return init, (max(1, int(round(float(ratio) * n))) if ratio is not None else init)

    # ----------------------------------------------------------------- the loop
    def choose(self, pool: Pool):
        with cpu_threads(self.options.cpu_threads):
            return self._protocol(pool)

    def _protocol(self, pool: Pool):
        store, budget, seed, n = pool.store, pool.budget, pool.seed, pool.n
        init, batch = self.sizes(n)
        if budget < init:
            raise BadInputError(
                f"{self.name}: budget {budget} is smaller than the active-learning initial random set ({init} of "
                f"{n} samples); raise the budget or lower init_ratio / init_size")
        rng = np.random.default_rng(seed)
        round_seeds = np.random.SeedSequence(seed).generate_state(1 + (budget - init + batch - 1) // batch)
        labelled = rng.choice(n, size=init, replace=False).astype(np.int64)
        labels = ask_oracle(self.name, pool.oracle, store, labelled)
        self.last_round_models = {}
        t_prep = time.perf_counter()
        self.backbone_ctx = BackboneContext(self, store, pool.device) if self.finetunes else None
        ctx = self.prepare(store, seed)
        prepare_seconds = time.perf_counter() - t_prep
        rounds = []
        while len(labelled) < budget:
            k = min(batch, budget - len(labelled))
            picks, new_labels, record = self._round(pool, labelled, labels, len(rounds),
                                                    int(round_seeds[len(rounds)]), k, ctx)
            labelled = np.concatenate([labelled, picks])
            labels = np.concatenate([labels, new_labels])
            rounds.append(record)
            log.debug("%s round %d: %d labelled, %.2fs", self.name, record["round"], len(labelled), record["seconds"])
        info = self._info(pool, init, batch, rounds, prepare_seconds)
        self.backbone_ctx = None  # the encoder and the pool's images are not kept after the selection
        return labelled, info

    def _num_classes(self, store, labels) -> int:
        meta = store.meta or {}
        meta_c = max(int(meta.get("num_classes") or 0), len(meta.get("classes") or []))
        return max(meta_c, int(labels.max()) + 1)

    def _round(self, pool: Pool, labelled, labels, r: int, seed: int, k: int, ctx: dict):
        """One round: the method picks ``k`` unlabelled rows, their labels are bought; (picks, labels, record)."""
        num_classes = self._num_classes(pool.store, labels)
        state = RoundState(self, pool.store, labelled, labels, num_classes, r, seed, pool.device)
        t0 = time.perf_counter()
        picks = np.asarray(self.query(state, k, ctx), dtype=np.int64)
        check_picks(self.name, picks, k, state)
        self.last_round_models = state.models
        state.info["select_seconds"] = round(time.perf_counter() - t0 - state.info.get("train_seconds", 0), 4)
        new_labels = ask_oracle(self.name, pool.oracle, pool.store, picks)
        record = {"round": r, "labelled_before": int(len(labelled)), "picked": int(k),
                  "oracle_queries_so_far": int(len(labelled) + k), "num_classes": num_classes,
                  "seconds": round(time.perf_counter() - t0, 4), **state.info}
        return picks, new_labels, record

    def task_model_description(self) -> str:
        if not self.uses_head:
            return "none (selection by VAE + discriminator)"
        if self.finetunes:
            return (f"the encoder's backbone finetuned from its pretrained weights every round (recipe "
                    f"{self.options.task_recipe!r})")
        return "frozen encoder features + MLP head"

    def _info(self, pool: Pool, init: int, batch: int, rounds: list, prepare_seconds: float) -> dict:
        extra = {}
        if self.backbone_ctx is not None:
            extra["task_model_setup"] = self.backbone_ctx.describe()
        return {
            "protocol": "ActiveFT appendix B.3: random initial set, then rounds of retrain -> select a batch",
            "task_model": self.task_model_description(), **extra,
            "train_seconds_total": round(sum(float(x.get("train_seconds", 0.0)) for x in rounds), 4),
            "device": str(pool.device),
            "init_size": int(init), "batch_size": int(batch), "n_rounds": len(rounds),
            "labelled_sizes": [int(init)] + [int(x["labelled_before"] + x["picked"]) for x in rounds],
            "oracle_queries": int(init + sum(x["picked"] for x in rounds)), "rounds": rounds,
            "prepare_seconds": round(prepare_seconds, 4),
            "seconds_note": "wall time of the whole protocol: image loading, every retraining and every query",
        }
