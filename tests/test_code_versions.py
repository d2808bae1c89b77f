"""The version constants in the cell and feature keys stand for their source: when the code behind one
changes, the constant must be bumped (if numbers can change) and the record below updated.

Each unit (a selection method, a recipe kind, feature extraction, the cell bookkeeping) is recorded in
``tests/code_versions.json`` with its version and a digest of its source files (their syntax trees without
docstrings and comments, so prose edits do not count). When this test fails:

1. if the change can change a selection / a metric / a feature, bump the unit's version
   (``Selector.version``, ``finetune.recipes.KIND_VERSIONS``, ``extract.EXTRACT_VERSION``,
   ``tables.cells.CELL_VERSION``); then cached cells are recomputed on the next run;
2. record the new state: ``UPDATE_CODE_VERSIONS=1 .venv/bin/python -m pytest tests/test_code_versions.py``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
from pathlib import Path

from bench_suite import extract
from bench_suite.finetune.recipes import KIND_VERSIONS
from bench_suite.methods import registry
from bench_suite.tables import cells

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("code_versions.json")


def source_digest(paths, root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for path in sorted(set(paths)):
        tree = ast.parse(Path(path).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(str(Path(path).relative_to(root)).encode() + ast.dump(tree).encode())
    return h.hexdigest()[:16]


def _package_closure(module: str) -> list[Path]:
    """The module's file and every module of its own package that it imports, transitively."""
    package = module.rsplit(".", 1)[0]
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / (name.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package + "."):
                todo.append(node.module)
    return [ROOT / (n.replace(".", "/") + ".py") for n in seen]


def units() -> dict[str, dict]:
    out = {}
    for name in registry.names():
        cls = registry.selector_class(name)
        out[f"method:{name}"] = {"version": cls.version, "source": source_digest(_package_closure(cls.__module__))}
    ft = [p for p in (ROOT / "bench_suite" / "finetune").glob("*.py") if p.name not in ("linear_probe.py", "__init__.py")]
    files = {"linear_probe": [ROOT / "bench_suite/finetune/linear_probe.py"], "finetune": ft, "seg_finetune": ft}
    for kind, version in KIND_VERSIONS.items():
        out[f"recipe:{kind}"] = {"version": version, "source": source_digest(files[kind])}
    out["extract"] = {"version": extract.EXTRACT_VERSION, "source": source_digest(
        [ROOT / "bench_suite/extract.py", ROOT / "bench_suite/encoders/base.py", ROOT / "bench_suite/data/sources.py",
         *(ROOT / "bench_suite/encoders/models").glob("*.py")])}
    out["cell"] = {"version": cells.CELL_VERSION, "source": source_digest(
        [ROOT / "bench_suite/tables/cells.py", ROOT / "bench_suite/metrics.py", ROOT / "bench_suite/methods/selection.py"])}
    return out


def test_versions_match_their_source():
    now = units()
    if os.environ.get("UPDATE_CODE_VERSIONS"):
        RECORD.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(RECORD.read_text())
    problems = []
    for unit, state in sorted(now.items()):
        old = recorded.get(unit)
        if old == state:
            continue
        if old is None:
            problems.append(f"{unit} is new")
        elif old["source"] != state["source"] and old["version"] == state["version"]:
            problems.append(f"{unit}: its source changed but its version is still {state['version']} (bump it if "
                            "its numbers can change)")
        else:
            problems.append(f"{unit}: version {old['version']} -> {state['version']}")
    problems += [f"{unit} is gone" for unit in sorted(set(recorded) - set(now))]
    assert not problems, ("; ".join(problems) + ". Then record the new state: UPDATE_CODE_VERSIONS=1 "
                          f"{Path(sys.executable).name} -m pytest tests/test_code_versions.py")


def test_digest_ignores_prose_but_not_code(tmp_path):
    texts = {"a": '"""Doc."""\nx = 1  # one\n', "b": '"""Another doc."""\n\n# a comment\nx = 1\n',
             "c": '"""Doc."""\nx = 2\n'}
    digest = {}
    for name, text in texts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.py").write_text(text)
        digest[name] = source_digest([tmp_path / name / "m.py"], root=tmp_path / name)
    assert digest["a"] == digest["b"] != digest["c"]
