"""Imports flow one way: envs/ and algorithms/ are plain Python + torch (STYLE.md)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "raylign"
FORBIDDEN = ("ray", "vllm", "deepspeed", "raylign.orchestrator", "raylign.actors")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("folder", ["envs", "algorithms"])
def test_pure_layers_do_not_import_the_cluster(folder):
    files = sorted((PKG / folder).rglob("*.py"))
    assert files, f"raylign/{folder} has no modules"
    bad = [(f.name, name) for f in files for name in _imports(f)
           if any(name == m or name.startswith(m + ".") for m in FORBIDDEN)]
    assert bad == []


def test_actors_never_import_the_orchestrator():
    bad = [(f.name, n) for f in (PKG / "actors").rglob("*.py") for n in _imports(f) if n.startswith("raylign.orchestrator")]
    assert bad == []
