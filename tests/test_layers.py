"""The package layout holds: no import cycles, and no lower layer imports a higher one.

Read from the source (``ast``), not by importing, so a lazy import inside a function
counts too: a cycle that only shows at run time is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "proxy"

# Each package and the packages it may import (besides itself and proxy.errors).
# Lower layers first: http/ is protocol only (no config, no identity), forwarding/ is policy
# over config and identity, server/ is the I/O that carries them out.
ALLOWED = {
    "config": set(),
    "pki": set(),
    "http": set(),
    "tls": {"config", "pki"},
    "forwarding": {"config", "http", "tls"},
    "check": {"config", "pki", "tls", "forwarding"},
    "ops": {"config", "tls"},
    "server": {"config", "pki", "tls", "http", "forwarding", "ops"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The proxy modules ``name`` imports (``from proxy.x import y`` counts ``proxy.x.y``
    when that is a module, else ``proxy.x``)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("proxy"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("proxy"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in modules else base)
    return {module for module in out if module in modules and module != name}


MODULES = _modules()
GRAPH = {name: _imports(path, name, MODULES) for name, path in MODULES.items()}


def test_no_import_cycles() -> None:
    cycles = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if target.rpartition(".")[0] == module or module.rpartition(".")[0] == target:
                continue  # a package and its own modules (``__init__`` re-exports)
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = set()
    for module, targets in GRAPH.items():
        if not module.startswith(f"proxy.{package}.") and module != f"proxy.{package}":
            continue
        for target in targets:
            parts = target.split(".")
            other = parts[1] if len(parts) > 1 else ""
            if other in (package, "errors", "") or other in ALLOWED[package]:
                continue
            wrong.add(f"{module} imports {target}")
    assert sorted(wrong) == []


def test_the_engine_interface_imports_no_engine() -> None:
    assert not {"proxy.http.h11_engine", "proxy.http.httptools_engine"} & GRAPH["proxy.http.engine"]
