"""The one registry of selection methods (ActiveFT and every rival).

Adding a method is one file: put a module in ``baselines/`` that decorates its selector class with
``@register``; it is discovered automatically. ActiveFT lives in ``bench_suite.activeft`` and registers
itself the same way.
"""

from __future__ import annotations

import importlib
import pkgutil

from bench_suite.errors import unknown

_REGISTRY: dict[str, type] = {}
_DISCOVERED = False
_EXTRA_MODULES = ("bench_suite.activeft",)


def register(cls):
    """Class decorator: the class needs ``name``, ``description``, ``label_free`` and ``select``."""
    for attr in ("name", "description", "label_free", "select"):
        if not hasattr(cls, attr):
            raise TypeError(f"selector {cls.__name__} lacks {attr!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"selector name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import baselines

    for mod in pkgutil.iter_modules(baselines.__path__):
        if mod.name not in ("registry",) and not mod.name.startswith("_"):
            importlib.import_module(f"baselines.{mod.name}")
    for name in _EXTRA_MODULES:
        importlib.import_module(name)
    _DISCOVERED = True


def names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def describe() -> dict[str, str]:
    _discover()
    return {n: _REGISTRY[n].description for n in sorted(_REGISTRY)}


def get(name: str, **config):
    """Instantiate the selector called ``name`` with keyword config."""
    _discover()
    if name not in _REGISTRY:
        raise unknown("selection method", name, _REGISTRY)
    return _REGISTRY[name](**config)


def selector_class(name: str):
    _discover()
    if name not in _REGISTRY:
        raise unknown("selection method", name, _REGISTRY)
    return _REGISTRY[name]
