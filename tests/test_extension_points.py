"""Each extension point takes one file: a toy method, dataset, encoder and table, each written as one new file
into its package, are discovered by their registries and run end to end through ``bench_suite/run.py`` with a
profile that names them. Nothing else in the tree is edited; the files are removed afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from bench_suite.data.registry import REGISTRY as DATASETS
from bench_suite.encoders.registry import REGISTRY as ENCODERS
from bench_suite.methods.registry import REGISTRY as METHODS
from bench_suite.tables.registry import REGISTRY as TABLES

ROOT = Path(__file__).resolve().parents[1]
TAG = uuid.uuid4().hex[:8]

TOY_METHOD = f'''
"""A toy method (test only): every k-th row of the pool."""
import numpy as np

from bench_suite.methods import Pool, Selector, register


@register
class EveryKth(Selector):
    name = "toy_method_{TAG}"
    label = "Toy every-k-th"
    description = "test toy"

    def choose(self, pool: Pool):
        return np.linspace(0, pool.n - 1, pool.budget).round().astype(np.int64), {{"k": pool.n // pool.budget}}
'''

TOY_DATASET = f'''
"""A toy dataset (test only): 8x8 grey images, bright (class 1) or dark (class 0), with noise."""
import numpy as np

from bench_suite.data.registry import DatasetSpec, RawSplit, register


def _load(split, source):
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 200 if split == "train" else 60
    labels = rng.integers(0, 2, n).astype(np.int64)
    images = np.clip(rng.normal(80 + 100 * labels[:, None, None], 30, (n, 8, 8)), 0, 255).astype(np.uint8)
    return RawSplit(images, labels, ["dark", "bright"])


register(DatasetSpec("toy_data_{TAG}", "test toy", ("train", "test"), _load, label="Toy data"))
'''

TOY_ENCODER = f'''
"""A toy encoder (test only): a fixed random 3x3 convolution and global average pooling."""
import torch
import torch.nn as nn

from bench_suite.encoders.base import Encoder
from bench_suite.encoders.registry import EncoderSpec, register


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward_features(self, x):
        return torch.relu(self.conv(x))


def build(image_size, weights=None, cache_dir=None, device="cpu"):
    return Encoder(name="toy_enc_{TAG}", arch="toy", model=_Net(), kind="cnn", image_size=image_size,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), default_pooling="gap", dims={{"gap": 16}},
                   meta={{"note": "test toy"}}, device=device)


register(EncoderSpec("toy_enc_{TAG}", "toy", build, 8, "gap", {{"gap": 16}}, "none", "test toy", True))
'''

TOY_TABLE = f'''
"""A toy table (test only): the grid of its profile entry, top-1 per cell."""
from bench_suite import report
from bench_suite.tables import grid
from bench_suite.tables.registry import TableSpec, register

NAME = "toy{TAG}"


def markdown(profile, prov, out):
    head = grid.header(profile, NAME, out["cells"])
    return "\\n".join(["# Toy table\\n", report.markdown_table(head, grid.metric_rows(profile, NAME, out["cells"],
                                                                                     grid.top1))])


register(TableSpec(NAME, "toy", grid.runner(NAME), markdown))
'''

PROFILE = f'''
name: toy
scaled_down: true
description: test toy
encoder: {{name: toy_enc_{TAG}, image_size: 8, pooling: gap}}
extraction: {{batch_size: 64}}
seeds: [0]
datasets:
  toy_data_{TAG}:
    pool: {{split: train}}
    test: {{split: test}}
recipes:
  linear_probe: {{kind: linear_probe, C: 1.0, max_iter: 300}}
methods: {{}}
tables:
  toy{TAG}:
    recipe: linear_probe
    methods: [toy_method_{TAG}, random]
    cells:
      toy_data_{TAG}: [0.1]
'''

FILES = {
    ROOT / "baselines" / f"toy_method_{TAG}.py": TOY_METHOD,
    ROOT / "bench_suite" / "data" / "sets" / f"toy_data_{TAG}.py": TOY_DATASET,
    ROOT / "bench_suite" / "encoders" / "models" / f"toy_enc_{TAG}.py": TOY_ENCODER,
    ROOT / "bench_suite" / "tables" / f"toy{TAG}.py": TOY_TABLE,
}


@pytest.fixture
def toys():
    try:
        for path, text in FILES.items():
            path.write_text(textwrap.dedent(text).lstrip())
        yield
    finally:
        for path in FILES:
            path.unlink(missing_ok=True)
        for reg, name in ((METHODS, f"toy_method_{TAG}"), (DATASETS, f"toy_data_{TAG}"),
                          (ENCODERS, f"toy_enc_{TAG}"), (TABLES, f"toy{TAG}")):
            reg.unregister(name)


def test_each_kind_is_one_file(toys):
    for reg, name in ((METHODS, f"toy_method_{TAG}"), (DATASETS, f"toy_data_{TAG}"), (ENCODERS, f"toy_enc_{TAG}"),
                      (TABLES, f"toy{TAG}")):
        assert name not in reg._items
        reg.discover(force=True)
        assert name in reg.names(), reg.kind
    assert METHODS.get(f"toy_method_{TAG}").label == "Toy every-k-th"


@pytest.mark.slow
def test_toys_run_end_to_end_through_run_py(toys, tmp_path):
    profile = tmp_path / "toy.yaml"
    profile.write_text(PROFILE)
    res = subprocess.run([sys.executable, str(ROOT / "bench_suite" / "run.py"), "--table", f"toy{TAG}", "--profile",
                          str(profile), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "out" / f"tabletoy{TAG}.md").read_text()
    assert "Toy every-k-th" in md and "Random" in md and "Toy data 10% (B=20)" in md
    cells = json.loads((tmp_path / "out" / f"tabletoy{TAG}.json").read_text())["cells"]
    toy = next(c for c in cells if c["method"] == f"toy_method_{TAG}")
    assert toy["budget"] == 20 and toy["selection_info"]["k"] == 10
    assert 50.0 <= toy["top1"] <= 100.0  # bright vs dark is easy: the toy encoder and probe really ran
