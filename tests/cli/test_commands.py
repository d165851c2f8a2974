"""The table of commands: `pyminigpt --help` lists them all, a command imports its own module
alone, and the README lists every one."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from pyminigpt.cli import COMMANDS, main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    listed = capsys.readouterr().out
    for name in COMMANDS:
        assert f"    {name}" in listed, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_module_brings_its_parser_and_runs(name):
    module = importlib.import_module(COMMANDS[name])
    assert callable(module.add_parser)
    with pytest.raises(SystemExit) as info:  # its own --help parses
        main([name, "--help"])
    assert info.value.code == 0


def test_a_command_imports_its_module_alone():
    code = (
        "import sys\n"
        "from pyminigpt.cli import COMMANDS, main\n"
        "main(['info'])\n"
        "loaded = sorted(m for m in COMMANDS.values() if m in sys.modules)\n"
        "assert loaded == ['pyminigpt.cli.info'], loaded\n"
        "assert 'pyminigpt.bench.report' not in sys.modules and 'pyminigpt.train.trainer' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_an_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "demo" in capsys.readouterr().err


@pytest.mark.skipif(not README.is_file(), reason="no README beside an installed package")
def test_the_readme_lists_every_command():
    text = README.read_text(encoding="utf-8")
    assert "pyminigpt --help" in text
    missing = [name for name in COMMANDS if f"\npyminigpt {name}" not in text]
    assert not missing, f"README.md's command list lacks {missing}"


@pytest.mark.skipif(not README.is_file(), reason="no README beside an installed package")
def test_the_readme_states_the_demos_training_time():
    from pyminigpt.cli.demo import DEMO_TRAIN_SECONDS

    text = " ".join(README.read_text(encoding="utf-8").split())
    assert f"the steps that fit in {DEMO_TRAIN_SECONDS:.0f} s" in text
