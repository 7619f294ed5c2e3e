"""The package layout ARCHITECTURE.md describes: imports flow one way, with no cycle, and serving never reaches
training code."""

from __future__ import annotations

import ast
import tomllib
from functools import cache
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("aptp", "pruning", "router", "training", "server")
# What each layer may import from the project (a module may always import its own package). Listed from the
# bottom up: model surgery, then what describes and conditions a model, then routing, then how an image is made,
# then the two sides that use it, then the command that ties them together.
ALLOWED = {
    "aptp": set(),  # the package's own __init__
    "pruning": set(),
    "aptp.conditioning": {"pruning", "aptp.formats.files"},
    "aptp.decoding": {"pruning"},
    "aptp.sampling": {"aptp.conditioning"},
    "aptp.formats": {"pruning", "aptp.conditioning", "aptp.sampling"},
    "router": {"pruning", "aptp.conditioning", "aptp.formats"},
    "aptp.pipeline": {"pruning", "router", "aptp.conditioning", "aptp.decoding", "aptp.formats", "aptp.sampling"},
    "server": {
        "aptp.pipeline",
        "aptp.conditioning",
        "aptp.decoding",
        "aptp.formats",
        "aptp.sampling",
        "pruning",
        "router",
    },
    "training": {
        "pruning",
        "router",
        "aptp.pipeline",
        "aptp.conditioning",
        "aptp.decoding",
        "aptp.formats",
        "aptp.sampling",
    },
    "aptp.cli": set(PACKAGES),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_nodes(tree: ast.Module):
    """The nodes that run when the module is imported: not function or class bodies, not `if TYPE_CHECKING:`."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield from ast.walk(node)


@cache
def import_graph(module_level: bool = False) -> dict[str, set[str]]:
    """Project module -> the project modules it imports: everywhere (inside functions too), or with
    `module_level` only those that run at import time."""
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text())
        for node in _import_time_nodes(tree) if module_level else ast.walk(tree):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules}
        graph[name] = targets - {name}
    return graph


def _layer(module: str) -> str:
    return max((layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")), key=len)


def test_the_graph_covers_the_packages():
    graph = import_graph()
    assert {"aptp.pipeline", "aptp.sampling", "aptp.cli.main", "server.engine", "training.search"} <= graph.keys()
    assert "router.model" in graph["aptp.pipeline"]


def test_imports_have_no_cycle():
    """At import time. (Inside one package, two modules may call each other through a function-level import, as
    the architecture space and its MAC model do.)"""
    graph, done, path = import_graph(module_level=True), set(), []

    def visit(module: str) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_each_layer_imports_only_what_sits_below_it():
    wrong = []
    for module, targets in import_graph().items():
        layer = _layer(module)
        for target in targets:
            if _layer(target) != layer and not any(target == a or target.startswith(a + ".") for a in ALLOWED[layer]):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_serving_never_reaches_training_code():
    graph = import_graph()
    reached, todo = set(), [m for m in graph if m.startswith("server")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    assert not [m for m in reached if m.startswith("training")]
    assert "aptp.pipeline" in reached


def test_the_aptp_command_lives_in_the_core_package():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["aptp"] == "aptp.cli.main:main"


def test_no_training_code_reaches_the_held_out_paraphrase_set():
    """The paraphrase set measures phrasing never trained on: no training job imports it, directly or through
    another module (only evaluation, which scores models on it, does)."""
    graph = import_graph()
    jobs = [m for m in graph if m.startswith("training.") and not m.startswith("training.evaluation")]
    reached, todo = set(), list(jobs)
    while todo:
        module = todo.pop()
        if module not in reached and not module.startswith("training.evaluation"):
            reached.add(module)
            todo += graph[module]
    assert "training.evaluation.paraphrases" not in {t for m in reached for t in graph[m]}
