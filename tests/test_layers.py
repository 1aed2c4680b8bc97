"""The layering (pyproject.toml's import-linter contract): kept by the tree, broken by a planted upward import."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("tree")
    for name in ("metadit", "data_gen"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_tree_keeps_the_layers_contract():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "metadit layers KEPT" in out.stdout


@pytest.mark.parametrize("module, planted, message", [
    ("metadit/nn/patch.py", "import metadit.eval.run", "metadit.nn is not allowed to import metadit.eval"),
    ("metadit/bank/fingerprint.py", "from metadit.nn import DiffLinear", "metadit.bank is not allowed to import metadit.nn"),
    ("metadit/dit/module.py", "from metadit.eval import judges", "metadit.dit is not allowed to import metadit.eval"),
    ("metadit/text/prompts.py", "import data_gen.recipe", "metadit.text is not allowed to import data_gen"),
    ("metadit/eval/sweep.py", "from metadit.cli import COMMANDS", "metadit.eval is not allowed to import metadit.cli"),
])
def test_a_planted_upward_import_breaks_the_contract(tree_copy, module, planted, message):
    path = tree_copy / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{planted}  # planted by the test\n")
        out = _lint(tree_copy)
    finally:
        path.write_text(original)
    assert out.returncode != 0 and "BROKEN" in out.stdout and message in out.stdout, out.stdout


def test_package_modules_are_imported_by_name_outside_the_cli():
    offenders = []
    for path in sorted((ROOT / "metadit").rglob("*.py")) + sorted((ROOT / "data_gen").rglob("*.py")):
        if path.name == "cli.py":
            continue
        if re.search(r"importlib\.import_module|__import__\(", path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_cli_defines_exactly_the_listed_subcommands():
    from metadit.cli import COMMANDS, ORDER
    from metadit.commands import SUBCOMMANDS

    assert ORDER == list(SUBCOMMANDS) and set(COMMANDS) == set(SUBCOMMANDS)
