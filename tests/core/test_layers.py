"""Weight conversion (hf.py) does not import the model that imports it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pyminigpt

PACKAGE = Path(pyminigpt.__file__).parent


def _run_time_imports(path: Path) -> set[str]:
    """The modules a file imports when it runs: every import except those under `if TYPE_CHECKING:`."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.ImportFrom):
                found.add("." * child.level + (child.module or ""))
            elif isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_hf_does_not_import_the_model():
    imports = _run_time_imports(PACKAGE / "hf.py")
    assert ".model" not in imports and "pyminigpt.model" not in imports, imports
    assert ".config" in imports


def test_config_imports_neither_the_model_nor_hf():
    imports = _run_time_imports(PACKAGE / "config.py")
    assert not imports & {".model", ".hf", "pyminigpt.model", "pyminigpt.hf"}, imports


def test_the_model_reexports_the_config():
    from pyminigpt import config, model

    assert model.GPTConfig is config.GPTConfig and model.ACTIVATIONS is config.ACTIVATIONS


def test_hf_imports_first_in_a_fresh_interpreter():
    """hf.py imported before anything else of the package: no partly initialised module."""
    code = "import pyminigpt.hf as hf, pyminigpt.model as m; assert hf.config_from_hf({}) == m.GPTConfig()"
    subprocess.run([sys.executable, "-c", code], check=True)
