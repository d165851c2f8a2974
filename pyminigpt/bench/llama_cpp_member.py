"""The llama.cpp members of the decode benchmark: llama-cpp-python's low-level API on a GGUF file
that `pyminigpt export` wrote from the same random GPT-2 weights as every other member.

One `llama_decode` per step for the whole batch: the prompt of every row in one batch (logits
only at each row's last position), then one token per row per step, each row its own sequence
of the KV cache. The next token is the argmax of the row's logits (greedy), or top-k / top-p
sampling over them in torch. The GGUF files are written once and cached under
$PYMINIGPT_BENCH_CACHE (default: the temp folder), like CTranslate2's conversion.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

DTYPES = ("f32", "f16", "q8_0", "q4_0")


def gguf_file(hf_model, dtype: str, model_kwargs: dict | None = None) -> Path:
    """The GGUF export of `hf_model` (the seed-0 random GPT-2 of `model_kwargs`) at `dtype`, cached."""
    import importlib.metadata

    import transformers

    from pyminigpt import GPT
    from pyminigpt.cli.export import export_gguf

    key = hashlib.sha256(
        json.dumps([model_kwargs or {}, dtype, transformers.__version__, importlib.metadata.version("gguf")]).encode()
    ).hexdigest()[:12]
    cache = Path(os.environ.get("PYMINIGPT_BENCH_CACHE", Path(tempfile.gettempdir()) / "pyminigpt-bench"))
    target = cache / f"gpt2-{dtype}-{key}.gguf"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")  # renamed when whole: a killed run leaves no half file
        export_gguf(GPT.from_hf(hf_model).eval(), partial, dtype)
        os.replace(partial, target)
    return target


def step_bytes(path: Path) -> int:
    """Bytes of weights one decode step reads: every tensor once, but one row of the position table."""
    import gguf

    total = 0
    for tensor in gguf.GGUFReader(path).tensors:
        rows = int(tensor.shape[-1]) if tensor.name == "position_embd.weight" else 1
        total += int(tensor.n_bytes) // rows
    return total


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level, text, user_data):  # llama.cpp's log lines would flood the benchmark's output
    return None


def sample_next(logits: torch.Tensor, do_sample: bool, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids: argmax, or a draw after top-k then top-p filtering."""
    if not do_sample:
        return logits.argmax(-1)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        mass = ordered.softmax(-1).cumsum(-1)
        drop = mass - ordered.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


class LlamaCppMember:
    """`generate(input_ids, max_new_tokens, do_sample, top_k, top_p)` in llama.cpp, one context per batch size."""

    def __init__(self, hf_model, dtype: str, model_kwargs: dict | None = None, threads: int | None = None):
        import llama_cpp

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.lib, self.threads = llama_cpp, threads or torch.get_num_threads()
        self.n_positions = hf_model.config.n_positions
        path = gguf_file(hf_model, dtype, model_kwargs)
        self.weight_bytes = step_bytes(path)
        llama_cpp.llama_log_set(_quiet, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.contexts: dict[int, tuple] = {}

    def _context(self, batch: int):
        """(context, llama_batch) for `batch` sequences of up to n_positions tokens each."""
        if batch not in self.contexts:
            lib = self.lib
            params = lib.llama_context_default_params()
            params.n_ctx = batch * self.n_positions
            params.n_batch = params.n_ubatch = max(512, batch * 64)
            params.n_seq_max = batch
            params.n_threads = params.n_threads_batch = self.threads
            params.no_perf = True
            ctx = lib.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for batch {batch}")
            self.contexts[batch] = (ctx, lib.llama_batch_init(batch * self.n_positions, 0, batch))
        return self.contexts[batch]

    def _decode(self, ctx, llama_batch, tokens: list[list[int]], start: int) -> torch.Tensor:
        """Appends tokens[b] to sequence b from position `start`; returns each row's last logits (B, V)."""
        n = 0
        for b, row in enumerate(tokens):
            for t, token in enumerate(row):
                llama_batch.token[n], llama_batch.pos[n] = token, start + t
                llama_batch.n_seq_id[n], llama_batch.seq_id[n][0] = 1, b
                llama_batch.logits[n] = t == len(row) - 1
                n += 1
        llama_batch.n_tokens = n
        status = self.lib.llama_decode(ctx, llama_batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        ends = np.cumsum([len(row) for row in tokens]) - 1
        rows = [np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, int(i)), shape=(self.n_vocab,)) for i in ends]
        return torch.from_numpy(np.stack(rows))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample=False, top_k=0, top_p=1.0):
        batch, length = input_ids.shape
        if length + max_new_tokens > self.n_positions:
            raise ValueError(f"prompt + max_new_tokens must be <= {self.n_positions}, got {length + max_new_tokens}")
        ctx, llama_batch = self._context(batch)
        self.lib.llama_memory_clear(self.lib.llama_get_memory(ctx), True)
        logits = self._decode(ctx, llama_batch, input_ids.tolist(), 0)
        out = [input_ids]
        for step in range(max_new_tokens):
            token = sample_next(logits, do_sample, top_k, top_p)
            out.append(token[:, None].to(input_ids.dtype))
            if step + 1 < max_new_tokens:
                logits = self._decode(ctx, llama_batch, [[t] for t in token.tolist()], length + step)
        return torch.cat(out, dim=1)

    def close(self) -> None:
        for ctx, llama_batch in self.contexts.values():
            self.lib.llama_batch_free(llama_batch)
            self.lib.llama_free(ctx)
        self.contexts.clear()
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None
