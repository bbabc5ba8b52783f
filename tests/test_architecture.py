"""The shape of the code: which modules import which (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The plugin manager imports the core's default hook implementations when it first loads, and
# those use the registry in turn: the one cycle allowed inside the core.
ALLOWED = {("peftcore.plugins", "peftcore.default_hooks")}


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside functions (not under TYPE_CHECKING)."""
    modules = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package
                subs = [
                    f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules
                ]
                targets = subs + ([node.module] if len(subs) < len(node.names) else [])
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from pkg.a import f\n")
    assert cycles(import_graph(pkg, "pkg")) == [["pkg.a", "pkg.b"]]


def test_the_core_has_no_import_cycle_but_the_registration_of_its_defaults():
    edges = import_graph(ROOT / "peftcore", "peftcore")
    for importer, imported in ALLOWED:
        assert imported in edges[importer], "the allowed edge is gone: drop it from ALLOWED"
        edges[importer].discard(imported)
    assert cycles(edges) == []


@pytest.mark.parametrize("plugin", sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "src").is_dir()))
def test_no_plugin_has_an_import_cycle(plugin):
    src = ROOT / "plugins" / plugin / "src"
    (package_dir,) = [p for p in src.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert cycles(import_graph(package_dir, package_dir.name)) == []


def test_lora_layers_use_the_fast_path_which_uses_the_kernels_never_back():
    edges = import_graph(ROOT / "plugins/peftcore-lora/src/peftcore_lora", "peftcore_lora")
    assert "peftcore_lora.fast" in edges["peftcore_lora.layer"]
    assert "peftcore_lora.kernels" in edges["peftcore_lora.fast"]
    assert "peftcore_lora.layer" not in edges["peftcore_lora.fast"] | edges["peftcore_lora.kernels"]
    assert "peftcore_lora.fast" not in edges["peftcore_lora.kernels"] | edges["peftcore_lora.kernels.triton_lora"]


METHOD_PACKAGES = ["peftcore-lora", "peftcore-ia3", "peftcore-adalora", "peftcore-prompt-tuning", "peftcore-fusion",
                   "peftcore-prefix-tuning", "peftcore-p-tuning"]


@pytest.mark.parametrize("plugin", METHOD_PACKAGES)
def test_method_packages_leave_quantised_layers_to_other_plugins(plugin):
    for path in (ROOT / "plugins" / plugin / "src").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in names if m.split(".")[0] == "bitsandbytes"}, path
