"""Selection methods, the core half: the Selection type, the Selector base class and the registry.

The methods themselves are plug-ins (``bench_suite.activeft``, ``baselines/``) found through the
``bench_suite.methods`` entry-point group; nothing here imports them.
"""

from bench_suite.methods.base import NoOptions, Pool, Selector
from bench_suite.methods.registry import get, label, names, register, selector_class
from bench_suite.methods.run import run_selection
from bench_suite.methods.selection import Oracle, Selection, budget_from_ratio, check_budget

__all__ = ["NoOptions", "Oracle", "Pool", "Selection", "Selector", "budget_from_ratio", "check_budget", "get", "label",
           "names", "register", "run_selection", "selector_class"]
