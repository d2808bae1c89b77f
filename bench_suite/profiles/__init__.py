"""Profiles: the settings of a whole run as typed data. ``cpu`` is the embedded default; ``paper`` the paper's.

A profile is YAML, checked against the dataclasses below when it is loaded: a missing or misspelt key or a
value of the wrong type is a one-line error naming the key's path (``profile cpu: tables.1.cells.mnist[0]
must be a number, got 'x'``). What the names refer to (methods, datasets, encoders, recipes) is checked by
``bench_suite/run.py`` against the registries before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from bench_suite.errors import BadInputError, MissingDataError, unknown
from bench_suite.options import coerce, opt


@dataclass
class EncoderRef:
    """An encoder of the registry, with its image size, pooling and (optionally) a local weights file."""

    name: str
    image_size: int | None = opt(None, minimum=1)
    pooling: str | None = opt(None, choices=("cls", "cls+mean", "gap", None))
    weights: str | None = None


@dataclass
class SplitSettings:
    """Which split of a dataset makes a pool or a test set, and how it is subsampled and sharded."""

    split: str = "train"
    limit: int | None = opt(None, minimum=1)  # a seeded random subset of this many samples
    subset_seed: int = 0
    shard_size: int = opt(1000, minimum=1)


@dataclass
class DatasetSettings:
    pool: SplitSettings
    test: SplitSettings
    label: str = ""  # overrides the dataset's own label in reports
    role: str = ""  # which of the paper's datasets it stands in for
    why: str = ""
    al: dict = field(default_factory=dict)  # the active-learning protocol on this pool (init_ratio, ...)
    # this pool's options of a method, over the profile's (ImageNet: ActiveFT's M and T, Sec. 3.5)
    methods: dict[str, dict] = field(default_factory=dict)


@dataclass
class MethodRow:
    """A row of a table: a registry method, or a variant of one (``config`` over the profile's options)."""

    method: str
    label: str = ""
    config: dict = field(default_factory=dict)


@dataclass
class EncoderVariant:
    label: str
    encoder: EncoderRef
    recipe: str | None = None  # this encoder's finetuning recipe (default: the table's)


@dataclass
class TableSettings:
    """A table's grid: rows (methods), columns (dataset -> ratios), seeds, the evaluation recipe."""

    methods: list[MethodRow]
    cells: dict[str, list[float]]
    recipe: str | None = None
    recipe_by_dataset: dict[str, str] = field(default_factory=dict)
    seeds: list[int] | None = None  # default: the profile's
    encoder: EncoderRef | None = None  # default: the profile's
    encoders: list[EncoderVariant] = field(default_factory=list)  # Table 4: one sub-table per encoder
    note: str = ""

    def validate(self) -> str | None:
        for dataset, ratios in self.cells.items():
            for r in ratios:
                if not 0 < r <= 1:
                    return f"ratio {r} for {dataset} is not in (0, 1] (budget > pool)"
        return None


@dataclass
class Extraction:
    batch_size: int = opt(64, minimum=1)


@dataclass
class Profile:
    name: str
    encoder: EncoderRef
    seeds: list[int]
    datasets: dict[str, DatasetSettings]
    tables: dict[str, TableSettings]
    description: str = ""
    scaled_down: bool = True  # reports say "not the paper's setting" unless this is false
    extraction: Extraction = field(default_factory=Extraction)
    recipes: dict[str, dict] = field(default_factory=dict)  # overrides of the recipe catalogue, and new ones
    methods: dict[str, dict] = field(default_factory=dict)  # each method's options in this profile

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self, name: str) -> TableSettings:
        if name not in self.tables:
            raise BadInputError(f"profile {self.name} has no settings for table {name}")
        return self.tables[name]

    def dataset(self, name: str) -> DatasetSettings:
        if name not in self.datasets:
            raise unknown(f"dataset of profile {self.name}", name, self.datasets)
        return self.datasets[name]

    def encoder_of(self, table: str) -> EncoderRef:
        return self.table(table).encoder or self.encoder

    def seeds_of(self, table: str) -> list[int]:
        seeds = self.table(table).seeds
        return list(self.seeds if seeds is None else seeds)

    def with_encoder(self, table: str, encoder: EncoderRef, recipe: str | None = None) -> "Profile":
        """This profile with ``table``'s encoder set to ``encoder`` (one of Table 4's sub-tables), and its recipe
        when given (the paper finetunes ResNet-50 with mmclassification's recipe, DeiT-S with DeiT's)."""
        t = self.table(table)
        t = dataclasses.replace(t, encoder=encoder, recipe=recipe or t.recipe,
                                recipe_by_dataset={} if recipe else t.recipe_by_dataset)
        return dataclasses.replace(self, tables={**self.tables, table: t})

    def method_options(self, method: str, variant: dict | None = None, dataset: str | None = None) -> dict:
        """The profile's options of ``method``, then the dataset's (``datasets.D.methods``), then a table row's
        ``variant`` on top."""
        per_dataset = self.dataset(dataset).methods.get(method) if dataset is not None else None
        return {**(self.methods.get(method) or {}), **(per_dataset or {}), **(variant or {})}


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def _normalise(data: dict) -> dict:
    """YAML shorthands: a table row may be just a method name; table names may be unquoted numbers."""
    tables = data.get("tables")
    if isinstance(tables, dict):
        data["tables"] = {str(k): ({**v, "methods": [{"method": m} if isinstance(m, str) else m
                                                      for m in v.get("methods") or []]}
                                   if isinstance(v, dict) else v) for k, v in tables.items()}
    return data


def parse_profile(data, where: str) -> Profile:
    if not isinstance(data, dict):
        raise BadInputError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    return coerce(Profile, _normalise(dict(data)), where, noun="")


def _deep_merge(base, over):
    """``over`` on ``base``: mappings merge key by key, anything else (lists, scalars) replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _deep_merge(base.get(k), v) if k in base else v for k, v in over.items()}}
    return over


def _extend(data, where: str, seen: tuple = ()) -> dict:
    """``extends: NAME_OR_PATH``: this file's keys deep-merged over that profile's. The result is
    ``scaled_down`` unless this file says ``scaled_down: false`` (so a trimmed copy of the paper profile is
    never reported as the paper's setting), and is named after this file unless it sets ``name``."""
    if not isinstance(data, dict) or "extends" not in data:
        return data
    data = dict(data)
    base_name = str(data.pop("extends"))
    if base_name in seen:
        raise BadInputError(f"{where}: extends {base_name!r} in a cycle ({' -> '.join(seen + (base_name,))})")
    base = _extend(_read_profile(base_name), f"profile {base_name}", seen + (base_name,))
    if not isinstance(base, dict):
        raise BadInputError(f"profile {base_name}: expected a mapping at the top level")
    return {**_deep_merge(base, data), "scaled_down": data.get("scaled_down", True)}


def _read_profile(name_or_path: str):
    """The YAML of a built-in profile by name, or of a file by path (not yet checked)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise MissingDataError(f"profile file not found: {path}")
        text = path.read_text()
    else:
        if name_or_path not in profile_names():
            raise unknown("profile", name_or_path, profile_names())
        text = resources.files(__package__).joinpath(f"{name_or_path}.yaml").read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInputError(f"profile {name_or_path} is not valid YAML: {exc}") from exc


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a YAML file by path (which may ``extends:`` another), checked."""
    data = _read_profile(name_or_path)
    if isinstance(data, dict) and "extends" in data and "name" not in data:
        data = {**data, "name": Path(name_or_path).stem}
    return parse_profile(_extend(data, f"profile {name_or_path}"), f"profile {name_or_path}")
