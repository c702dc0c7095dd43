"""The layers point one way: the training library (elastic/) never imports controller/, the wiring
lives in elastic_app/, and the driver path never loads kopf or the operator's handlers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names anywhere in the file (lazy ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_training_library_never_imports_the_controller():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.split(".")[0] in ("controller", "elastic_app"))
                 for p in sorted((ROOT / "elastic").rglob("*.py"))}
    assert {p: m for p, m in offenders.items() if m} == {}


def test_the_controller_never_imports_the_wiring():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "elastic_app")
                 for p in sorted((ROOT / "controller").rglob("*.py"))}
    assert {p: m for p, m in offenders.items() if m} == {}


def test_importing_the_library_loads_no_controller_and_no_kopf():
    code = ("import sys, elastic, elastic.trainer, elastic.worker, elastic.group, elastic.adascale, elastic.config\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'controller', 'kopf', 'elastic_app'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_command_line_wiring_loads_no_kopf():
    code = ("import sys, elastic_app.cli, elastic_app.wiring\n"
            "print(sorted(m for m in sys.modules if m == 'kopf' or m.startswith('controller.k8s.handlers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
