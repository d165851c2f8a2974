"""pyminigpt: a small GPT-2 whose hot operations run on fused kernels."""

from . import ops
from .analysis import (
    attention_maps,
    embeddings,
    generate_text,
    hidden_states,
    next_token_table,
    perplexity,
    plot_attention,
    plot_pca,
)
from .data import SequenceDataset, SlidingWindowDataset, load_text, names_corpus, write_token_file
from .feedback import FeedbackTrainer
from .model import GPT, GPTConfig
from .patch import patch_hf_gpt2, unpatch_hf_gpt2
from .tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from .trainer import Trainer, TrainerConfig

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "BPETokenizer",
    "CharTokenizer",
    "FeedbackTrainer",
    "GPTConfig",
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
