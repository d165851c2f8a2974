"""The KV cache: every layer's keys and values in preallocated buffers that decoding writes in place.

`generate` sizes it for prompt + new tokens, so a decode step writes one position and copies
nothing; beam search reorders its rows in place (`reorder`), assisted decoding drops rejected
draft positions (`crop`), and the CUDA-graph step writes through a device-side `slot`.
"""

from __future__ import annotations

import torch

from .config import GPTConfig


class KVCache:
    """Keys and values of every layer, in buffers of `capacity` positions written in place.

    Layer i's keys are `keys[i][:, :, :length]` (B, H, length, D). `generate` preallocates the
    whole prompt + new tokens, so decoding writes one position per step and never copies; a
    forward that runs past the capacity grows the buffers (doubling).
    """

    def __init__(self, config: GPTConfig, batch_size: int, capacity: int, device=None, dtype=None):
        shape = (batch_size, config.n_head, capacity, config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0
        # Static-shape decoding (`generation.StaticDecoder`): a (1,) device tensor, the position `update`
        # writes to; it then returns every position of the buffers, for a masked attention.
        self.slot: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at positions [length, length + T) of `layer`; return all keys and values so far.

        `length` itself moves on in `advance`, once every layer has written. With `slot` set, k and v
        (one position) go to index `slot` instead, and all `capacity` positions come back.
        """
        if self.slot is not None:
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            return self.keys[layer], self.values[layer]
        end = self.length + k.shape[2]
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (assisted decoding drops the rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in [0, {self.length}], got {length}")
        self.length = length

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes row rows[i] (beam search), in place: the buffers keep their storage.

        Only the written positions move (one gather into a temporary, copied back), so the
        attention kernels and a captured CUDA graph keep reading the same buffers.
        """
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                written = buffer[:, :, : self.length]
                written.copy_(written.index_select(0, rows))

    def _grow(self, capacity: int) -> None:
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                buffers[i] = new
