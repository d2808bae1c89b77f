"""One registry shape for every extension point: selection methods, datasets, encoders and tables.

Each kind names an entry-point group (``bench_suite.methods``, ``bench_suite.datasets``,
``bench_suite.encoders``, ``bench_suite.tables``, declared in ``pyproject.toml``). Each entry point names a
package; discovery imports every public module of it (``pkgutil``), and a module adds itself by calling
``REGISTRY.register(item)`` (or using it as a class decorator). So adding a method, a dataset, an encoder or
a table is one file in one of those packages, and an installed third-party package can add its own by
declaring an entry point in the same group.

Why entry points rather than imports: the registries are core, the selection methods are plug-ins built on
the core (``bench_suite.activeft``, ``baselines``); the core must never import the layer above it, so it
finds them by declared name. When the project runs from a source tree that is not installed
(``PYTHONPATH=.``), the groups are read from the ``pyproject.toml`` beside the package instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil
import tomllib
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from bench_suite.errors import unknown

log = logging.getLogger(__name__)

T = TypeVar("T")
_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def entry_point_packages(group: str) -> list[str]:
    """The module names declared for ``group``: installed metadata first, else the source tree's pyproject."""
    names = [ep.value for ep in importlib.metadata.entry_points(group=group)]
    if names:
        return sorted(set(names), key=names.index)
    if _PYPROJECT.exists():
        data = tomllib.loads(_PYPROJECT.read_text())
        return list(data.get("project", {}).get("entry-points", {}).get(group, {}).values())
    return []


def import_package_modules(package: str) -> None:
    """Import ``package`` and every public (not underscore-prefixed) module directly inside it."""
    pkg = importlib.import_module(package)
    for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{package}.{mod.name}")


class Registry(Generic[T]):
    """Name -> item (a class or a spec object with a ``name``), filled by the modules of a plug-in group."""

    def __init__(self, kind: str, group: str, key: Callable[[T], str] = lambda item: item.name):
        self.kind, self.group, self._key = kind, group, key
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, item: T) -> T:
        """Add ``item``; usable as a class decorator. The same name twice (a different item) is an error."""
        name = self._key(item)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} {item!r} has no name")
        old = self._items.get(name)
        if old is not None and old is not item and getattr(old, "__qualname__", None) != getattr(item, "__qualname__", 0):
            raise ValueError(f"{self.kind} name {name!r} registered twice ({old!r} and {item!r})")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that add a temporary toy take it out again)."""
        self._items.pop(name, None)

    def discover(self, force: bool = False) -> None:
        if self._discovered and not force:
            return
        self._discovered = True
        for package in entry_point_packages(self.group):
            import_package_modules(package)

    def names(self) -> list[str]:
        self.discover()
        return list(self._items)

    def get(self, name: str) -> T:
        self.discover()
        if name not in self._items:
            raise unknown(self.kind, name, self._items)
        return self._items[name]

    def items(self) -> Iterator[tuple[str, T]]:
        self.discover()
        return iter(list(self._items.items()))

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._items

