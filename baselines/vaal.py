"""VAAL (Sinha, Ebrahimi & Darrell, "Variational Adversarial Active Learning", ICCV 2019), transplanted with
the ActiveFT paper's batch protocol (appendix B.3; see baselines/_al_common.py).

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
On the cpu profile those are hours per round on 2 cores, so the profile sets ``vae_epochs`` (e.g. 2) and
``vae_width`` (e.g. 16) - say so when reporting; ``vae_iters`` sets the iteration count directly.

Departures from the original, and why:
- No task model is trained inside the selection (VAAL's own task model - VGG16 - never influences which
  samples are picked; the ActiveFT protocol finetunes its own model on the final selection).
- Scoring runs the VAE in eval mode (BatchNorm running statistics); the original scores in train mode, so
  a sample's score depended on the other samples of its scoring batch.
- cpu-profile scale: fewer epochs / narrower VAE as above (configurable back to the original).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines._al_common import ActiveLearner, _Forked, load_pool_images, positive_int, to_unit_range
from bench_suite.methods.registry import register
from bench_suite.errors import BadInputError


def kaiming_init(m):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.kaiming_normal_(m.weight)
        if m.bias is not None:
            m.bias.data.fill_(0)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        m.weight.data.fill_(1)
        m.bias.data.fill_(0)


class VAE(nn.Module):
    """VAAL's VAE for 32x32 inputs; ``cond_dim=1`` is TA-VAAL's variant (the decoder also gets the rank r)."""

    def __init__(self, z_dim: int = 32, nc: int = 3, width: int = 128, cond_dim: int = 0):
        super().__init__()
        w = width
        self.top = 8 * w
        self.encoder = nn.Sequential(
            nn.Conv2d(nc, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),          # 16x16
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(True),  # 8x8
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(True),  # 4x4
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU(True),  # 2x2
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(8 * w * 2 * 2, z_dim)
        self.fc_logvar = nn.Linear(8 * w * 2 * 2, z_dim)
        self.fc_dec = nn.Linear(z_dim + cond_dim, 8 * w * 4 * 4)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(8 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(True),  # 8x8
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(True),  # 16x16
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),  # 32x32
            nn.ConvTranspose2d(w, nc, 1),
        )
        for m in self.modules():
            kaiming_init(m)

    def encode(self, x):
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def forward(self, x, r=None):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        if r is not None:
            z = torch.cat([z, r], 1)
        recon = self.decoder(self.fc_dec(z).view(-1, self.top, 4, 4))
        return recon, z, mu, logvar


class Discriminator(nn.Module):
    """MLP z -> 512 -> 512 -> 1 with a sigmoid (probability of "labelled")."""

    def __init__(self, z_dim: int = 32, cond_dim: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim + cond_dim, 512), nn.ReLU(True), nn.Linear(512, 512), nn.ReLU(True),
                                 nn.Linear(512, 1), nn.Sigmoid())
        for m in self.modules():
            kaiming_init(m)

    def forward(self, z, r=None):
        if r is not None:
            z = torch.cat([z, r], 1)
        return self.net(z).view(-1)


def vae_loss(x, recon, mu, logvar, beta, kl="sum"):
    mse = F.mse_loss(recon, x)
    kld = 1 + logvar - mu.pow(2) - logvar.exp()
    kld = -0.5 * (kld.sum() if kl == "sum" else kld.mean())
    return mse + beta * kld


def endless(rows: np.ndarray, batch: int, gen: torch.Generator, drop_last: bool):
    """Shuffled mini-batches of ``rows`` forever (a fresh permutation per pass), like the original loaders."""
    n = len(rows)
    while True:
        perm = rows[torch.randperm(n, generator=gen).numpy()]
        stop = n - (n % batch) if (drop_last and n >= batch) else n
        for s in range(0, stop, batch):
            yield perm[s:s + batch]


VAAL_DEFAULTS = {"latent_dim": 32, "vae_width": 128, "image_size": 32, "vae_epochs": 100, "vae_iters": 0,
                 "vae_batch_size": 128, "vae_lr": 5e-4, "disc_lr": 5e-4, "beta": 1.0, "adversary_param": 1.0,
                 "num_vae_steps": 2, "num_adv_steps": 1, "score_batch": 1024}


def check_vaal_options(name, o):
    for key in ("latent_dim", "vae_width", "image_size", "vae_batch_size", "num_vae_steps", "num_adv_steps", "score_batch"):
        positive_int(f"{name}: {key}", o[key])
    if o["image_size"] != 32:
        raise BadInputError(f"{name}: the original light VAE is built for 32x32 inputs; image_size must be 32")
    for key in ("vae_epochs", "vae_lr", "disc_lr", "beta", "adversary_param"):
        if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or o[key] < 0:
            raise BadInputError(f"{name}: {key} must be a non-negative number, got {o[key]!r}")
    if isinstance(o["vae_iters"], bool) or not isinstance(o["vae_iters"], int) or o["vae_iters"] < 0:
        raise BadInputError(f"{name}: vae_iters must be an integer >= 0 (0 = from vae_epochs), got {o['vae_iters']!r}")
    if o["vae_epochs"] <= 0 and o["vae_iters"] <= 0:
        raise BadInputError(f"{name}: give vae_epochs > 0 or vae_iters > 0")


@register
class VAAL(ActiveLearner):
    name = "vaal"
    label = "VAAL"
    description = "VAAL (Sinha et al. 2019): VAE + adversarial discriminator on 32x32 images, B.3 batch protocol"
    method_defaults = dict(VAAL_DEFAULTS)
    uses_head = False

    def check_options(self):
        check_vaal_options(self.name, self.opts)

    def prepare(self, store, seed):
        return {"images": load_pool_images(store, int(self.opts["image_size"]), self.name)}

    def query(self, state, k, ctx):
        o = self.opts
        images = ctx["images"]
        dev = state.device
        n = len(state.store)
        iters = int(o["vae_iters"]) or max(1, int(n * float(o["vae_epochs"])) // int(o["vae_batch_size"]))
        t0 = time.perf_counter()
        with _Forked(state.seed, dev):
            vae = VAE(int(o["latent_dim"]), 3, int(o["vae_width"])).to(dev)
            disc = Discriminator(int(o["latent_dim"])).to(dev)
            opt_v = torch.optim.Adam(vae.parameters(), lr=float(o["vae_lr"]))
            opt_d = torch.optim.Adam(disc.parameters(), lr=float(o["disc_lr"]))
            gen = torch.Generator().manual_seed(state.seed + 7)
            lab = endless(state.labelled_rows, int(o["vae_batch_size"]), gen, drop_last=True)
            unl = endless(state.unlabelled_rows, int(o["vae_batch_size"]), gen, drop_last=False)

            def batch(rows):
                return to_unit_range(images[rows], dev)

            vae.train(); disc.train()
            beta, adv = float(o["beta"]), float(o["adversary_param"])
            for it in range(iters):
                xl, xu = batch(next(lab)), batch(next(unl))
                for count in range(int(o["num_vae_steps"])):
                    recon, _, mu, logvar = vae(xl)
                    unsup = vae_loss(xl, recon, mu, logvar, beta)
                    urecon, _, umu, ulogvar = vae(xu)
                    trans = vae_loss(xu, urecon, umu, ulogvar, beta)
                    pl, pu = disc(mu), disc(umu)
                    dsc = F.binary_cross_entropy(pl, torch.ones_like(pl)) + F.binary_cross_entropy(pu, torch.ones_like(pu))
                    total = unsup + trans + adv * dsc
                    opt_v.zero_grad(set_to_none=True)
                    total.backward()
                    opt_v.step()
                    if count < int(o["num_vae_steps"]) - 1:
                        xl, xu = batch(next(lab)), batch(next(unl))
                for count in range(int(o["num_adv_steps"])):
                    with torch.no_grad():
                        _, _, mu, _ = vae(xl)
                        _, _, umu, _ = vae(xu)
                    pl, pu = disc(mu), disc(umu)
                    dloss = F.binary_cross_entropy(pl, torch.ones_like(pl)) + F.binary_cross_entropy(pu, torch.zeros_like(pu))
                    opt_d.zero_grad(set_to_none=True)
                    dloss.backward()
                    opt_d.step()
                    if count < int(o["num_adv_steps"]) - 1:
                        xl, xu = batch(next(lab)), batch(next(unl))
            state.info.update(vae_iters=iters, vae_loss=round(float(total.detach()), 5), disc_loss=round(float(dloss.detach()), 5))
        state.info["train_seconds"] = round(time.perf_counter() - t0, 4)
        scores_u = score(vae, disc, images, state.unlabelled_rows, dev, int(o["score_batch"]))
        scores_l = score(vae, disc, images, state.labelled_rows, dev, int(o["score_batch"]))
        order = np.argsort(scores_u, kind="stable")[:k]
        state.info.update(disc_mean_labelled=round(float(scores_l.mean()), 5),
                          disc_mean_unlabelled=round(float(scores_u.mean()), 5),
                          disc_mean_picked=round(float(scores_u[order].mean()), 5))
        return state.unlabelled_rows[order]


@torch.no_grad()
def score(vae, disc, images, rows, device, batch, r=None):
    """Discriminator probability of "labelled" for ``rows`` (VAE in eval mode: BN running statistics)."""
    vae.eval(); disc.eval()
    out = []
    for s in range(0, len(rows), batch):
        x = to_unit_range(images[rows[s:s + batch]], device)
        mu, _ = vae.encode(x)
        out.append(disc(mu, None if r is None else r[s:s + batch]).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)
