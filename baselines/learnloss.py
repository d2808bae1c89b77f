"""LearnLoss (Yoo & Kweon, "Learning Loss for Active Learning", CVPR 2019), transplanted with the ActiveFT
paper's batch protocol (appendix B.3; see baselines/_al_protocol.py).

Each round: train the task model jointly with a loss prediction module on all labels bought so far, draw a
random subset of the unlabelled pool, predict every subset sample's loss, and buy the labels of the
``batch`` samples with the highest predicted loss.

The loss prediction module (as in the paper, Fig. 2, and the widely used reference code): one branch per
intermediate feature map - global average pooling, FC to 128, ReLU - concatenated and mapped by FC to one
scalar. The taps are the task model's intermediate features:
- paper profile (``task_model: finetune``, appendix B.3): DINO DeiT-S finetuned from its pretrained weights
  every round by the finetuning engine (recipe ``task_recipe``: al_deit_round, B.2's recipe, 1000 epochs
  per round), jointly with the module in the same training loop; the taps are four evenly spaced blocks
  (after blocks 3, 6, 9, 12, as the original taps ResNet's four stages), each averaged over its tokens
  (baselines/_al_backbone.py);
- cpu profile (``task_model: head``, the default): the frozen encoder's feature vector (the head's input)
  and each hidden layer of an MLP head (GAP is the identity on vectors; baselines/_al_head.py).

Hyper-parameters (the paper / reference code): margin xi = 1, loss weight lambda = 1, the pairwise
"split batch" ranking loss (a batch of 2B is split into B pairs (i, 2B-1-i); loss
max(0, -sign(l_i - l_j)(p_i - p_j) + xi), mean over pairs); the module is trained with the same optimiser
recipe as the task model; after 60% of the epochs (the original: epoch 120 of 200) the gradient from the
module into the target model is stopped; the unlabelled subset is 10000 samples (SUBSET of the reference
code); selection = top predicted loss in the subset.

Departures from the original, and why:
- Task model = the pretrained DeiT-S finetuned (paper profile) instead of a ResNet-18 trained from scratch
  (the ActiveFT paper's transplant); with one optimiser (the recipe's) for the model and the module, whose
  step sees mean CE + weight x the batch's ranking loss (the original: two SGD optimisers with the same
  settings, so the same update). cpu profile: frozen encoder + MLP head; the taps are the head's input and
  hidden layers, so "stop gradient" stops the module shaping the head only.
- The task model is retrained from its starting point (the pretrained backbone / a fresh head) every round
  (as the ActiveFT protocol and TA-VAAL's code do; the LearnLoss reference code keeps training the same
  network across cycles).
- When a batch is large, the subset is raised to at least 10 x batch (the reference code's
  SUBSET / ADDENDUM ratio): e.g. ImageNet's 2.5% batches (32k) exceed 10000, and a subset no larger than the
  batch would make the method random.
- An odd mini-batch drops its last sample from the ranking loss (the reference code asserts even batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from baselines._al_head import RankerOptions
from baselines._al_protocol import ActiveLearner, LearnerOptions, TaskModelOptions
from bench_suite.methods import register


@register
class LearnLoss(ActiveLearner):
    name = "learnloss"
    label = "LearnLoss"
    description = "LearnLoss (Yoo & Kweon 2019): highest predicted loss in a random unlabelled subset, B.3 batch protocol"

    @dataclass
    class Options(TaskModelOptions, RankerOptions, LearnerOptions):
        """The protocol's and the head's options, and the loss prediction module's (baselines/_al_head.py)."""

    def query(self, state, k, ctx):
        o = self.options
        model = state.train_task_model(o, "margin")
        subset = state.random_subset(int(o.subset_size), k)
        pred = model.outputs(subset, what=(), lossnet=True)["pred_loss"]
        order = np.argsort(-pred, kind="stable")[:k]
        state.info["pred_loss_picked_mean"] = round(float(pred[order].mean()), 5)
        state.info["pred_loss_subset_mean"] = round(float(pred.mean()), 5)
        return subset[order]
