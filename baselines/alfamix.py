"""ALFA-Mix (Parvaneh, Abbasnejad, Teney, Haffari, van den Hengel & Shi, "Active Learning by Feature Mixing",
CVPR 2022), transplanted with the ActiveFT paper's batch protocol (appendix B.3; see baselines/_al_protocol.py).

Each round: retrain the task model; embed the pool with it (z = the embedding before the classifier, the
classifier g = its final linear layer); for every labelled class i an anchor z*_i = mean embedding of the
labelled samples of class i (all labelled samples when class i has none yet). Every unlabelled z is
interpolated toward each anchor, z~ = (1 - alpha) z + alpha z*_i; a sample whose predicted label g(z~)
differs from its own prediction g(z) for some anchor is a candidate. The candidates' L2-normalised
embeddings are clustered by k-means with K = batch, and the candidate nearest each centre is picked; if there
are fewer picks than the batch, the rest is random (as the original).

Alpha (``alpha_mode``), as the authors' released code (AminParvaneh/alpha_mix_active_learning) runs it:
- ``learned`` (the default; the main command of the authors' README: ``--alpha_opt``, with the code's
  default ``--alpha_cap 0.03125``): the original's gradient optimisation (``learn_alpha``): alpha ~
  N(cap/2, cap/2) clamped to [1e-8, cap] per dimension, 5 Adam steps (lr 0.1, / 10 for the last third, a
  fresh Adam each step as in the code) on -CE(g(z~), pred) + 0.01 ||alpha||, clamped after each step; a
  label change seen before any step makes the sample a candidate. The paper profile uses it.
- ``closed_form`` (the README's variation: ``--alpha_closed_form_approx --alpha_cap 0.2``): with
  g = grad_z CE(g(z), pred(z)) and eps = cap / sqrt(D), alpha = eps ||z* - z|| / ||g|| * g / (z* - z + 1e-8)
  elementwise (Eq. 5 of the paper; the 1e-8 is the code's), so z~ = z + c g with c = eps ||z* - z|| / ||g||
  on the dimensions where z* != z, and z~ = z where they agree (there alpha * 0 = 0 - common with ReLU
  embeddings, whose dead units are 0 in both). The classifier is linear, so g(z~) = g(z) + c (g * mask) W^T,
  evaluated without the division (which in float32 cancels catastrophically when z* - z is ~1e-8). The cpu
  profile uses it with cap 0.2 (its selections as before; one pass per cap step instead of 5 Adam steps).
The cap grows in steps of ``alpha_cap`` up to 1 until more than K candidates are found (the original loop).

Hyper-parameters: alpha_cap 0.03125, alpha_mode learned, 5 learning iterations, lr 0.1, clf coefficient 1,
L2 coefficient 0.01 (the code's defaults); k-means (scikit-learn KMeans, k-means++, ``kmeans_n_init`` 10 as
the scikit-learn default the original ran with; faiss for very large candidate sets, ``kmeans_backend``).

The task model (``task_model``): ``finetune`` in the paper profile (appendix B.3: DINO DeiT-S finetuned from
its pretrained weights every round on all labels bought so far, by the finetuning engine with the recipe
``task_recipe``; z = the backbone's pooled feature, g = the linear head: ``baselines/_al_backbone.py``);
``head`` in the cpu profile (the frozen encoder + an MLP head, z = the head's last hidden layer, g = its
final layer: ``baselines/_al_head.py``). Both mix where the original does: the embedding before the
classifier.

Departures from the original, and why:
- cpu profile: the task model is the frozen encoder + an MLP head instead of a finetuned backbone (minutes
  on 2 cores instead of a finetuning per round), and the closed form with cap 0.2 (see above).
- The random fill draws without replacement (the original's np.random.choice(..., remained) could repeat
  samples and return fewer unique ids); k-means and the learned alpha's initial draw are seeded.
- The learned variant optimises every unlabelled sample in one batch (the code's alpha_learn_batch_size is
  1,000,000, i.e. one batch too, up to ImageNet) in row blocks of 16384 (memory only: each row's alpha is
  optimised independently, so the blocks give the same result).
- Closed form evaluated through the classifier's linearity and without the 1e-8 division (the same
  mixture up to rounding; it differs only where 0 < |z* - z| < ~1e-7); every pass is blocked over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from baselines._al_protocol import ActiveLearner, LearnerOptions, TaskModelOptions, fill_random
from bench_suite.methods import register
from bench_suite.options import opt


def class_anchors(emb_l: np.ndarray, y_l: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean labelled embedding per class (the mean of all labelled samples for a class not seen yet)."""
    anchors = np.empty((num_classes, emb_l.shape[1]), dtype=np.float32)
    overall = emb_l.mean(0)
    for c in range(num_classes):
        m = y_l == c
        anchors[c] = emb_l[m].mean(0) if m.any() else overall
    return anchors


@torch.no_grad()
def candidates_closed_form(emb_u, logits_u, anchors, W, eps, *, device, block=16384):
    """Boolean mask: for some class c, the mixture with the closed-form alpha changes the prediction.

    alpha = eps' ||a - z|| / ||g|| * g / (a - z) elementwise (eps' = eps / sqrt(D)), so the mixture is
    z + alpha (a - z) = z + c g on the dimensions where a != z (c = eps' ||a - z|| / ||g||) and z where a == z
    (in the original alpha * 0 = 0 there). The classifier is linear: logits change by c ((g * m) @ W^T).
    """
    n, d = emb_u.shape
    out = np.zeros(n, dtype=bool)
    A = torch.as_tensor(anchors, device=device)
    Wt = torch.as_tensor(W, device=device)  # C x D
    eps = eps / math.sqrt(d)
    for s in range(0, n, block):
        z = torch.as_tensor(emb_u[s:s + block], device=device)
        lo = torch.as_tensor(logits_u[s:s + block], device=device)
        pred = lo.argmax(1)
        p = lo.softmax(1)
        g = (p - F.one_hot(pred, lo.shape[1]).float()) @ Wt  # grad of CE(g(z), pred) wrt z (up to 1/N)
        gn = g.norm(dim=1)
        ok = gn > 1e-12
        changed = torch.zeros(len(z), dtype=torch.bool, device=device)
        for cls in range(A.shape[0]):
            diff = A[cls][None, :] - z
            c = eps * diff.norm(dim=1) / gn.clamp_min(1e-12)
            step = (g * (diff != 0)) @ Wt.T  # B x C
            mixed = lo + c[:, None] * step
            changed |= (mixed.argmax(1) != pred) & ok
        out[s:s + block] = changed.cpu().numpy()
    return out


def candidates_learned(emb_u, logits_u, anchors, fc, cap, *, gen, device, iters=5, lr=0.1, clf_coef=1.0,
                       l2_coef=0.01, block=16384):
    """The original's learn_alpha for every anchor; boolean mask of label changes."""
    n, d = emb_u.shape
    out = np.zeros(n, dtype=bool)
    for s in range(0, n, block):
        z = torch.as_tensor(emb_u[s:s + block], device=device)
        pred = torch.as_tensor(logits_u[s:s + block], device=device).argmax(1)
        changed = torch.zeros(len(z), dtype=torch.bool, device=device)
        for cls in range(len(anchors)):
            a = torch.as_tensor(anchors[cls], device=device)[None, :]
            alpha = torch.normal(cap / 2.0, cap / 2.0, size=(len(z), d), generator=gen).to(device)
            alpha = alpha.clamp(1e-8, cap)
            for i in range(iters):
                l = alpha.clone().requires_grad_(True)
                opt = torch.optim.Adam([l], lr=lr / (1.0 if i < iters * 2 / 3 else 10.0))
                out_logits = fc((1 - l) * z + l * a)
                changed |= (out_logits.argmax(1) != pred).detach()
                loss = -clf_coef * F.cross_entropy(out_logits, pred, reduction="none") + l2_coef * l.norm(dim=1)
                opt.zero_grad()
                loss.sum().backward()
                opt.step()
                alpha = l.detach().clamp(1e-8, cap)
        out[s:s + block] = changed.cpu().numpy()
    return out


def kmeans_pick(feats: np.ndarray, k: int, *, seed: int, n_init: int, backend: str) -> np.ndarray:
    """Indices (into feats) of the sample nearest each k-means centre (empty clusters give no pick)."""
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if backend == "auto":
        backend = "sklearn" if len(feats) * k <= 5e7 else "faiss"
    if backend == "faiss":
        import faiss

        km = faiss.Kmeans(feats.shape[1], k, niter=25, nredo=max(1, n_init), seed=int(seed) % (2**31), verbose=False)
        km.train(feats)
        centres = km.centroids
        _, assign = km.index.search(feats, 1)
        assign = assign[:, 0]
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=n_init, random_state=int(seed) % (2**31)).fit(feats)
        centres, assign = km.cluster_centers_, km.labels_
    dis = ((feats - centres[assign]) ** 2).sum(1)
    picks = []
    for c in range(k):
        members = np.flatnonzero(assign == c)
        if len(members):
            picks.append(members[np.argmin(dis[members])])
    return np.asarray(picks, dtype=np.int64)


def _cap(v) -> str | None:
    return None if 0 < v <= 1 else "in (0, 1]"


@register
class ALFAMix(ActiveLearner):
    name = "alfamix"
    label = "ALFA-Mix"
    description = "ALFA-Mix (Parvaneh et al. 2022): feature mixing toward class anchors, k-means over label-changing candidates"
    version = 2  # 2: defaults are the authors' main command (learned alpha, cap 0.03125), was closed form, cap 0.2

    @dataclass
    class Options(TaskModelOptions, LearnerOptions):
        alpha_cap: float = opt(0.03125, check=_cap, doc="eps; the cap grows by this up to 1 until > K candidates")
        alpha_mode: str = opt("learned", choices=("learned", "closed_form"))
        alpha_learning_iters: int = opt(5, minimum=1)
        alpha_learning_rate: float = 0.1
        alpha_clf_coef: float = 1.0
        alpha_l2_coef: float = 0.01
        kmeans_n_init: int = opt(10, minimum=1)
        kmeans_backend: str = opt("auto", choices=("auto", "sklearn", "faiss"), role="runtime")

    def candidates(self, state, out_u, anchors, fc, k) -> tuple[np.ndarray, list]:
        """The label-changing candidates (mask over the unlabelled rows), growing the cap until > k are found;
        ``fc`` is the task model's classifier over the embedding."""
        o, dev = self.options, state.device
        W = fc.weight.detach().float().cpu().numpy()
        cand = np.zeros(len(state.unlabelled_rows), dtype=bool)
        cap, caps_used = 0.0, []
        gen = torch.Generator().manual_seed(state.seed + 11)
        while cap < 1.0:
            cap += float(o.alpha_cap)
            if o.alpha_mode == "closed_form":
                pc = candidates_closed_form(out_u["embed"], out_u["logits"], anchors, W, cap, device=dev)
            else:
                with torch.enable_grad():
                    pc = candidates_learned(out_u["embed"], out_u["logits"], anchors, fc, min(cap, 1.0), gen=gen,
                                            device=dev, iters=int(o.alpha_learning_iters),
                                            lr=float(o.alpha_learning_rate), clf_coef=float(o.alpha_clf_coef),
                                            l2_coef=float(o.alpha_l2_coef))
            cand |= pc
            caps_used.append([round(cap, 4), int(pc.sum())])
            if cand.sum() > k:
                break
        return cand, caps_used

    def query(self, state, k, ctx):
        o, dev = self.options, state.device
        model = state.train_task_model()
        out_u = model.outputs(state.unlabelled_rows)
        emb_l = model.outputs(state.labelled_rows, what=("embed",))["embed"]
        anchors = class_anchors(emb_l, state.labels, state.num_classes)
        cand, caps_used = self.candidates(state, out_u, anchors, model.fc, k)
        cand_idx = np.flatnonzero(cand)
        state.info.update(candidates=int(len(cand_idx)), alpha_caps=caps_used)
        picks = np.zeros(0, dtype=np.int64)
        if len(cand_idx):
            feats = out_u["embed"][cand_idx]
            feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
            sel = kmeans_pick(feats, min(k, len(cand_idx)), seed=state.seed, n_init=int(o.kmeans_n_init),
                              backend=o.kmeans_backend)
            picks = state.unlabelled_rows[cand_idx[sel]]
        picks, n_random = fill_random(picks, k, state)
        state.info["random_fill"] = n_random
        return picks
