"""Reference implementations of the five operations, in plain PyTorch.

These are the oracle every kernel is tested against and the fallback for every input a
kernel does not support. They are written for clarity, not speed: each one is the
textbook formula, with autograd coming from PyTorch itself.
"""

from __future__ import annotations

import math

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dim.

    The statistics are computed in at least fp32; the result has x's dtype.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute_dtype)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)  # biased variance, like nn.LayerNorm
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(compute_dtype) + bias.to(compute_dtype)
    return y.to(x.dtype)


def softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """y = softmax(x / temperature) over the last dim, computed in at least fp32."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.softmax(x.to(compute_dtype) / temperature, dim=-1).to(x.dtype)


def top_k_top_p_filter(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_tokens_to_keep: int = 1
) -> torch.Tensor:
    """Set the logits that transformers' top-k then top-p warpers remove to -inf.

    logits: (B, V). NaN counts as -inf. top-k keeps every logit >= the k-th largest
    (ties at the k-th value stay); top-p sorts the probabilities ascending (ties in
    index order), and removes the tokens whose cumulative probability is <= 1 - top_p.
    Both always keep `min_tokens_to_keep` tokens.
    """
    vocab = logits.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    out = torch.where(torch.isnan(logits), neg_inf, logits)
    if 0 < top_k < vocab:
        k = min(max(top_k, min_tokens_to_keep), vocab)
        kth_largest = torch.topk(out, k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(out, dim=-1, descending=False, stable=True)
        cumulative = torch.softmax(sorted_logits.float(), dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= (1.0 - top_p)
        sorted_remove[..., max(vocab - min_tokens_to_keep, 0) :] = False  # all of them if min > vocab
        remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
        out = out.masked_fill(remove, float("-inf"))
    return out


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from softmax(top_k_top_p_filter(logits / temperature)).

    logits: (B, V); uniform: (B,) fp32 in [0, 1). The token is the first index, in
    vocabulary order, whose cumulative kept probability exceeds uniform * total, so a
    given uniform picks the same token on every backend. Returns (B,) int64.
    """
    scaled = logits.double() / temperature
    kept = top_k_top_p_filter(scaled, top_k, top_p)
    probs = torch.softmax(kept, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a row with no finite logit has no mass
    cumulative = probs.cumsum(dim=-1)
    target = uniform.double().unsqueeze(-1) * cumulative[..., -1:]
    # first index whose cumulative probability exceeds the target, among kept tokens
    exceeds = (cumulative > target) & (probs > 0)
    token = torch.where(
        exceeds.any(dim=-1), exceeds.int().argmax(dim=-1), torch.zeros_like(exceeds[..., 0], dtype=torch.long)
    )
    return token.long()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v, with the T x T matrix materialised.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D), Tk >= Tq. Query i sees keys j <= i + (Tk - Tq),
    so the last Tq rows of a full causal mask: decoding with a KV cache works.
    """
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-2, -1)) * scale
    query_pos = torch.arange(tq, device=q.device).unsqueeze(-1) + (tk - tq)
    key_pos = torch.arange(tk, device=q.device).unsqueeze(0)
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return (weights @ v.to(compute_dtype)).to(q.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x weight^T + bias for x (..., K), weight (N, K), bias (N,) or None: nn.Linear's op."""
    return torch.nn.functional.linear(x, weight, bias)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 (N, K) weight of 8-bit or 4-bit storage (the format of `pyminigpt.quantize`).

    int8 qweight (N, K): w = qweight * scale. uint8 qweight (N, K / 2), two 4-bit weights per byte
    (in each run of 32 weights, byte i holds weight i in its low nibble and weight 16 + i in its high
    one): w = q * scale + offset. scales, offsets: fp32 (N, K / group_size), one per group of weights.
    """
    n, groups = scales.shape
    if qweight.dtype == torch.int8:
        q = qweight.to(torch.float32)
    else:
        packed = qweight.reshape(n, -1, 1, 16)
        q = torch.cat([packed & 15, packed >> 4], dim=2).reshape(n, -1).to(torch.float32)
    w = q.reshape(n, groups, -1) * scales.to(torch.float32).unsqueeze(-1)
    if offsets is not None:
        w = w + offsets.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, -1)


def quantized_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x dequantize(qweight, scales, offsets)^T + bias, computed in fp32; y has x's dtype."""
    weight = dequantize(qweight, scales, offsets)
    y = torch.nn.functional.linear(x.to(torch.float32), weight, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int = 0,
) -> torch.Tensor:
    """cross_entropy(x weight^T + bias, labels), with the (N, V) logits materialised.

    x (N, K), weight (V, K), bias (V,) or None, labels (N,) int64; rows whose label is
    ignore_index count for nothing. reduction "mean" divides by the number of counted rows
    (NaN when there are none, as F.cross_entropy), "sum" does not. The logits are computed in
    x's dtype (nn.Linear's op) and the cross entropy in at least fp32. chunk_rows is the
    kernels' knob; the reference ignores it.
    """
    logits = torch.nn.functional.linear(x, weight, bias)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.nn.functional.cross_entropy(
        logits.to(compute_dtype), labels, ignore_index=ignore_index, reduction=reduction
    )
