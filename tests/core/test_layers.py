"""The package's layers, read from the source: who may import whom, and no two modules that import each other.

    core    config, cache, model, loss, quantize, generation, tokenizer, files, ops/, kernels/, hf/   (what the drop-in user
            imports; hf/ is its bridge to transformers: GPT.from_pretrained reads weights through it)
    lib     analysis, plots               (the text API and its pictures)
    train   train/
    apps    cli/, bench/                  (cli/bench.py runs bench's report; bench never imports cli)

A module may import its own layer and those below it, at run time or lazily inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pyminigpt

PACKAGE = Path(pyminigpt.__file__).parent
KERNELS = PACKAGE / "kernels"  # an editable install maps pyminigpt.kernels to the checkout's kernels/
if not KERNELS.is_dir():
    KERNELS = PACKAGE.parent / "kernels"

CORE = ("config", "cache", "model", "loss", "quantize", "generation", "tokenizer", "files", "ops", "kernels", "hf")
LIB = ("analysis", "plots")
LAYERS = {**dict.fromkeys(CORE, 0), **dict.fromkeys(LIB, 1), "train": 2, "cli": 3, "bench": 3}


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found = {}
    for root, prefix in ((PACKAGE, "pyminigpt"), (KERNELS, "pyminigpt.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if root == PACKAGE and parts[:1] == ["kernels"]:
                continue
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path, type_only: bool) -> set[str]:
    """The pyminigpt modules `name` imports anywhere in its file (also inside functions); with
    type_only, also those under `if TYPE_CHECKING:`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def add(module: str, names=()):
        for alias in names:
            if f"{module}.{alias}" in MODULES:  # `from . import ops`: the submodule
                found.add(f"{module}.{alias}")
                break
        else:
            if module in MODULES:
                found.add(module)

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                for part in child.body if type_only else []:
                    visit(part)
                for part in child.orelse:
                    visit(part)
                continue
            if isinstance(child, ast.ImportFrom):
                base = package.split(".")
                base = base[: len(base) - (child.level - 1)] if child.level else []
                module = ".".join([*base, child.module] if child.module else base)
                add(module, [a.name for a in child.names])
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if module.count(".") else None
    return LAYERS.get(top)


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if m != "pyminigpt" and m != "pyminigpt.__main__" and _layer(m) is None]
    assert not unplaced, f"add these to a layer in {__file__}: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for name, path in MODULES.items():
        own = _layer(name)
        if own is None:
            continue
        wrong += [f"{name} -> {dep}" for dep in _imports(name, path, type_only=True) if (_layer(dep) or 0) > own]
    assert not wrong, wrong


def test_the_core_never_imports_training_the_command_or_the_benchmarks():
    core = [m for m in MODULES if _layer(m) == 0]
    assert "pyminigpt.model" in core and "pyminigpt.ops.dispatch" in core
    for name in core:
        bad = {d for d in _imports(name, MODULES[name], type_only=True) if d.split(".")[1] in ("train", "cli", "bench")}
        assert not bad, f"{name} imports {bad}"


def test_no_two_modules_import_each_other():
    graph = {name: _imports(name, path, type_only=True) for name, path in MODULES.items()}
    # a package's __init__ that re-exports its own modules is not a knot with them
    pairs = sorted(
        f"{a} <-> {b}"
        for a, deps in graph.items()
        for b in deps
        if a < b and a in graph.get(b, ()) and not (b.startswith(a + ".") or a.startswith(b + "."))
    )
    assert not pairs, pairs


def test_the_finder_sees_the_known_edges():
    """The import reader itself: it finds lazy imports, `from . import x` submodules and relative levels."""
    assert "pyminigpt.hf.convert" in _imports("pyminigpt.model", MODULES["pyminigpt.model"], type_only=True)
    assert "pyminigpt.ops" in _imports("pyminigpt.model", MODULES["pyminigpt.model"], type_only=False)
    assert "pyminigpt.config" in _imports("pyminigpt.hf.convert", MODULES["pyminigpt.hf.convert"], type_only=False)


def test_the_model_reexports_the_config():
    from pyminigpt import config, model

    assert model.GPTConfig is config.GPTConfig and model.ACTIVATIONS is config.ACTIVATIONS


@pytest.mark.slow  # a fresh interpreter: seconds of CPU; `make test-unit` leaves it out
def test_hf_imports_first_in_a_fresh_interpreter():
    """hf/ imported before anything else of the package: no partly initialised module."""
    code = "import pyminigpt.hf as hf, pyminigpt.model as m; assert hf.config_from_hf({}) == m.GPTConfig()"
    subprocess.run([sys.executable, "-c", code], check=True)
