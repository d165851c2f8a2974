"""What `import pyminigpt` costs: which modules it loads (pinned), in a fresh interpreter.

The public names are imported on first use, so `import pyminigpt` loads the package's
__init__ alone; the model then loads torch and the ops, still without triton (torch._dynamo
would bring it), matplotlib, tokenizers or transformers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("triton", "tqdm", "matplotlib", "tokenizers", "transformers", "torch.distributed", "torch._dynamo", "numpy")


def _loaded(code: str) -> dict:
    script = (
        "import json, sys\n" + code + "\n"
        f"print(json.dumps({{'pyminigpt': sorted(m for m in sys.modules if m.split('.')[0] == 'pyminigpt'),"
        f" 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def test_import_pyminigpt_loads_the_package_alone():
    loaded = _loaded("import pyminigpt")
    assert loaded == {"pyminigpt": ["pyminigpt"], "heavy": []}


@pytest.mark.slow  # a fresh interpreter: seconds of CPU; `make test-unit` leaves it out
def test_the_model_loads_no_triton_plotting_or_transformers():
    loaded = _loaded(
        "from pyminigpt import GPT, GPTConfig\n"
        "import torch\n"
        "model = GPT(GPTConfig(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))\n"
        "model.generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens=2)"
    )
    heavy = set(loaded["heavy"]) - {"tqdm", "torch.distributed", "numpy"}  # `import torch` loads these itself
    assert not heavy, heavy
    assert not [m for m in loaded["pyminigpt"] if m.split(".")[1:2] in (["train"], ["cli"], ["bench"], ["hf"])]


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages a regular install copies: a folder missing there imports
    from a checkout (and an editable install) but not from the installed wheel."""
    root = Path(__file__).resolve().parents[2]
    listed = set(re.findall(r'"(pyminigpt(?:\.\w+)*)"', (root / "pyproject.toml").read_text().split("packages = [")[1]))
    folders = {".".join(init.parent.relative_to(root).parts) for init in (root / "pyminigpt").rglob("__init__.py")}
    assert folders <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(folders - listed)}"
