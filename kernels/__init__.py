"""Triton kernels, one file per operation (installed as pyminigpt.kernels).

Each module holds the `@triton.jit` kernels of one op and a plain launcher per kernel.
A launcher takes `wrap`, applied to every kernel before it is launched: the identity for
eager use, `torch.library.wrap_triton` when called from a `triton_op` (pyminigpt/ops/triton.py)
so that torch.compile can trace the launch.
"""


def _no_wrap(kernel):
    return kernel
