"""Import contracts: the TUI process never loads torch/diffusers/transformers; backend never imports textual."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft")
# Modules that run only inside worker or trainer processes (backend/preload.py: in the workers' fork server).
TORCH_ALLOWED = ("backend/engine/", "backend/training/", "backend/worker.py", "backend/preload.py")


def _imports(path: Path, whole: bool = False) -> set[str]:
    """The top-level packages ``path`` imports; with ``whole``, the modules and names as written."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name if whole else a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module if whole else node.module.split(".")[0])
            names.update(f"{node.module}.{a.name}" for a in node.names if whole)
    return names


def test_backend_never_imports_textual():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "backend").rglob("*.py")
                 if {"textual", "rich_pixels"} & _imports(p)]
    assert offenders == []


def test_tui_and_service_pull_in_no_torch():
    modules = ["tui.cli", "tui.app", "backend.service", "backend.request", "backend.metadata", "backend.models",
               "backend.api", "backend.remote_client", "backend.serve"]
    modules += [f"tui.screens.{p.stem}" for p in (ROOT / "tui" / "screens").glob("*.py") if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "from tui.cli import build_parser\n"
        "build_parser()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_tui_source_has_no_heavy_imports():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "tui").rglob("*.py") if set(HEAVY) & _imports(p)]
    assert offenders == []


def test_torch_only_in_worker_side_modules():
    offenders = []
    for p in (ROOT / "backend").rglob("*.py"):
        rel = str(p.relative_to(ROOT))
        if set(HEAVY) & _imports(p) and not rel.startswith(TORCH_ALLOWED):
            offenders.append(rel)
    assert offenders == []


def test_only_the_fork_server_imports_the_preload_module():
    """Importing backend.preload loads torch and sends the process's output to a log: no module may import it
    (backend/pool.py names it to the fork server as text)."""
    importers = [str(p.relative_to(ROOT)) for package in ("backend", "tui") for p in (ROOT / package).rglob("*.py")
                 if "backend.preload" in _imports(p, whole=True)]
    assert importers == []
    assert '"backend.preload"' in (ROOT / "backend" / "pool.py").read_text()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, at the top or inside a function (not under TYPE_CHECKING)."""
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
                   for stmt in node.body for n in ast.walk(stmt)}
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        graph[module] = {t for t in targets if t in files and t != module and not module.startswith(f"{t}.")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_imports_inside_functions():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_backend_modules_import_each_other_without_cycles():
    """Also through imports inside functions, which hide a cycle until some call order breaks it."""
    assert _cycles(_import_graph("backend")) == []
