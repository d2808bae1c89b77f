"""VAAL's light VAE and discriminator, their options and their adversarial training (vaal and tavaal).

The models are those of the original code (sinhasam/vaal, model.py) for 32x32 inputs: a conv encoder ->
mu, logvar in R^latent_dim -> a conv-transpose decoder, and an MLP discriminator latent -> 512 -> 512 -> 1
(sigmoid: the probability of "labelled"); ``cond_dim=1`` is TA-VAAL's variant (the decoder also gets the
rank r, the discriminator gets [mu, r]). ``adversarial_training`` is the two-player loop both methods run
each round; what differs between them (the rank inputs, the KL reduction, whether the discriminator step
re-runs the whole VAE) is passed in. The methods' docstrings (baselines/vaal.py, baselines/tavaal.py) give
the hyper-parameters and the departures from the originals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines._al_images import to_unit_range
from bench_suite.options import opt


def _is_32(v) -> str | None:
    return None if v == 32 else "32 (the original light VAE is built for 32x32 inputs)"


@dataclass
class VAEOptions:
    """The VAE / discriminator options of vaal and tavaal (a mixin of their Options)."""

    latent_dim: int = opt(32, minimum=1)
    vae_width: int = opt(128, minimum=1, doc="encoder widths w-2w-4w-8w (the original: 128)")
    image_size: int = opt(32, check=_is_32)
    vae_epochs: float = opt(100.0, minimum=0, doc="passes over the pool per round (iterations = N x epochs // batch)")
    vae_iters: int = opt(0, minimum=0, doc="iterations per round (0 = from vae_epochs)")
    vae_batch_size: int = opt(128, minimum=1)
    vae_lr: float = opt(5e-4, minimum=0)
    disc_lr: float = opt(5e-4, minimum=0)
    beta: float = opt(1.0, minimum=0)
    adversary_param: float = opt(1.0, minimum=0)
    num_vae_steps: int = opt(2, minimum=1)
    num_adv_steps: int = opt(1, minimum=1)
    score_batch: int = opt(1024, minimum=1, role="runtime")

    def validate(self) -> str | None:
        if self.vae_epochs <= 0 and self.vae_iters <= 0:
            return "give vae_epochs > 0 or vae_iters > 0"
        parent = getattr(super(), "validate", None)
        return parent() if parent is not None else None


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
        self.memory_format = torch.contiguous_format

    def encode(self, x):
        h = self.encoder(x.contiguous(memory_format=self.memory_format))
        return self.fc_mu(h), self.fc_logvar(h)

    def sample_z(self, mu, logvar):
        """The reparameterised latent z = mu + eps * sigma (eps from the global torch RNG)."""
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    def forward(self, x, r=None):
        mu, logvar = self.encode(x)
        z = self.sample_z(mu, logvar)
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


def build_models(options: VAEOptions, device, cond_dim: int = 0) -> tuple[VAE, Discriminator]:
    """A fresh VAE and discriminator (inside the caller's forked RNG: the init draws from it).

    On the CPU the VAE's convolutions run channels-last (oneDNN's fast layout: a training step of the cpu
    profile's width-16 VAE took 200 ms instead of 340-390 ms on one thread); same model, float rounding only.
    """
    vae = VAE(int(options.latent_dim), 3, int(options.vae_width), cond_dim=cond_dim).to(device)
    if torch.device(device).type == "cpu":
        vae.memory_format = torch.channels_last
        vae.to(memory_format=torch.channels_last)
    disc = Discriminator(int(options.latent_dim), cond_dim=cond_dim).to(device)
    return vae, disc


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


@dataclass
class Batch:
    """One step's inputs: labelled / unlabelled images, the decoder's conditions, the discriminator's ranks."""

    xl: torch.Tensor
    xu: torch.Tensor
    cond_l: torch.Tensor | None = None  # TA-VAAL: sigmoid(r) into the decoder
    cond_u: torch.Tensor | None = None
    rank_l: torch.Tensor | None = None  # TA-VAAL: r into the discriminator
    rank_u: torch.Tensor | None = None


def _bce_pair(pl, pu, target_u: float):
    """BCE(labelled -> 1) + BCE(unlabelled -> target_u)."""
    tu = torch.ones_like(pu) if target_u == 1 else torch.zeros_like(pu)
    return F.binary_cross_entropy(pl, torch.ones_like(pl)) + F.binary_cross_entropy(pu, tu)


def _vae_step(vae, disc, opt_v, b: Batch, o: VAEOptions, kl: str):
    """The VAE's step: reconstruction + beta KL on both sets + make the discriminator call both "labelled"."""
    beta, adv = float(o.beta), float(o.adversary_param)
    recon, _, mu, logvar = vae(b.xl, b.cond_l)
    unsup = vae_loss(b.xl, recon, mu, logvar, beta, kl)
    urecon, _, umu, ulogvar = vae(b.xu, b.cond_u)
    trans = vae_loss(b.xu, urecon, umu, ulogvar, beta, kl)
    total = unsup + trans + adv * _bce_pair(disc(mu, b.rank_l), disc(umu, b.rank_u), 1)
    opt_v.zero_grad(set_to_none=True)
    total.backward()
    opt_v.step()
    return total


def _disc_step(vae, disc, opt_d, b: Batch, full_forward: bool):
    """The discriminator's step: labelled latents -> 1, unlabelled -> 0 (the VAE frozen)."""
    with torch.no_grad():
        if full_forward:
            # VAAL's solver re-runs the whole VAE here and keeps only mu. What of that pass can reach a
            # selection: the encoder's BatchNorm running statistics (updated: encode in train mode) and the
            # global RNG (z is sampled: the same draw is made). The decoder's output and its BatchNorm
            # statistics are never used (scoring encodes only), so its forward - most of the cost - is skipped.
            mu, logvar = vae.encode(b.xl)
            vae.sample_z(mu, logvar)
            umu, ulogvar = vae.encode(b.xu)
            vae.sample_z(umu, ulogvar)
        else:  # TA-VAAL's: the encoder only
            mu, _ = vae.encode(b.xl)
            umu, _ = vae.encode(b.xu)
    dloss = _bce_pair(disc(mu, b.rank_l), disc(umu, b.rank_u), 0)
    opt_d.zero_grad(set_to_none=True)
    dloss.backward()
    opt_d.step()
    return dloss


def adversarial_training(vae, disc, draw: Callable[[bool], Batch], iters: int, o: VAEOptions, *, kl: str = "sum",
                         disc_full_forward: bool = True) -> dict:
    """``iters`` iterations of ``num_vae_steps`` VAE steps then ``num_adv_steps`` discriminator steps.

    ``draw(first)`` gives the next mini-batches (``first``: the first draw of the run); each step after the
    first of an iteration draws anew, as the originals. Returns the last losses for the record.
    """
    opt_v = torch.optim.Adam(vae.parameters(), lr=float(o.vae_lr))
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(o.disc_lr))
    vae.train()
    disc.train()
    for it in range(iters):
        b = draw(it == 0)
        for count in range(int(o.num_vae_steps)):
            total = _vae_step(vae, disc, opt_v, b, o, kl)
            if count < int(o.num_vae_steps) - 1:
                b = draw(False)
        for count in range(int(o.num_adv_steps)):
            dloss = _disc_step(vae, disc, opt_d, b, disc_full_forward)
            if count < int(o.num_adv_steps) - 1:
                b = draw(False)
    return {"vae_iters": iters, "vae_loss": round(float(total.detach()), 5),
            "disc_loss": round(float(dloss.detach()), 5)}


@torch.no_grad()
def score(vae, disc, images, rows, device, batch, r=None):
    """Discriminator probability of "labelled" for ``rows`` (VAE in eval mode: BN running statistics)."""
    vae.eval()
    disc.eval()
    out = []
    for s in range(0, len(rows), batch):
        x = to_unit_range(images[rows[s:s + batch]], device)
        mu, _ = vae.encode(x)
        out.append(disc(mu, None if r is None else r[s:s + batch]).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)
