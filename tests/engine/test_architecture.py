"""The layering the engine relies on, read from the source: no import circle, the engine imports no
concrete method, methods import neither each other nor adapters, and the names of a family's
internals appear only in its adapter."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from vlmkit.registry import _BUILTIN_TARGETS

PACKAGE = Path(__file__).resolve().parents[2] / "vlmkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path, module_level: bool) -> set[str]:
    """vlmkit modules `path` imports (at import time only when `module_level`; never under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import) and (nested or not module_level):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and (nested or not module_level):
                for alias in child.names:  # `from package import submodule` imports the submodule
                    submodule = f"{child.module}.{alias.name}"
                    found.add(submodule if submodule in MODULES else child.module)
            visit(child, nested)

    visit(tree, True)
    return {name for name in found if name in MODULES}


def test_no_import_circle():
    graph = {name: imports(path, module_level=True) - {name} for name, path in MODULES.items()}
    done, stack = set(), []

    def walk(name):
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for other in graph[name]:
            walk(other)
        stack.pop()
        done.add(name)

    for name in graph:
        walk(name)


METHOD_MODULES = {target.split(":")[0] for target in _BUILTIN_TARGETS.values()}


def test_methods_are_registered_from_their_own_files():
    assert METHOD_MODULES and all(name in MODULES for name in METHOD_MODULES)


def test_the_engine_imports_no_concrete_method():
    for name, path in MODULES.items():
        if name.startswith("vlmkit.engine"):
            assert not imports(path, module_level=False) & METHOD_MODULES, name


def test_methods_import_neither_each_other_nor_adapters():
    for name in METHOD_MODULES:
        used = imports(MODULES[name], module_level=False)
        assert not (used & METHOD_MODULES) - {name}, name
        assert not any(other.startswith("vlmkit.adapters") for other in used), name


FAMILY_INTERNALS = re.compile(r"(?<!adapter\.)\b(embed_tokens|rotary_emb|rope_deltas|_attn_implementation)\b|\.norm\b(?!\()")


def test_family_internals_are_named_in_adapters_only():
    """The training recipes (vlmkit/train) build and train the shapes models themselves and are left out."""
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(("vlmkit.adapters", "vlmkit.train")):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FAMILY_INTERNALS.search(line.split("#")[0]):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert offenders == []
