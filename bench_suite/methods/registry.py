"""The one registry of selection methods (ActiveFT and every rival), filled by plug-in packages.

Adding a method is one file: a module in ``baselines/`` (or in any package declared under the
``bench_suite.methods`` entry-point group) whose ``Selector`` subclass is decorated with ``@register``.
ActiveFT (``bench_suite.activeft``) registers exactly the same way; this module never imports a method.
"""

from __future__ import annotations

from bench_suite.plugins import Registry

REGISTRY: Registry[type] = Registry("selection method", "bench_suite.methods")


def register(cls):
    """Class decorator: the class needs ``name``, ``label``, ``description``, ``label_free`` and ``select``."""
    for attr in ("name", "label", "description", "label_free", "select"):
        if not hasattr(cls, attr):
            raise TypeError(f"selector {cls.__name__} lacks {attr!r}")
    return REGISTRY.register(cls)


def names() -> list[str]:
    return sorted(REGISTRY.names())


def selector_class(name: str) -> type:
    return REGISTRY.get(name)


def get(name: str, **options):
    """An instance of the method called ``name`` with its options (checked by the method's Options)."""
    return selector_class(name)(**options)


def label(name: str) -> str:
    """The method's display label (the paper's row name where it has one); an unknown name is kept as is."""
    return REGISTRY.get(name).label if name in REGISTRY else name
