"""One decode step of the model on a preallocated KV cache: `Steps` (prefill, then one token per step).

The prompt runs once, filling a KV cache preallocated for prompt + new tokens; each new token then
costs one position, with the LM head computed for the last position only. On CUDA the step is a
CUDA graph (`StaticDecoder`); on the CPU it runs eagerly on the kernels (`ops.causal_attention`
reads the cache in place). Prompts of different lengths are LEFT-padded and marked by
attention_mask, and positions count from each row's first real token, as in transformers.
Beam search reorders the cache rows in place between steps (`KVCache.reorder`), which both paths
see, since the buffers keep their storage.
"""

from __future__ import annotations

import torch

# On CUDA, how many decode steps run between two host reads of "has every row stopped?".
CUDA_EOS_CHECK_INTERVAL = 16


def static_decoding(device: torch.device) -> bool:
    """Whether generate decodes with a `StaticDecoder` (a CUDA graph) on this device."""
    return device.type == "cuda"


def eos_check_interval(device: torch.device) -> int:
    """Decode steps between two host reads of "has every row stopped?" (a read waits for the device)."""
    return CUDA_EOS_CHECK_INTERVAL if device.type == "cuda" else 1


class StaticDecoder:
    """Decode steps with static shapes and addresses; on CUDA captured once in a CUDA graph and replayed.

    `step(token)` feeds token (B,) at the next cache slot and returns the next-token logits (B, V).
    Every buffer a step reads or writes is allocated here once: the token, the position ids, the
    cache slot (a (1,) device tensor, see `KVCache.slot`) and the key mask (B, 1, 1, capacity),
    True for the written slots that are not padding. Attention covers every slot of the cache under
    that mask (SDPA: the causal kernels take no length argument), so each step has the same shapes
    and the whole step (the model's trunk, the LM head of the last position) is one graph launch;
    the host only updates the four small buffers with device ops. With `use_graph=False` (the
    default off CUDA) the same step runs eagerly, which is how the CPU tests check it against the
    dynamic-shape loop.
    """

    def __init__(self, model, cache, padding_mask: torch.Tensor | None, last_position: torch.Tensor, use_graph=None):
        batch, capacity, device = cache.keys[0].shape[0], cache.capacity, cache.keys[0].device
        self.model, self.cache = model, cache
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.graph, self.logits = None, None
        for buffer in (*cache.keys, *cache.values):
            buffer[:, :, cache.length :].zero_()  # masked-out slots must hold numbers: 0 * NaN would poison SDPA
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position_ids = last_position.expand(batch, 1).clone()  # the position of the last token fed
        self.slot = torch.full((1,), cache.length - 1, dtype=torch.long, device=device)
        written = torch.arange(capacity, device=device) < cache.length
        mask = written if padding_mask is None else written & padding_mask.bool()
        self.key_mask = mask.expand(batch, capacity)[:, None, None, :].clone()

    def _forward(self) -> torch.Tensor:
        x, _, _ = self.model._trunk(self.tokens, self.position_ids, self.key_mask, self.cache)
        return self.model.lm_head(x[:, -1])

    def _capture(self) -> None:
        side = torch.cuda.Stream()  # warm up (allocator, lazy kernel loads) off the capturing stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()  # rewrites the current slot with the same keys and values
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (a DataLoader pinning memory) may go on meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._forward()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(token.unsqueeze(1))
        self.position_ids.add_(1)
        self.slot.add_(1)
        self.key_mask.index_fill_(3, self.slot, True)
        self.cache.slot = self.slot
        try:
            if not self.use_graph:
                logits = self._forward()
            else:
                with torch.cuda.device(self.tokens.device):  # capture and replay on the model's GPU's streams
                    if self.graph is None:
                        self._capture()
                    self.graph.replay()
                    logits = self.logits.clone()  # the graph's output buffer is overwritten by the next replay
        finally:
            self.cache.slot = None
        self.cache.advance(1)
        return logits


class Steps:
    """The model's steps for one `generate` call: `prefill()` the prompt, then `step(tokens)` per new token.

    input_ids (B, T) and attention_mask (B, T) (None or left padding) are the prompt; `new` is how
    many tokens may follow. Both return the next-token logits (B, V) of the model's dtype.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, new: int):
        B, T = input_ids.shape
        self.model, self.input_ids, self.T = model, input_ids, T
        self.padded = attention_mask is not None and not bool(attention_mask.all())
        self.full_mask = None
        if self.padded:
            self.full_mask = torch.ones(B, T + new, dtype=attention_mask.dtype, device=input_ids.device)
            self.full_mask[:, :T] = attention_mask
            self.position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        else:
            self.position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
        self.cache = model.new_cache(B, T + new)
        self.decoder = None
        self.fed = 0

    def prefill(self) -> torch.Tensor:
        out = self.model._forward(
            self.input_ids, self.full_mask[:, : self.T] if self.padded else None, cache=self.cache, use_cache=True,
            position_ids=self.position_ids, logits_to_keep=1,
        )  # fmt: skip
        if static_decoding(self.input_ids.device):
            self.decoder = StaticDecoder(self.model, self.cache, self.full_mask, self.position_ids[:, -1:])
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.fed += 1
        if self.decoder is not None:
            return self.decoder.step(tokens)
        self.position_ids = self.position_ids[:, -1:] + 1
        out = self.model._forward(
            tokens.unsqueeze(1), self.full_mask[:, : self.T + self.fed] if self.padded else None, cache=self.cache,
            use_cache=True, position_ids=self.position_ids, logits_to_keep=1,
        )  # fmt: skip
        return out.logits[:, -1]
