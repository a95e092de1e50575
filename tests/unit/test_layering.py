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


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _raylign_imports(path: Path) -> set[str]:
    """raylign modules ``path`` imports anywhere (functions included), except under ``if __name__ == "__main__"``."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("raylign")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raylign"):
            names = {f"{node.module}.{a.name}" for a in node.names}
            out |= names
            if not all(_is_module(n) for n in names):  # `from raylign import storage` is the module, not __init__
                out.add(node.module)
    return out


def _is_module(dotted: str) -> bool:
    path = PKG.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_no_import_cycles():
    modules = {_module_name(f): f for f in PKG.rglob("*.py")}
    graph = {m: {n for n in _raylign_imports(f) if n in modules and n != m} for m, f in modules.items()}
    cycles = []

    def visit(node, stack, done):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        done.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node], done)

    done: set[str] = set()
    for m in sorted(graph):
        visit(m, [], done)
    assert cycles == []


def test_the_report_reads_files_and_never_imports_the_cluster_or_torch():
    files = sorted((PKG / "report").rglob("*.py"))
    assert files, "raylign/report has no modules"
    forbidden = FORBIDDEN + ("torch", "mlflow")
    bad = [(f.name, name) for f in files for name in _imports(f)
           if any(name == m or name.startswith(m + ".") for m in forbidden)]
    assert bad == []
