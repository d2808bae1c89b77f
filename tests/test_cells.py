"""A table cell's cache key covers everything that decides its number; cells are claimed with locks."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from bench_suite import extract, locks
from bench_suite.digest import json_digest
from bench_suite.errors import BadInputError
from bench_suite.finetune import recipes
from bench_suite.methods import registry
from bench_suite.profiles import parse_profile
from bench_suite.store import FeatureStore
from bench_suite.tables import cells
from bench_suite.tables.common import Context

PROFILE = {
    "name": "key-test", "encoder": {"name": "efficientnet_lite0", "image_size": 64, "pooling": "gap"}, "seeds": [0],
    "datasets": {"digits": {"pool": {"split": "train"}, "test": {"split": "test"}}},
    "recipes": {"linear_probe": {"kind": "linear_probe", "C": 10.0, "max_iter": 500}},
    "methods": {"activeft": {"iters": 100}},
    "tables": {"1": {"recipe": "linear_probe", "methods": ["activeft"], "cells": {"digits": [0.03]}}},
}
CELL = {"dataset": "digits", "ratio": 0.03, "method": "activeft", "seed": 0, "method_config": {"iters": 100},
        "recipe": "linear_probe", "variant": "ActiveFT"}


def _store(fingerprint: str) -> FeatureStore:
    rng = np.random.default_rng(0)
    return FeatureStore.from_array(rng.normal(size=(20, 4)).astype(np.float32), normalize=True,
                                   meta={"fingerprint": fingerprint})


def key(profile=PROFILE, cell=CELL, train="pool-fp", test="test-fp") -> str:
    ctx = Context(parse_profile(copy.deepcopy(profile), "test"), None, None, None)
    return json_digest(cells.cell_key(ctx, cell, _store(train), _store(test)))


def test_each_part_of_the_key_changes_it(monkeypatch):
    base = key()
    changed_recipe = copy.deepcopy(PROFILE)
    changed_recipe["recipes"]["linear_probe"]["C"] = 0.01
    variants = {
        "pool features (shards, subset, encoder, weights, pooling, image size)": key(train="other"),
        "test features": key(test="other"),
        "method option": key(cell={**CELL, "method_config": {"iters": 101}}),
        "method": key(cell={**CELL, "method": "random", "method_config": {}}),
        "recipe setting": key(profile=changed_recipe),
        "seed": key(cell={**CELL, "seed": 1}),
        "ratio": key(cell={**CELL, "ratio": 0.04}),
    }
    monkeypatch.setattr(registry.selector_class("activeft"), "version", 99)
    variants["method version"] = key()
    monkeypatch.undo()
    monkeypatch.setitem(recipes.KIND_VERSIONS, "linear_probe", 99)
    variants["recipe version"] = key()
    monkeypatch.undo()
    monkeypatch.setattr(cells, "CELL_VERSION", 99)
    variants["cell version"] = key()
    monkeypatch.undo()
    assert {name: v != base for name, v in variants.items()} == {name: True for name in variants}
    assert key() == base


def test_options_are_resolved_before_keying():
    """Writing out a default, or leaving it out, is the same cell (the fully resolved options are keyed)."""
    default_lr = registry.get("activeft").options.lr
    assert key(cell={**CELL, "method_config": {"iters": 100, "lr": default_lr}}) == key()
    assert key(cell={**CELL, "variant": "another row label"}) == key()


def test_feature_fingerprint_covers_encoder_weights_pooling_size_and_code(monkeypatch):
    manifest = {"checksum": "abc"}
    enc = {"name": "efficientnet_lite0", "image_size": 112, "weights": {"sha256": "w1"}}
    base = extract._fingerprint(manifest, enc, "gap")
    changed = [extract._fingerprint({"checksum": "abd"}, enc, "gap"),
               extract._fingerprint(manifest, {**enc, "image_size": 224}, "gap"),
               extract._fingerprint(manifest, {**enc, "weights": {"sha256": "w2"}}, "gap"),
               extract._fingerprint(manifest, enc, "cls")]
    monkeypatch.setattr(extract, "EXTRACT_VERSION", 99)
    changed.append(extract._fingerprint(manifest, enc, "gap"))
    assert all(c != base for c in changed) and len(set(changed)) == len(changed)


def test_lock_is_exclusive_and_a_dead_owner_is_taken_over(tmp_path):
    lock = tmp_path / "cell.lock"
    assert locks.try_lock(lock)
    assert not locks.try_lock(lock)  # held by this (live) process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f'{{"pid": {int(dead.stdout)}, "host": "{os.uname().nodename}", "since": {time.time()}}}')
    assert locks.try_lock(lock)  # its process is gone: taken over
    assert f'"pid": {os.getpid()}' in lock.read_text()


@pytest.mark.parametrize("bad", ["{not json", ""])
def test_a_damaged_cell_result_is_an_error_not_a_number(tmp_path, bad):
    path = tmp_path / "cell.json"
    path.write_text(bad)
    with pytest.raises(BadInputError, match="damaged"):
        cells._load(path, CELL)


def test_a_rank_claims_the_budgets_that_share_work_together():
    """Active-learning methods and BiLAF reuse work between budgets of one pool and seed: one claim covers them;
    any other method's cells are claimed one by one (finer work for the ranks to share)."""
    def unit(method, ratio, seed=0):
        return cells._claim_unit({"dataset": "digits", "method": method, "method_config": {}, "seed": seed,
                                  "ratio": ratio})

    for method in ("coreset", "vaal", "bilaf"):
        assert unit(method, 0.01) == unit(method, 0.05) != unit(method, 0.05, seed=1), method
    for method in ("activeft", "kmeans", "random"):
        assert unit(method, 0.01) != unit(method, 0.05), method
