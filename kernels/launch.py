"""The launch shared by the row-wise kernels (softmax, sampling): one program per row, in tiles.

A row of up to `whole_row_up_to` columns is one tile (BLOCK = its width rounded up to a power
of two); a wider row is swept in tiles of 4096. The warps grow with the tile: 4 up to 1024
columns, 8 up to 4096, 16 beyond.
"""

import torch
import triton

WIDE_ROW_TILE = 4096


def tile_width(n_cols: int, whole_row_up_to: int = WIDE_ROW_TILE) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n_cols columns."""
    block = triton.next_power_of_2(n_cols)
    if block > whole_row_up_to:
        block = WIDE_ROW_TILE
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


def launch_per_row(
    kernel, rows: torch.Tensor, *args, wrap, whole_row_up_to: int = WIDE_ROW_TILE, pass_one_tile: bool = False
) -> None:
    """wrap(kernel)[(N,)](*args, BLOCK=...) for the rows of `rows` (N, C): one program per row.

    pass_one_tile: also pass ONE_TILE, whether a whole row fits one tile. No launch when N == 0.
    """
    n_rows, n_cols = rows.shape
    if n_rows == 0:
        return
    block, num_warps = tile_width(n_cols, whole_row_up_to)
    one_tile = {"ONE_TILE": n_cols <= block} if pass_one_tile else {}
    wrap(kernel)[(n_rows,)](*args, BLOCK=block, num_warps=num_warps, **one_tile)
