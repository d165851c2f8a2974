"""pyminigpt: a small GPT-2 whose hot operations run on fused kernels.

The layers, each a folder or module of this package:

    config, model, generation, tokenizer, files, ops/   the core: what the drop-in user imports, with
    hf/                                                 weights to and from transformers, patch_hf_gpt2
    analysis, plots                                     the text API and the pictures built on the model
    train/                                              trainer, checkpoints, datasets, feedback tuning
    cli/                                                the `pyminigpt` command, one module per sub-command
    bench/                                              the benchmark suites and their report

`import pyminigpt` imports none of them: each public name below is imported on first use,
so the import costs little more than torch's own.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Every public name -> the module that defines it (imported when the name is first used).
_EXPORTS = {
    "GPT": "pyminigpt.model",
    "GPTConfig": "pyminigpt.config",
    "BPETokenizer": "pyminigpt.tokenizer",
    "CharTokenizer": "pyminigpt.tokenizer",
    "load_tokenizer": "pyminigpt.tokenizer",
    "attention_maps": "pyminigpt.analysis",
    "embeddings": "pyminigpt.analysis",
    "GenerationConfig": "pyminigpt.generation",
    "generate_text": "pyminigpt.generation",
    "hidden_states": "pyminigpt.analysis",
    "next_token_table": "pyminigpt.analysis",
    "perplexity": "pyminigpt.analysis",
    "plot_attention": "pyminigpt.plots",
    "plot_pca": "pyminigpt.plots",
    "patch_hf_gpt2": "pyminigpt.hf.patch",
    "unpatch_hf_gpt2": "pyminigpt.hf.patch",
    "Trainer": "pyminigpt.train.trainer",
    "TrainerConfig": "pyminigpt.train.trainer",
    "FeedbackTrainer": "pyminigpt.train.feedback",
    "SequenceDataset": "pyminigpt.train.data",
    "SlidingWindowDataset": "pyminigpt.train.data",
    "load_text": "pyminigpt.train.data",
    "names_corpus": "pyminigpt.train.data",
    "write_token_file": "pyminigpt.train.data",
}

# Modules that moved when the package was split into layers: the old path imports the new
# module (the same module object), with a DeprecationWarning naming the new path. CHANGELOG.md lists them.
MOVED_MODULES = {
    "pyminigpt.io": "pyminigpt.files",
    "pyminigpt.patch": "pyminigpt.hf.patch",
    "pyminigpt.trainer": "pyminigpt.train.trainer",
    "pyminigpt.checkpoint": "pyminigpt.train.checkpoint",
    "pyminigpt.data": "pyminigpt.train.data",
    "pyminigpt.feedback": "pyminigpt.train.feedback",
    "pyminigpt.runs": "pyminigpt.cli.runs",
    "pyminigpt.chat": "pyminigpt.cli.chat",
    "pyminigpt.demo": "pyminigpt.cli.demo",
    "pyminigpt.explore": "pyminigpt.cli.explore",
    "pyminigpt.explore_report": "pyminigpt.cli.explore_report",
    "pyminigpt.bench_report": "pyminigpt.bench.report",
    "pyminigpt.bench_charts": "pyminigpt.bench.charts",
}

__all__ = [
    "GPT",
    "BPETokenizer",
    "CharTokenizer",
    "FeedbackTrainer",
    "GPTConfig",
    "GenerationConfig",
    "SequenceDataset",
    "SlidingWindowDataset",
    "Trainer",
    "TrainerConfig",
    "__version__",
    "attention_maps",
    "embeddings",
    "generate_text",
    "hidden_states",
    "load_text",
    "load_tokenizer",
    "names_corpus",
    "next_token_table",
    "ops",
    "patch_hf_gpt2",
    "perplexity",
    "plot_attention",
    "plot_pca",
    "unpatch_hf_gpt2",
    "write_token_file",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        if name == "ops":
            return importlib.import_module("pyminigpt.ops")
        raise AttributeError(f"module 'pyminigpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup skips __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path of MOVED_MODULES as its new module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import that instead", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        sys.modules[module.__spec__.name] = module  # the new module, under its old name too


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
