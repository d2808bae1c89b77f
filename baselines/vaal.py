"""VAAL (Sinha, Ebrahimi & Darrell, "Variational Adversarial Active Learning", ICCV 2019), transplanted with
the ActiveFT paper's batch protocol (appendix B.3; see baselines/_al_protocol.py).

As the ActiveFT paper says (B.3), VAAL selects with "their original light-weighted VAE" on the images, not
with the finetuned backbone: each round a fresh VAE (conv encoder -> mu, logvar in R^32 -> conv-transpose
decoder) and a fresh discriminator (MLP 32-512-512-1, sigmoid) are trained on labelled + unlabelled
images; the VAE minimises reconstruction (MSE) + beta * KL on both sets plus the adversarial term that makes
the discriminator call every latent "labelled"; the discriminator learns labelled (1) vs unlabelled (0) on
the latent means. The batch = the unlabelled samples with the lowest discriminator output (most surely
unlabelled).

Images: the pool's images from the store's WebDataset shard folder (``meta["shards"]``), resized to 32x32
(grey -> 3 channels), scaled to [-1, 1] (the original's Normalize(0.5, 0.5)); the shards' labels are never
read.

Hyper-parameters of the original code (sinhasam/vaal: arguments.py, solver.py, model.py), the defaults
here: latent 32, encoder widths 128-256-512-1024 (``vae_width`` = 128), Adam lr 5e-4 for both nets,
batch 128, beta 1, adversary weight 1, 2 VAE steps and 1 discriminator step per iteration, KL summed over
the batch (as in solver.vae_loss), kaiming-normal init, iterations per round = N * epochs // batch with 100
epochs over the pool.
The paper profile runs them (width 128, 100 epochs per round, stated in bench_suite/profiles/paper.yaml).
On the cpu profile those are hours per round on 2 cores, so the profile sets ``vae_epochs`` (1) and
``vae_width`` (8) - say so when reporting; ``vae_iters`` sets the iteration count directly.

Departures from the original, and why:
- No task model is trained inside the selection (VAAL's own task model - VGG16 - never influences which
  samples are picked; the ActiveFT protocol finetunes its own model on the final selection).
- Scoring runs the VAE in eval mode (BatchNorm running statistics); the original scores in train mode, so
  a sample's score depended on the other samples of its scoring batch.
- The discriminator's step runs the encoder and draws z but skips the decoder, whose output the original's
  full VAE pass there discards (the encoder's BatchNorm statistics and the RNG stream are as in the original;
  the decoder's running statistics are never used). Same selections, a third less compute per iteration.
- cpu-profile scale: fewer epochs / narrower VAE as above (configurable back to the original).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from baselines._al_head import forked_rng
from baselines._al_images import load_pool_images, to_unit_range
from baselines._al_protocol import ActiveLearner, ProtocolOptions
from baselines._al_vae import Batch, VAEOptions, adversarial_training, build_models, endless, score
from bench_suite.methods import register


@register
class VAAL(ActiveLearner):
    name = "vaal"
    label = "VAAL"
    version = 2  # 2: channels-last VAE on the CPU (float rounding: other picks); disc step skips the decoder
    description = "VAAL (Sinha et al. 2019): VAE + adversarial discriminator on 32x32 images, B.3 batch protocol"
    quick_options = {"vae_width": 8, "vae_iters": 6, "vae_batch_size": 64}  # contract tests only

    @dataclass
    class Options(VAEOptions, ProtocolOptions):
        """The protocol's options and the VAE's (no task model, so no head_* options)."""

    def prepare(self, store, seed):
        return {"images": load_pool_images(store, int(self.options.image_size), self.name)}

    def query(self, state, k, ctx):
        o, images, dev = self.options, ctx["images"], state.device
        iters = int(o.vae_iters) or max(1, int(len(state.store) * float(o.vae_epochs)) // int(o.vae_batch_size))
        t0 = time.perf_counter()
        with forked_rng(state.seed, dev):
            vae, disc = build_models(o, dev)
            gen = torch.Generator().manual_seed(state.seed + 7)
            lab = endless(state.labelled_rows, int(o.vae_batch_size), gen, drop_last=True)
            unl = endless(state.unlabelled_rows, int(o.vae_batch_size), gen, drop_last=False)

            def draw(first):
                return Batch(to_unit_range(images[next(lab)], dev), to_unit_range(images[next(unl)], dev))

            state.info.update(adversarial_training(vae, disc, draw, iters, o, kl="sum", disc_full_forward=True))
        state.info["train_seconds"] = round(time.perf_counter() - t0, 4)
        state.models.update(vae=vae, disc=disc)
        scores_u = score(vae, disc, images, state.unlabelled_rows, dev, int(o.score_batch))
        scores_l = score(vae, disc, images, state.labelled_rows, dev, int(o.score_batch))
        order = np.argsort(scores_u, kind="stable")[:k]
        state.info.update(disc_mean_labelled=round(float(scores_l.mean()), 5),
                          disc_mean_unlabelled=round(float(scores_u.mean()), 5),
                          disc_mean_picked=round(float(scores_u[order].mean()), 5))
        return state.unlabelled_rows[order]
