"""Profiles: the settings of a whole run as data. ``cpu`` is the embedded default; ``paper`` the paper's."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from bench_suite.errors import BadInputError, MissingDataError, unknown


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str) -> dict:
    """A built-in profile by name, or a YAML file by path."""
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
        prof = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInputError(f"profile {name_or_path} is not valid YAML: {exc}") from exc
    for key in ("name", "encoder", "datasets", "tables", "recipes", "seeds"):
        if key not in prof:
            raise BadInputError(f"profile {name_or_path} lacks the key {key!r}")
    return prof
