"""Text generation for `pyminigpt.GPT`: transformers' `generate`, and the text API on top of it.

config.py      GenerationConfig; resolving one call's settings; refusing what is not supported
processors.py  the logits processors (repetition penalty ... typical-p), transformers' order
steps.py       the model's decode step on the KV cache (StaticDecoder: the CUDA-graph step)
loop.py        generate() and the greedy / sampling loop (with the streamer)
beam.py        beam search (the KV cache reordered in place)
assisted.py    assisted decoding (a draft model proposes, the model verifies)
text.py        generate_text(model, tokenizer, prompt, stream=callback) and its streamer
"""

from .config import GenerationConfig
from .loop import GenerateOutput, generate
from .processors import apply_repetition_penalty, seen_tokens, warp_scores
from .steps import CUDA_EOS_CHECK_INTERVAL, StaticDecoder
from .text import TextCallbackStreamer, generate_text

__all__ = [
    "CUDA_EOS_CHECK_INTERVAL",
    "GenerateOutput",
    "GenerationConfig",
    "StaticDecoder",
    "TextCallbackStreamer",
    "apply_repetition_penalty",
    "generate",
    "generate_text",
    "seen_tokens",
    "warp_scores",
]
