"""The AL baselines' finetuned task model (``task_model: finetune``, the paper profile): every round a fresh copy of
the pretrained backbone is finetuned by the finetuning engine on all the labels bought so far, and the method
selects with it.

Mechanics on a tiny ViT (2 blocks, 16 px) registered as an encoder, the digits pool's real shards and a
3-epoch recipe: the engine is called once per round on exactly the labelled samples with the oracle's labels,
starts from the pretrained weights and changes them; the picks are recomputed from the last round's finetuned
model; selections are deterministic per seed; the selection time includes every round's finetuning.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image  # noqa: F401  (decoders of the shards)

from baselines._al_backbone import JointModel, tap_positions
from baselines._al_images import PoolImages
from baselines.alfamix import ALFAMix
from baselines.coreset import CoreSet, kcenter_greedy
from baselines.learnloss import LearnLoss
from baselines.tavaal import TAVAAL
from bench_suite import trainers
from bench_suite.data.shards import read_all
from bench_suite.encoders.base import Encoder
from bench_suite.encoders.registry import REGISTRY as ENCODERS
from bench_suite.encoders.registry import EncoderSpec
from bench_suite.errors import BadInputError
from bench_suite.finetune import recipes as recipes_mod
from bench_suite.methods import registry
from bench_suite.methods.selection import Oracle
from bench_suite.profiles import load_profile
from bench_suite.store import FeatureStore

ENC = "tiny_al_vit"
SIZE = 16
SHA = "0123456789abcdef" * 4
TINY_RECIPE = """
tiny_round:
  kind: finetune
  optimizer: sgd
  lr: 0.05
  momentum: 0.9
  weight_decay: 0.0
  batch_size: 32
  micro_batch_size: 32
  epochs: 3
  schedule: constant
  amp: "no"
  eval_every: 0
  checkpoint_every: 100
"""
FT = {"task_model": "finetune", "task_recipe": "tiny_round", "init_size": 20, "batch_size": 20, "task_batch": 128}
BUDGET = 60  # the initial 20, then two rounds of 20


def _build(image_size, weights=None, cache_dir=None, device="cpu"):
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=image_size, patch_size=8, depth=2,
                                  num_classes=0)
    return Encoder(name=ENC, arch="vit_tiny/8 (2 blocks, test)", model=model, kind="vit", image_size=image_size,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), default_pooling="cls",
                   dims={"cls": 192, "gap": 192, "cls+mean": 384},
                   meta={"weights": {"source": "test", "file": "none", "sha256": SHA}}, device=device)


@pytest.fixture(scope="module", autouse=True)
def tiny_world(tmp_path_factory):
    """One CPU thread; the tiny ViT in the encoder registry; a catalogue with the 3-epoch ``tiny_round``."""
    from threadpoolctl import threadpool_limits

    cat = tmp_path_factory.mktemp("recipes") / "recipes.yaml"
    cat.write_text(recipes_mod.CATALOGUE.read_text() + TINY_RECIPE)
    mp = pytest.MonkeyPatch()
    mp.setattr(recipes_mod, "CATALOGUE", cat)
    ENCODERS.register(EncoderSpec(ENC, "vit_tiny", _build, SIZE, "cls", {"cls": 192}, "none", "test", True))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(old)
    ENCODERS.unregister(ENC)
    mp.undo()


@pytest.fixture(scope="module")
def store(digits_shards):
    ids, images, labels = read_all(digits_shards)
    feats = images.reshape(len(ids), -1).astype(np.float32)
    meta = {"shards": str(digits_shards), "num_classes": 10,
            "encoder": {"name": ENC, "image_size": SIZE, "weights": {"sha256": SHA}}, "pooling": "cls"}
    return FeatureStore.from_array(feats, ids=ids, labels=labels, meta=meta, normalize=True)


@pytest.fixture(scope="module")
def images(digits_shards, store):
    ids, imgs, _ = read_all(digits_shards)
    np.testing.assert_array_equal(ids, store.ids)
    return list(imgs)


def oracle_for(store):
    return Oracle(np.asarray(store.labels), store.ids)


def rows_of(store, ids):
    row_of = {int(i): r for r, i in enumerate(np.asarray(store.ids).tolist())}
    return np.asarray([row_of[int(i)] for i in ids], dtype=np.int64)


def backbone_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


@pytest.fixture(scope="module")
def coreset_runs(store):
    """CoreSet with the finetuned task model, seed 0 twice; the engine's fit spied on: what each round trained
    on, and the backbone's weights before and after."""
    trainer = trainers.get("finetune")
    calls = []
    real_fit = trainer.fit

    def spy(model, encoder, ids, labels, imgs, recipe, **kw):
        before = backbone_state(model)
        out = real_fit(model, encoder, ids, labels, imgs, recipe, **kw)
        calls.append({"ids": np.asarray(ids).copy(), "labels": np.asarray(labels).copy(), "before": before,
                      "after": backbone_state(model), "epochs": out["epochs"]})
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "fit", staticmethod(spy))
    try:
        runs = []
        for _ in range(2):
            calls.clear()
            method = CoreSet(**FT)
            sel = method.select(store, BUDGET, seed=0, oracle=oracle_for(store))
            runs.append((sel, method, list(calls)))
    finally:
        mp.undo()
    return runs


def test_each_round_finetunes_the_pretrained_backbone_on_all_labels_so_far(coreset_runs, store):
    sel, _, calls = coreset_runs[0]
    assert len(calls) == sel.info["n_rounds"] == 2
    pretrained = {k: v for k, v in _build(SIZE).model.state_dict().items()}
    for r, call in enumerate(calls):
        labelled = sel.ids[:20 * (r + 1)]  # the selection lists ids in the order they were labelled
        assert sorted(call["ids"].tolist()) == sorted(labelled.tolist())
        np.testing.assert_array_equal(call["labels"], store.labels[rows_of(store, call["ids"])])  # the oracle's
        assert call["epochs"] == 3
        # a fresh copy of the PRETRAINED backbone every round (not the previous round's model) ...
        for k, v in call["before"].items():
            torch.testing.assert_close(v, pretrained[k.removeprefix("model.")], rtol=0, atol=0)
        # ... whose weights the finetuning changes
        moved = max(float((call["after"][k] - call["before"][k]).abs().max()) for k in call["before"])
        assert moved > 1e-4
    # the two rounds' finetuned weights differ (different labelled sets)
    assert any(not torch.equal(calls[0]["after"][k], calls[1]["after"][k]) for k in calls[0]["after"])


def test_coreset_picks_are_k_center_greedy_in_the_finetuned_embedding(coreset_runs, store, images):
    sel, method, _ = coreset_runs[0]
    model = method.last_round_models["model"]
    enc = _build(SIZE)
    with torch.no_grad():
        emb = torch.cat([model.backbone(enc.preprocess(np.stack(images[s:s + 128])))
                         for s in range(0, len(images), 128)]).numpy()
    labelled = rows_of(store, sel.ids[:40])
    picks, _ = kcenter_greedy(emb, labelled, 20)
    np.testing.assert_array_equal(store.ids[picks], sel.ids[40:])
    # and not the head-on-frozen-features selection
    head = CoreSet(init_size=20, batch_size=20, head_epochs=20).select(store, BUDGET, seed=0, oracle=oracle_for(store))
    assert set(head.ids[20:].tolist()) != set(sel.ids[20:].tolist())


def test_deterministic_and_the_time_includes_the_finetuning(coreset_runs):
    (a, _, _), (b, _, _) = coreset_runs
    np.testing.assert_array_equal(a.ids, b.ids)
    rounds = a.info["rounds"]
    assert all(r["task_model"] == "finetune" and r["train_seconds"] > 0 and r["train_epochs"] == 3 for r in rounds)
    assert a.info["train_seconds_total"] == pytest.approx(sum(r["train_seconds"] for r in rounds), abs=1e-3)
    assert a.seconds >= a.info["train_seconds_total"] + a.info["prepare_seconds"]
    assert "finetuned" in a.info["task_model"] and a.info["task_model_setup"]["recipe"]["epochs"] == 3
    assert a.config["task_recipe_settings"]["epochs"] == 3  # the resolved recipe is part of the cell key


def test_learnloss_trains_its_module_with_the_backbone_and_picks_the_highest_predicted_loss(store, images):
    method = LearnLoss(**FT, subset_size=0)  # subset 0: score every unlabelled sample
    sel = method.select(store, 40, seed=2, oracle=oracle_for(store))
    info = sel.info["rounds"][0]
    assert np.isfinite(info["final_module_loss"]) and info["train_epochs"] == 3
    model, ranker = method.last_round_models["model"], method.last_round_models["ranker"]
    blocks = list(model.backbone.model.blocks)
    taps = []
    hooks = [blocks[i].register_forward_hook(lambda _m, _i, o: taps.append(o.mean(1))) for i in tap_positions(2)]
    unl = np.setdiff1d(np.arange(len(store)), rows_of(store, sel.ids[:20]))
    enc = _build(SIZE)
    with torch.no_grad():
        preds = []
        for s in range(0, len(unl), 256):
            taps.clear()
            model.backbone(enc.preprocess(np.stack([images[r] for r in unl[s:s + 256]])))
            preds.append(ranker(taps))
    for h in hooks:
        h.remove()
    pred = torch.cat(preds).numpy()
    top = unl[np.argsort(-pred, kind="stable")[:20]]
    assert set(store.ids[top].tolist()) == set(sel.ids[20:].tolist())


def test_joint_model_stops_the_module_gradient_after_the_stop_epoch():
    trainer = trainers.get("finetune")
    enc = _build(SIZE)
    clf, _ = trainer.build(enc, trainer.recipe("tiny_round"), 10, seed=0)
    blocks = list(clf.backbone.model.blocks)
    joint = JointModel(clf, [blocks[i] for i in tap_positions(len(blocks))], [192, 192], stop_epoch=0)
    x = torch.randn(4, 3, SIZE, SIZE)
    grads = []
    for _ in range(2):
        joint.train()  # the loop calls this once per epoch: epochs 0, then 1 (> stop_epoch)
        joint.zero_grad(set_to_none=True)
        _, pred = joint(x)
        pred.sum().backward()
        grads.append(sum(float(p.grad.abs().sum()) for p in clf.backbone.parameters() if p.grad is not None))
    assert joint.epoch == 1 and grads[0] > 0 and grads[1] == 0


@pytest.mark.parametrize("name", ["alfamix", "tavaal"])
def test_alfamix_and_tavaal_select_with_the_finetuned_model(store, name):
    # (determinism per seed is checked on coreset above; alfamix's learned alpha with a coarser cap to stay quick)
    extra = {"vae_width": 8, "vae_iters": 4, "vae_batch_size": 32, "subset_size": 300} if name == "tavaal" \
        else {"alpha_cap": 0.25}
    cls = {"alfamix": ALFAMix, "tavaal": TAVAAL}[name]
    a = cls(**FT, **extra).select(store, 40, seed=1, oracle=oracle_for(store))
    r = a.info["rounds"][0]
    assert r["task_model"] == "finetune" and r["train_seconds"] > 0 and len(set(a.ids.tolist())) == 40
    if name == "alfamix":
        assert a.config["alpha_mode"] == "learned" and r["candidates"] > 0


def test_weights_other_than_the_stores_are_refused(store):
    meta = {**store.meta, "encoder": {**store.meta["encoder"], "weights": {"sha256": "f" * 64}}}
    other = FeatureStore.from_array(np.asarray(store.features), ids=store.ids, labels=store.labels, meta=meta)
    with pytest.raises(BadInputError, match="task_weights"):
        CoreSet(**FT).select(other, BUDGET, seed=0, oracle=oracle_for(other))


def test_pool_images_streamed_equal_cached(store, images):
    keep = np.arange(0, len(store), 12)  # a pool of every 12th sample: the images are found by id
    small = FeatureStore.from_array(np.asarray(store.features)[keep], ids=store.ids[keep], meta=store.meta)
    images = [images[r] for r in keep]
    cached, streamed = PoolImages(small, "t"), PoolImages(small, "t", budget=0)
    assert cached.cache is not None and streamed.cache is None
    for r in (0, 50, 99):
        np.testing.assert_array_equal(cached.get([r])[0], images[r])
    rows = np.array([5, 90, 3, 77])
    for a, b in zip(streamed.get(rows), [images[r] for r in rows]):
        np.testing.assert_array_equal(a, b)
    seen = {}
    for pos, imgs in streamed.batches(rows, 3):
        seen.update({int(p): im for p, im in zip(pos, imgs)})
    assert sorted(seen) == [0, 1, 2, 3]
    for p, r in enumerate(rows):
        np.testing.assert_array_equal(seen[p], images[r])


def test_paper_profile_finetunes_the_task_model_and_keeps_the_original_vaes():
    paper, cpu = load_profile("paper"), load_profile("cpu")
    for m in ("coreset", "learnloss", "alfamix", "tavaal"):
        sel = registry.get(m, **paper.method_options(m))
        assert sel.options.task_model == "finetune" and sel.options.task_recipe == "al_deit_round"
        r = sel.config()["task_recipe_settings"]
        assert (r["optimizer"], r["lr"], r["momentum"], r["weight_decay"], r["batch_size"], r["epochs"],
                r["schedule"], r["image_size"]) == ("sgd", 0.001, 0.9, 0.0001, 512, 1000, "cosine", 224)
        assert registry.get(m, **cpu.method_options(m)).options.task_model == "head"
    a = registry.get("alfamix", **paper.method_options("alfamix")).options
    assert (a.alpha_mode, a.alpha_cap) == ("learned", 0.03125)
    for m in ("vaal", "tavaal"):  # the original VAE: width 128 (128-256-512-1024), 100 epochs, as the defaults
        o = registry.get(m, **paper.method_options(m)).options
        d = registry.get(m).options
        assert (o.vae_width, o.vae_epochs, o.latent_dim, o.vae_batch_size) == (128, 100.0, 32, 128)
        assert (d.vae_width, d.vae_epochs) == (o.vae_width, o.vae_epochs)


def test_reports_see_the_task_model_and_a_profile_can_scale_the_round_recipe():
    from bench_suite.options import departures

    paper, cpu = load_profile("paper"), load_profile("cpu")
    for m in ("coreset", "learnloss", "alfamix", "tavaal", "vaal"):
        assert departures(registry.get(m, **paper.method_options(m)).options) == []  # the paper's settings
    for m in ("coreset", "learnloss", "alfamix", "tavaal"):  # the head is the cpu profile's departure
        assert ("task_model", "head", "finetune") in departures(registry.get(m, **cpu.method_options(m)).options)
    # a trimmed profile scales the round recipe through the method's options (task_recipe_fields / task_epochs)
    sel = registry.get("coreset", task_model="finetune", task_recipe_fields={"image_size": 32, "batch_size": 8},
                       task_epochs=2)
    r = sel.config()["task_recipe_settings"]
    assert (r["image_size"], r["batch_size"], r["epochs"], r["lr"]) == (32, 8, 2, 0.001)
    with pytest.raises(BadInputError, match="no_such_field"):
        registry.get("coreset", task_model="finetune", task_recipe_fields={"no_such_field": 1}).config()
