"""Triton kernels, one file per operation (installed as pyminigpt.kernels).

Each module holds the `@triton.jit` kernels of one op and a plain launcher per kernel.
A launcher takes `wrap`, applied to every kernel before it is launched: the identity for
eager use, `torch.library.wrap_triton` when called from a `triton_op` (pyminigpt/ops/triton.py;
the identity there too under the interpreter) so that torch.compile can trace the launch.
"""

import os

import triton
import triton.language as tl

# Whether the kernels run in the interpreter (TRITON_INTERPRET=1, on CPU tensors) instead of compiled.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter (triton 3.x) converts fp32 to bf16 by truncation; `rounded_to` does the
# round-to-nearest-even itself there. Compiled kernels skip it.
_INTERPRETER = tl.constexpr(INTERPRET)


def _no_wrap(kernel):
    return kernel


@triton.jit
def rounded_to(x, dtype: tl.constexpr):
    """fp32 x converted to dtype, rounding to nearest even (the hardware conversion)."""
    if _INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
