"""The backward of the differentiable ops, attached to every backend's forward op.

A kernel backend exposes, per differentiable op, a forward that saves what its backward
needs and a backward op (FlashAttention style: attention saves the log-sum-exp and
recomputes the probabilities):

    softmax_fwd(x, T) -> y                         softmax_bwd(y, dy, T) -> dx
    layer_norm_fwd(x, w, b, eps) -> y, mean, rstd  layer_norm_bwd(dy, x, w, mean, rstd) -> dx, dw, db
    causal_attention_fwd(q, k, v, s) -> out, lse   causal_attention_bwd(dout, q, k, v, out, lse, s) -> dq, dk, dv

The C++/CUDA ops (namespace `pyminigpt`) and the Triton ops (`pyminigpt_triton`) follow
the same contract, so one set of autograd formulas serves both.
"""

from __future__ import annotations

import torch


def below_autograd(op, *args):
    """op(*args), straight to the device kernel when no gradient is asked for.

    `torch.library.register_autograd` puts a Python kernel on the Autograd key. Under no_grad
    (or with no input that requires grad) it only steps below autograd and redispatches, yet
    that Python step costs more than a small kernel. Doing the same step here skips it; with
    a gradient to record, or while torch.compile traces, the op goes through autograd as usual.
    """
    # torch.compile reads is_compiling() as True and traces nothing after it (it cannot trace
    # is_inference_mode_enabled); inference mode leaves out the Autograd key already
    if (
        torch.compiler.is_compiling()
        or torch.is_inference_mode_enabled()
        or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))
    ):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _softmax(softmax_bwd):
    def setup(ctx, inputs, output):
        ctx.temperature = inputs[1]
        ctx.save_for_backward(output)

    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return softmax_bwd(y, grad_y.contiguous(), ctx.temperature), None

    return setup, backward


def _layer_norm(layer_norm_bwd):
    def setup(ctx, inputs, output):
        x, weight, _bias, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = layer_norm_bwd(grad_y.contiguous(), x, weight, mean, rstd)
        return dx, dweight, dbias, None

    return setup, backward


def _causal_attention(causal_attention_bwd):
    def setup(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        # grad_out as it comes: every backend reads strided rows (the model's is a transposed view)
        dq, dk, dv = causal_attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    return setup, backward


# op -> its formula: given the backend's backward op, the (setup_context, backward) of `{op}_fwd`
FORMULAS = {"softmax": _softmax, "layer_norm": _layer_norm, "causal_attention": _causal_attention}


def register(namespace: str, backward_ops: dict) -> None:
    """Make `namespace::{op}_fwd` differentiable for every op of `backward_ops` (op -> its backward op)."""
    unknown = set(backward_ops) - set(FORMULAS)
    if unknown:
        raise ValueError(f"no autograd formula for {sorted(unknown)}: add one to FORMULAS (known: {sorted(FORMULAS)})")
    for op, backward_op in backward_ops.items():
        setup, backward = FORMULAS[op](backward_op)
        torch.library.register_autograd(f"{namespace}::{op}_fwd", backward, setup_context=setup)


# ---- linear cross entropy: the gradients come out of the forward ------------------------


def wants_grad(*tensors) -> bool:
    """Whether autograd will ask for a gradient of any of these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def register_linear_cross_entropy(namespace: str) -> None:
    """Make `namespace::linear_cross_entropy_fwd` differentiable.

    linear_cross_entropy_fwd(x, w, b, labels, ignore_index, reduce_sum, compute_grad, chunk_rows)
    -> (loss, dx, dw, db): with compute_grad the forward already computed d loss / d (x, w, b)
    chunk by chunk (a scalar loss needs nothing else), so the backward only scales them by the
    incoming gradient of the loss.
    """

    def setup(ctx, inputs, output):
        _x, _weight, bias, _labels, _ignore_index, _reduce_sum, compute_grad, _chunk_rows = inputs
        _loss, grad_x, grad_weight, grad_bias = output
        ctx.has_bias, ctx.computed = bias is not None, compute_grad
        ctx.save_for_backward(grad_x, grad_weight, grad_bias)
        ctx.mark_non_differentiable(grad_x, grad_weight, grad_bias)

    def backward(ctx, grad_loss, _grad_x, _grad_weight, _grad_bias):
        if not ctx.computed:
            raise RuntimeError("linear_cross_entropy_fwd ran with compute_grad=False: it has no gradients to give")
        grad_x, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_x * grad_loss,
            grad_weight * grad_loss,
            grad_bias * grad_loss if ctx.has_bias else None,
            None, None, None, None, None,
        )  # fmt: skip

    torch.library.register_autograd(f"{namespace}::linear_cross_entropy_fwd", backward, setup_context=setup)
