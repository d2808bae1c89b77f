"""TA-VAAL (Kim, Song, Kim, Park & Hwang, "Task-Aware Variational Adversarial Active Learning", CVPR 2021),
transplanted with the ActiveFT paper's batch protocol (appendix B.3; see baselines/_al_protocol.py).

Each round:
1. the task model is trained jointly with a LearnLoss ranker (loss prediction module on its intermediate
   features; see baselines/learnloss.py, baselines/_al_head.py) on all labels bought so far;
2. a random subset of the unlabelled pool is drawn (10000, as SUBSET in the original code);
3. a fresh VAAL VAE + discriminator (baselines/vaal.py, baselines/_al_vae.py) are trained on labelled + subset
   images, where the ranker's predicted loss r of each image is fed in as in the original code: the decoder gets
   [z, sigmoid(r)] (the latent is conditioned on the rank) and the discriminator gets [mu, r]; in the
   first iteration r is uniform noise, as in the original;
4. the batch = the subset samples the discriminator scores lowest (most surely unlabelled) given [mu, r].

Hyper-parameters of the original code (cubeyoung/TA-VAAL: config.py, selection_methods.py, train_test.py):
ranker = LearnLoss module, margin 1, weight 1, ranker gradient stopped after 60% of the epochs (120/200);
ranking loss = the released code's BCE(sigmoid(p_i - p_j), [l_i > l_j]) (``ranking_loss="bce"``; "margin" =
the LearnLoss paper's hinge, as the TA-VAAL paper writes it); VAE latent 32, widths 128..1024, Adam 5e-4
for VAE and discriminator, batch 128, beta 1, adversary weight 1, ONE VAE step and one discriminator step
per iteration, KL averaged (torch.mean, unlike VAAL's sum), iterations = (labelled + subset) * 100 epochs
// batch (EPOCHV = 100). The paper profile runs them (width 128, 100 epochs); the cpu profile sets ``vae_epochs`` 1
/ ``vae_width`` 8 (as for vaal) and says so.

What is simplified / departs from the original, and why:
- Task model (``task_model``): in the paper profile the pretrained DINO DeiT-S finetuned every round with the
  ranker, as for learnloss (baselines/_al_backbone.py; the ActiveFT paper says only that VAAL and TA-VAAL
  select with their original light VAE - the VAE here is the original's size - and not which task model
  TA-VAAL's ranker lived on; the original's is a ResNet-18 trained from scratch, and in this transplant the
  task model of the other methods is DeiT-S); on the cpu profile the frozen encoder + an MLP head, whose
  input and hidden layers the ranker taps. The ranker's outputs are computed once per round for the
  labelled and subset samples (the task model and ranker are frozen while the VAE trains - the original
  recomputes them per batch in eval mode, which gives the same numbers).
- Images are 32x32 from the shard folder (as vaal); mini-batches are shuffled (the original reads labelled
  and subset in a fixed order).
- Scoring runs the VAE in eval mode (BatchNorm running statistics), as in vaal.py.
- The subset is raised to at least 10 x batch (as learnloss.py), so large batches do not make it random.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from baselines._al_head import RankerOptions, forked_rng
from baselines._al_images import load_pool_images, to_unit_range
from baselines._al_protocol import ActiveLearner, LearnerOptions, TaskModelOptions
from baselines._al_vae import Batch, VAEOptions, adversarial_training, build_models, endless, score
from bench_suite.methods import register
from bench_suite.options import opt


def ranker_outputs(state, model, subset) -> tuple[np.ndarray, dict]:
    """The ranker's raw predicted loss of every labelled and subset row (frozen while the VAE trains):
    (the subset's, as an array; row -> r for all of them). ``model``: the round's task model."""
    r_lab = model.outputs(state.labelled_rows, what=(), lossnet=True)["pred_loss"]
    r_sub = model.outputs(subset, what=(), lossnet=True)["pred_loss"]
    r_of = {}
    r_of.update(zip(state.labelled_rows.tolist(), r_lab.tolist()))
    r_of.update(zip(subset.tolist(), r_sub.tolist()))
    return r_sub, r_of


def rank_conditioned_draws(images, lab, unl, r_of: dict, gen: torch.Generator, device):
    """TA-VAAL's mini-batches: images with the rank r (into the discriminator) and sigmoid(r) (into the
    decoder); in the first draw r is uniform noise, as in the original."""

    def rank(rows):
        return torch.tensor([r_of[i] for i in rows.tolist()], dtype=torch.float32, device=device).view(-1, 1)

    def draw(first):
        rl_rows, ru_rows = next(lab), next(unl)
        xl, xu = to_unit_range(images[rl_rows], device), to_unit_range(images[ru_rows], device)
        if first:  # the original feeds uniform noise as the rank in its first iteration
            rl = torch.rand(len(rl_rows), 1, generator=gen).to(device)
            ru = torch.rand(len(ru_rows), 1, generator=gen).to(device)
            return Batch(xl, xu, rl, ru, rl, ru)
        rl, ru = rank(rl_rows), rank(ru_rows)
        return Batch(xl, xu, torch.sigmoid(rl), torch.sigmoid(ru), rl, ru)

    return draw


@register
class TAVAAL(ActiveLearner):
    name = "tavaal"
    label = "TA-VAAL"
    version = 2  # 2: channels-last VAE on the CPU (float rounding: other picks)
    description = "TA-VAAL (Kim et al. 2021): VAAL conditioned on a LearnLoss ranker's predicted loss, B.3 batch protocol"
    quick_options = {"vae_width": 8, "vae_iters": 6, "vae_batch_size": 64}  # contract tests only

    @dataclass
    class Options(TaskModelOptions, RankerOptions, VAEOptions, LearnerOptions):
        num_vae_steps: int = opt(1, minimum=1)  # TA-VAAL: one VAE step per iteration (VAAL: 2)
        kl: str = opt("mean", choices=("mean", "sum"))
        ranking_loss: str = opt("bce", choices=("bce", "margin"))

    def prepare(self, store, seed):
        return {"images": load_pool_images(store, int(self.options.image_size), self.name)}

    def query(self, state, k, ctx):
        o, images, dev = self.options, ctx["images"], state.device
        model = state.train_task_model(o, o.ranking_loss)
        t_train = state.info["train_seconds"]
        subset = state.random_subset(int(o.subset_size), k)
        r_sub, r_of = ranker_outputs(state, model, subset)
        bs = int(o.vae_batch_size)
        iters = int(o.vae_iters) or max(1, int((len(state.labelled_rows) + len(subset)) * float(o.vae_epochs)) // bs)
        t0 = time.perf_counter()
        with forked_rng(state.seed, dev):
            vae, disc = build_models(o, dev, cond_dim=1)
            gen = torch.Generator().manual_seed(state.seed + 7)
            lab = endless(state.labelled_rows, bs, gen, drop_last=False)
            unl = endless(subset, bs, gen, drop_last=False)
            draw = rank_conditioned_draws(images, lab, unl, r_of, gen, dev)
            state.info.update(adversarial_training(vae, disc, draw, iters, o, kl=o.kl, disc_full_forward=False))
        state.info["train_seconds"] = round(t_train + time.perf_counter() - t0, 4)
        state.models.update(vae=vae, disc=disc)
        r_sub_t = torch.as_tensor(r_sub, dtype=torch.float32, device=dev).view(-1, 1)
        scores_u = score(vae, disc, images, subset, dev, int(o.score_batch), r=r_sub_t)
        order = np.argsort(scores_u, kind="stable")[:k]
        state.info.update(disc_mean_subset=round(float(scores_u.mean()), 5),
                          disc_mean_picked=round(float(scores_u[order].mean()), 5),
                          pred_loss_picked_mean=round(float(r_sub[order].mean()), 5),
                          pred_loss_subset_mean=round(float(r_sub.mean()), 5))
        return subset[order]
