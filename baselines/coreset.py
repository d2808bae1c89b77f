"""CoreSet (Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set Approach",
ICLR 2018), transplanted with the ActiveFT paper's batch protocol (appendix B.3; see baselines/_al_protocol.py).

Each round: retrain the task model on all labels bought so far, embed the whole pool with it (its
penultimate layer), then pick the batch by k-center greedy (the paper's Algorithm 1): repeatedly take the
unlabelled sample farthest (Euclidean) from its nearest labelled-or-picked sample, and make it a centre.

The task model (``task_model``):
- paper profile, ``finetune`` (appendix B.3): DINO DeiT-S finetuned from its pretrained weights every round
  by the finetuning engine (recipe ``task_recipe``, al_deit_round: B.2's recipe, 1000 epochs per round;
  baselines/_al_backbone.py); the embedding is the backbone's pooled feature (the CLS token, 384-d), the
  layer before its linear classifier;
- cpu profile, ``head`` (the default): the frozen encoder + an MLP head (baselines/_al_head.py: Adam, lr
  1e-2, 100 epochs, one hidden layer of 256); the embedding is the head's last hidden layer.

Hyper-parameters: Euclidean distance in the task model's embedding as in the paper; sizes from the protocol.

Implementation: the N-vector of distances to the nearest centre is initialised in blocks (rows x centres,
``block`` rows at a time), then updated in O(N) per pick with ||a||^2 + ||b||^2 - 2ab - memory O(N) besides
the N x 256 embedding. ``info["rounds"][r]["radius"]`` is the greedy radius before each pick (the distance
of the picked sample to its nearest centre = the current covering radius); it never increases.

Departures from the original, and why:
- Only the greedy 2-approximation, not the robust mixed-integer refinement of Sec. 4.2 (needs a MIP solver
  and hours per round; the greedy version is what the public re-implementations - and, as far as the
  ActiveFT paper says, its transplant - use).
- The task model is the pretrained DeiT-S finetuned (paper profile), not a CNN trained from scratch (the
  ActiveFT paper's transplant); on the cpu profile it is the frozen encoder + a retrained head.
- The whole pool is the candidate set (Sener & Savarese use the whole pool too; some re-implementations use
  a random 10k subset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baselines._al_protocol import ActiveLearner, LearnerOptions, TaskModelOptions
from bench_suite.errors import BadInputError
from bench_suite.methods import register
from bench_suite.options import opt


def kcenter_greedy(emb, centre_rows, k: int, *, device="cpu", block: int = 65536):
    """k-center greedy picks from the rows of ``emb`` (N x h) given existing centres; returns (picks, radii).

    ``radii[t]`` is max over the pool of the distance to the nearest centre, just before pick t (the
    picked row attains it). Radii are non-increasing by construction (distances only ever shrink).
    """
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(emb, dtype=np.float32), device=device)
    n = x.shape[0]
    if k > n - len(centre_rows):
        raise BadInputError(f"k-center greedy: cannot pick {k} of {n - len(centre_rows)} free rows")
    sq = (x * x).sum(1)
    mind = torch.full((n,), float("inf"), device=device)
    centres = torch.as_tensor(np.asarray(centre_rows, dtype=np.int64), device=device)
    cblock = max(1, min(4096, (1 << 24) // max(1, block)))  # rows x centres <= 16M floats
    for cs in range(0, len(centres), cblock):
        c = centres[cs:cs + cblock]
        xc, sqc = x[c], sq[c]
        for rs in range(0, n, block):
            d2 = sq[rs:rs + block, None] + sqc[None, :] - 2.0 * (x[rs:rs + block] @ xc.T)
            mind[rs:rs + block] = torch.minimum(mind[rs:rs + block], d2.clamp_min_(0).min(1).values)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    taken[centres] = True
    mind = mind.clamp_min(0).sqrt()
    mind[taken] = -1.0  # never picked again
    picks, radii = [], []
    for _ in range(k):
        i = int(torch.argmax(mind))
        radii.append(float(mind[i]))
        picks.append(i)
        d = (sq + sq[i] - 2.0 * (x @ x[i])).clamp_min(0).sqrt()
        mind = torch.minimum(mind, d)
        mind[i] = -1.0
    return np.asarray(picks, dtype=np.int64), radii


@register
class CoreSet(ActiveLearner):
    name = "coreset"
    label = "CoreSet"
    description = "CoreSet (Sener & Savarese 2018): k-center greedy in the task model's embedding, B.3 batch protocol"

    @dataclass
    class Options(TaskModelOptions, LearnerOptions):
        block: int = opt(65536, minimum=1, role="runtime", doc="rows per block in the distance passes")

    def query(self, state, k, ctx):
        model = state.train_task_model()
        emb = model.outputs(what=("embed",))["embed"]
        picks, radii = kcenter_greedy(emb, state.labelled_rows, k, device=state.device, block=int(self.options.block))
        state.info["radius"] = [round(r, 6) for r in radii]  # greedy radius before each pick
        return picks
