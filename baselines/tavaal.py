"""TA-VAAL (Kim, Song, Kim, Park & Hwang, "Task-Aware Variational Adversarial Active Learning", CVPR 2021),
transplanted with the ActiveFT paper's batch protocol (appendix B.3; see baselines/_al_common.py).

Each round:
1. the task model is trained jointly with a LearnLoss ranker (loss prediction module on its intermediate
   features; see baselines/learnloss.py) on all labels bought so far;
2. a random subset of the unlabelled pool is drawn (10000, as SUBSET in the original code);
3. a fresh VAAL VAE + discriminator (baselines/vaal.py) are trained on labelled + subset images, where the
   ranker's predicted loss r of each image is fed in as in the original code: the decoder gets
   [z, sigmoid(r)] (the latent is conditioned on the rank) and the discriminator gets [mu, r]; in the
   first iteration r is uniform noise, as in the original;
4. the batch = the subset samples the discriminator scores lowest (most surely unlabelled) given [mu, r].

Hyper-parameters of the original code (cubeyoung/TA-VAAL: config.py, selection_methods.py, train_test.py):
ranker = LearnLoss module, margin 1, weight 1, ranker gradient stopped after 60% of the epochs (120/200);
ranking loss = the released code's BCE(sigmoid(p_i - p_j), [l_i > l_j]) (``ranking_loss="bce"``; "margin" =
the LearnLoss paper's hinge, as the TA-VAAL paper writes it); VAE latent 32, widths 128..1024, Adam 5e-4
for VAE and discriminator, batch 128, beta 1, adversary weight 1, ONE VAE step and one discriminator step
per iteration, KL averaged (torch.mean, unlike VAAL's sum), iterations = (labelled + subset) * 100 epochs
// batch. On the cpu profile set ``vae_epochs`` / ``vae_width`` lower (as for vaal) and say so.

What is simplified / departs from the original, and why:
- Task model = frozen encoder + MLP head (cpu profile) instead of ResNet-18; the ranker taps the head's input
  and hidden layers. The ranker's outputs are computed once per round for the labelled and subset samples
  (the task model and ranker are frozen while the VAE trains - the original recomputes them per batch in
  eval mode, which gives the same numbers).
- Images are 32x32 from the shard folder (as vaal); mini-batches are shuffled (the original reads labelled
  and subset in a fixed order).
- Scoring runs the VAE in eval mode (BatchNorm running statistics), as in vaal.py.
- The subset is raised to at least 10 x batch (as learnloss.py), so large batches do not make it random.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from baselines._al_common import ActiveLearner, _Forked, head_outputs, load_pool_images, to_unit_range
from baselines.learnloss import check_ll_options, train_with_lossnet
from bench_suite.methods.registry import register
from baselines.vaal import VAAL_DEFAULTS, VAE, Discriminator, check_vaal_options, endless, score, vae_loss
from bench_suite.errors import BadInputError


@register
class TAVAAL(ActiveLearner):
    name = "tavaal"
    label = "TA-VAAL"
    description = "TA-VAAL (Kim et al. 2021): VAAL conditioned on a LearnLoss ranker's predicted loss, B.3 batch protocol"
    method_defaults = {**VAAL_DEFAULTS, "num_vae_steps": 1, "kl": "mean",
                       "subset_size": 10000, "margin": 1.0, "loss_weight": 1.0, "stop_grad_frac": 0.6,
                       "ranking_loss": "bce"}

    def check_options(self):
        check_vaal_options(self.name, self.opts)
        check_ll_options(self.name, self.opts)
        if self.opts["ranking_loss"] not in ("bce", "margin"):
            raise BadInputError(f"tavaal: ranking_loss must be 'bce' or 'margin', got {self.opts['ranking_loss']!r}")
        if self.opts["kl"] not in ("mean", "sum"):
            raise BadInputError(f"tavaal: kl must be 'mean' or 'sum', got {self.opts['kl']!r}")

    def prepare(self, store, seed):
        return {"images": load_pool_images(store, int(self.opts["image_size"]), self.name)}

    def query(self, state, k, ctx):
        o = self.opts
        images, dev = ctx["images"], state.device
        head, net = train_with_lossnet(state, o, o["ranking_loss"])
        t_train = state.info["train_seconds"]
        subset = state.random_subset(int(o["subset_size"]), k)
        lab_rows = state.labelled_rows
        # the ranker's raw predicted loss for every labelled and subset row (frozen during VAE training)
        r_lab = head_outputs(head, state.store, lab_rows, device=dev, what=(), lossnet=net)["pred_loss"]
        r_sub = head_outputs(head, state.store, subset, device=dev, what=(), lossnet=net)["pred_loss"]
        r_of = {}
        r_of.update(zip(lab_rows.tolist(), r_lab.tolist()))
        r_of.update(zip(subset.tolist(), r_sub.tolist()))

        def rank(rows):
            return torch.tensor([r_of[i] for i in rows.tolist()], dtype=torch.float32, device=dev).view(-1, 1)

        bs = int(o["vae_batch_size"])
        iters = int(o["vae_iters"]) or max(1, int((len(lab_rows) + len(subset)) * float(o["vae_epochs"])) // bs)
        t0 = time.perf_counter()
        z_dim = int(o["latent_dim"])
        with _Forked(state.seed, dev):
            vae = VAE(z_dim, 3, int(o["vae_width"]), cond_dim=1).to(dev)
            disc = Discriminator(z_dim, cond_dim=1).to(dev)
            opt_v = torch.optim.Adam(vae.parameters(), lr=float(o["vae_lr"]))
            opt_d = torch.optim.Adam(disc.parameters(), lr=float(o["disc_lr"]))
            gen = torch.Generator().manual_seed(state.seed + 7)
            lab = endless(lab_rows, bs, gen, drop_last=False)
            unl = endless(subset, bs, gen, drop_last=False)
            beta, adv = float(o["beta"]), float(o["adversary_param"])
            vae.train(); disc.train()

            def draw(first):
                rl_rows, ru_rows = next(lab), next(unl)
                xl, xu = to_unit_range(images[rl_rows], dev), to_unit_range(images[ru_rows], dev)
                if first:  # the original feeds uniform noise as the rank in its first iteration
                    rl = torch.rand(len(rl_rows), 1, generator=gen).to(dev)
                    ru = torch.rand(len(ru_rows), 1, generator=gen).to(dev)
                    return xl, xu, rl, ru, rl, ru
                rl, ru = rank(rl_rows), rank(ru_rows)
                return xl, xu, rl, ru, torch.sigmoid(rl), torch.sigmoid(ru)

            for it in range(iters):
                xl, xu, rl, ru, rls, rus = draw(it == 0)
                for count in range(int(o["num_vae_steps"])):
                    recon, _, mu, logvar = vae(xl, rls)
                    unsup = vae_loss(xl, recon, mu, logvar, beta, o["kl"])
                    urecon, _, umu, ulogvar = vae(xu, rus)
                    trans = vae_loss(xu, urecon, umu, ulogvar, beta, o["kl"])
                    pl, pu = disc(mu, rl), disc(umu, ru)
                    dsc = F.binary_cross_entropy(pl, torch.ones_like(pl)) + F.binary_cross_entropy(pu, torch.ones_like(pu))
                    total = unsup + trans + adv * dsc
                    opt_v.zero_grad(set_to_none=True)
                    total.backward()
                    opt_v.step()
                    if count < int(o["num_vae_steps"]) - 1:
                        xl, xu, rl, ru, rls, rus = draw(False)
                for count in range(int(o["num_adv_steps"])):
                    with torch.no_grad():
                        mu, _ = vae.encode(xl)
                        umu, _ = vae.encode(xu)
                    pl, pu = disc(mu, rl), disc(umu, ru)
                    dloss = F.binary_cross_entropy(pl, torch.ones_like(pl)) + F.binary_cross_entropy(pu, torch.zeros_like(pu))
                    opt_d.zero_grad(set_to_none=True)
                    dloss.backward()
                    opt_d.step()
                    if count < int(o["num_adv_steps"]) - 1:
                        xl, xu, rl, ru, rls, rus = draw(False)
            state.info.update(vae_iters=iters, vae_loss=round(float(total.detach()), 5),
                              disc_loss=round(float(dloss.detach()), 5))
        state.info["train_seconds"] = round(t_train + time.perf_counter() - t0, 4)
        r_sub_t = torch.as_tensor(r_sub, dtype=torch.float32, device=dev).view(-1, 1)
        scores_u = score(vae, disc, images, subset, dev, int(o["score_batch"]), r=r_sub_t)
        order = np.argsort(scores_u, kind="stable")[:k]
        state.info.update(disc_mean_subset=round(float(scores_u.mean()), 5),
                          disc_mean_picked=round(float(scores_u[order].mean()), 5),
                          pred_loss_picked_mean=round(float(r_sub[order].mean()), 5),
                          pred_loss_subset_mean=round(float(r_sub.mean()), 5))
        return subset[order]
