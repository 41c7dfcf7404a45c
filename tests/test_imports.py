"""Import contracts: the TUI process never loads torch/diffusers/transformers; backend never imports textual."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft")
# Modules that run only inside worker or trainer processes.
TORCH_ALLOWED = ("backend/engine/", "backend/training/", "backend/worker.py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
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
