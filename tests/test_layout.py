"""The folders are the pipeline's stages and imports point upstream only. Every .py file is parsed
(never imported): imports inside functions and `if TYPE_CHECKING:` blocks count too."""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# top-level folder -> the package it installs as (pyproject's package-dir)
FOLDERS = {
    "qexport": "qexport",
    "calib": "qexport.calib",
    "exporter": "qexport.exporter",
    "passes": "qexport.passes",
    "targets": "qexport.targets",
    "verification": "qexport.verification",
}
TORCH = ("torch", "diffusers")
RUNTIME_QEXPORT = ("qexport.runtime", "qexport.errors", "qexport.progress", "qexport.tokenizer", "qexport.schema")
# the edge: numpy + onnxruntime (with its QNN execution provider plugin, the qnn extra) + tokenizers, and
# pydantic for the manifest schema (qexport.schema)
RUNTIME_THIRD_PARTY = ("numpy", "onnx", "onnxruntime", "onnxruntime_qnn", "tokenizers", "pydantic", "pydantic_core")


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    module: str  # absolute module name the statement imports

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module}"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


FILES = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))
MODULES = {module_name(p): p for p in FILES}


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def imports(path: Path, source: str | None = None) -> list[Import]:
    """Every module the file imports, wherever the statement is (importlib.import_module of a
    literal too). `from pkg import name` counts as importing pkg.name when that is one of the
    project's modules, else pkg."""
    rel = path.relative_to(ROOT).as_posix()
    name = module_name(path)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=rel)):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(rel, node.lineno, sub if sub in MODULES else base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(Import(rel, node.lineno, node.args[0].value))
    return list(dict.fromkeys(found))


def files_under(folder: str) -> list[Path]:
    return [p for p in FILES if p.relative_to(ROOT).as_posix().startswith(folder + "/")]


def runtime_may_import(module: str) -> bool:
    top = module.split(".")[0]
    if top in TORCH:
        return False
    if top == "qexport":
        return module == "qexport" or within(module, *RUNTIME_QEXPORT)
    return top == "__future__" or top in sys.stdlib_module_names or top in RUNTIME_THIRD_PARTY


def reached(start: list[str], allowed: Callable[[str], bool]) -> list[str]:
    """The imports outside `allowed` made by the start modules or, transitively, by the project
    modules they import (importing a.b.c runs a and a.b too), each with the start's import it
    came through. A disallowed import is reported, not followed."""
    seen: set[str] = set()
    todo: list[tuple[str, Import | None]] = [(m, None) for m in start]
    bad = []
    while todo:
        module, via = todo.pop()
        if module in seen or module not in MODULES:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [(".".join(parts[:k]), via) for k in range(1, len(parts))]
        for i in imports(MODULES[module]):
            if not allowed(i.module):
                bad.append(f"{i} (through {via})" if via else str(i))
            else:
                todo.append((i.module, via or i))
    return bad


# (folder, forbidden packages, why)
RULES = [
    (
        "targets",
        ("qexport.calib", "qexport.exporter", "qexport.passes", "qexport.verification"),
        "targets/ is plain data",
    ),
    ("calib", ("qexport.exporter", "qexport.passes", "qexport.verification"), "calib/ precedes passes and export"),
    ("passes", ("qexport.exporter", "qexport.verification"), "passes/ precede export"),
    (
        "exporter",
        ("qexport.verification", "qexport.demo", "qexport.sweep", "qexport.cli"),
        "exporter/ precedes verification and the application layer",
    ),
    ("verification", ("qexport.demo", "qexport.sweep", "qexport.cli"), "verification/ precedes the application layer"),
]


def test_every_stage_is_scanned():
    for folder in FOLDERS:
        assert files_under(folder), f"no .py files under {folder}/"
    assert "qexport.runtime.loop" in MODULES and "qexport.verification.verify" in MODULES


@pytest.mark.parametrize(("folder", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_stage_imports_point_upstream(folder, forbidden, why):
    bad = [str(i) for p in files_under(folder) for i in imports(p) if within(i.module, *forbidden)]
    assert not bad, f"{why}; downstream imports:\n" + "\n".join(bad)


def test_runtime_imports_only_runtime_errors_progress_tokenizer():
    bad = [str(i) for p in files_under("qexport/runtime") for i in imports(p) if not runtime_may_import(i.module)]
    assert not bad, (
        "qexport/runtime/ may import only qexport.runtime.*, qexport.errors, qexport.progress, qexport.tokenizer, "
        "qexport.schema, the standard library, numpy, onnx, onnxruntime (and onnxruntime_qnn), tokenizers and "
        "pydantic (never torch or diffusers):\n" + "\n".join(bad)
    )


def test_runtime_reaches_no_torch_and_no_stage_through_qexport():
    """What qexport/runtime/ imports from qexport, and what those import in turn (with the packages
    that importing them runs), stays inside the runtime's allowance."""
    runtime = [m for m in MODULES if within(m, "qexport.runtime")]
    bad = reached(runtime, runtime_may_import)
    assert not bad, "qexport/runtime/ reaches outside its allowance:\n" + "\n".join(bad)


@pytest.mark.parametrize(("folder", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_stage_reaches_nothing_downstream_through_qexport(folder, forbidden, why):
    start = [module_name(p) for p in files_under(folder)]
    bad = reached(start, lambda module: not within(module, *forbidden))
    assert not bad, f"{why}; downstream imports reached through other modules:\n" + "\n".join(bad)


def test_the_checker_sees_nested_relative_and_type_checking_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from qexport.exporter.build import BuildConfig\n"
        "def f():\n    import torch\n    from . import loop\n    from ..verification import verify\n"
        "    importlib.import_module('diffusers')\n"
    )
    found = {i.module for i in imports(ROOT / "qexport" / "runtime" / "fake.py", source)}
    want = {"qexport.exporter.build", "torch", "qexport.runtime.loop", "qexport.verification.verify", "diffusers"}
    assert want <= found, found
    assert not runtime_may_import("torch") and not runtime_may_import("qexport.exporter.build")
    assert runtime_may_import("qexport.tokenizer") and runtime_may_import("onnxruntime")


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle among the project's modules, or [] (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_import_cycles_and_no_type_checking_imports():
    """No module reaches itself through imports (at module level, in functions or for type checking
    alike), and nothing hides an import behind TYPE_CHECKING."""
    graph = {}
    for name, path in MODULES.items():
        found = {i.module for i in imports(path)}
        # `from pkg import mod` of a package's own __init__ is not a cycle through the package
        graph[name] = {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))
    hidden = [p.relative_to(ROOT).as_posix() for p in FILES if "TYPE_CHECKING" in p.read_text()]
    assert hidden == [], hidden
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker finds one
