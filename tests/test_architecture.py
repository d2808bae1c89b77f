"""The layering, drawn from the source: imports only point down, no file imports another in a cycle.

Layers (ARCHITECTURE.md):
- core: everything in bench_suite/ that is not listed below (store, methods registry + base, runtime, data,
  encoders, options, profiles, metrics, ...);
- plug-ins: bench_suite/activeft/, bench_suite/finetune/, baselines/ -- they import only the core, and never
  each other (BiLAF reaches ActiveFT through the registry);
- orchestration: bench_suite/run.py, bench_suite/cli/, bench_suite/tables/, bench_suite/report.py,
  bench_suite/bench/, launchers/.

Every import statement counts, function-level ones included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench_suite", "baselines", "launchers")
PLUGINS = ("bench_suite.activeft", "bench_suite.finetune", "baselines")
ORCHESTRATION = ("bench_suite.run", "bench_suite.cli", "bench_suite.tables", "bench_suite.report", "bench_suite.bench",
                 "launchers")
LAYER_NAMES = {0: "core", 1: "plug-in", 2: "orchestration"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if not all(p.isidentifier() for p in parts):
                continue  # mmseg config files named like 'segmenter_vit-s_...' are data, not modules
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


MODULES = _modules()


def _within(name: str, prefixes) -> str | None:
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def layer(name: str) -> int:
    if _within(name, ORCHESTRATION):
        return 2
    if _within(name, PLUGINS):
        return 1
    return 0


def _resolve(importer: str, node) -> list[str]:
    """The project modules an import statement loads (``from pkg import mod`` -> pkg.mod)."""
    out = []
    if isinstance(node, ast.Import):
        out = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = importer if MODULES.get(importer, Path()).name == "__init__.py" else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{base}" if base else pkg
        for alias in node.names:
            full = f"{base}.{alias.name}"
            out.append(full if full in MODULES else base)
    return [m for m in out if m.split(".")[0] in PACKAGES and m in MODULES]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = {m for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for m in _resolve(name, node) if m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_the_project():
    graph = import_graph()
    assert len(graph) > 60
    assert "bench_suite.methods" in graph["baselines.random_pick"]  # `from bench_suite.methods import Selector`
    assert "bench_suite.data.sources" in graph["bench_suite.data.sets.mnist"]  # `from bench_suite.data import sources`
    assert "bench_suite.methods.registry" in graph["bench_suite.methods"]


def test_no_import_cycle_between_files():
    assert _cycles(import_graph()) == []


def test_imports_only_point_down():
    bad = [f"{src} ({LAYER_NAMES[layer(src)]}) imports {dst} ({LAYER_NAMES[layer(dst)]})"
           for src, dsts in import_graph().items() for dst in sorted(dsts) if layer(dst) > layer(src)]
    assert bad == []


def test_plugins_do_not_import_each_other():
    bad = [f"{src} imports {dst}" for src, dsts in import_graph().items() for dst in sorted(dsts)
           if layer(src) == layer(dst) == 1 and _within(src, PLUGINS) != _within(dst, PLUGINS)]
    assert bad == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_top_level_name_shadows_the_standard_library():
    """``accelerate launch bench_suite/run.py`` puts bench_suite/ first on sys.path: no module there may be
    named like a standard-library module (bench_suite/select.py once shadowed ``select``)."""
    names = {p.stem for p in (ROOT / "bench_suite").glob("*.py")} | {p.name for p in (ROOT / "bench_suite").iterdir()
                                                                    if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(names & set(sys.stdlib_module_names)) == []
