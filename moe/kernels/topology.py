"""Block-sparse topology of the MoE expert layer (MegaBlocks §5.1.3–5.1.4), built in vectorised torch.

Tokens sorted by expert, each expert's group padded to a multiple of the block size B, make the hidden
activations H [T_pad, E·f] block diagonal: the block rows of expert e meet only block columns
[e·F, (e+1)·F), F = f / B. H is stored as `data [nnz, B, B]` in row-major block order, described by

    row_offsets      [R + 1]   blocked-CSR: the blocks of block row r are [row_offsets[r], row_offsets[r+1])
    column_indices   [R·F]     block column of each block
    row_indices      [R·F]     block row of each block (the COO part: an SDD program finds its block directly)
    offsets_t        [E·F + 1] the transpose's CSR offsets: blocks of block column c, in column-major order
    block_offsets_t  [R·F]     transpose indices: position in `data` of the q-th block in column-major order
    column_indices_t [R·F]     block row of that block (the transpose's column index)

All indices are int32. No host sync: the arrays are sized for the largest possible number of block rows
R = (T·k + min(E, T·k)·(B−1)) // B, which needs only shapes; the real count `num_block_rows` stays on the
device and the kernels skip the rows past it. Entries past the real blocks hold column E·F (a sentinel),
so the transpose never walks them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from moe.kernels.sort import Sorted


class Topology(NamedTuple):
    block_size: int  # B
    num_experts: int  # E
    blocks_per_row: int  # F = f / B, nonzero blocks in every block row
    max_block_rows: int  # R, static bound on the block rows
    num_block_rows: torch.Tensor  # [1] int32, block rows in use (T_pad / B)
    row_offsets: torch.Tensor  # [R + 1] int32
    column_indices: torch.Tensor  # [R·F] int32
    row_indices: torch.Tensor  # [R·F] int32
    offsets_t: torch.Tensor  # [E·F + 1] int32
    block_offsets_t: torch.Tensor  # [R·F] int32
    column_indices_t: torch.Tensor  # [R·F] int32

    @property
    def num_block_cols(self) -> int:
        return self.num_experts * self.blocks_per_row


def max_block_rows(num_assignments: int, num_experts: int, block_size: int) -> int:
    """Largest sum over experts of ceil(count_e / B) for counts summing to T·k: each non-empty expert
    wastes at most B−1 padding rows, and at most min(E, T·k) experts are non-empty."""
    return (num_assignments + min(num_experts, num_assignments) * (block_size - 1)) // block_size


def padded_destinations(srt: Sorted, block_size: int) -> torch.Tensor:
    """[T·k] int64: the padded row of each sorted position.

    Sorted position p of expert e goes to row padded_start[e] + (p − start[e]): each expert's group starts
    on a block boundary, and the rows after its last assignment, up to the next boundary, stay padding.
    """
    B = block_size
    padded = (srt.counts + B - 1) // B * B  # [E] rows per expert after padding
    padded_start = torch.cumsum(padded, 0) - padded  # [E]
    start = srt.offsets - srt.counts  # [E]
    p = torch.arange(srt.order.numel(), device=srt.order.device)
    e = srt.expert_of.long()
    return padded_start[e] + p - start[e]


def padded_sources(dest: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows] int32: the index i of dest held by each padded row (dest[i] = row), −1 for padding."""
    src = torch.full((num_rows,), -1, dtype=torch.int32, device=dest.device)
    return src.scatter_(0, dest.long(), torch.arange(dest.numel(), dtype=torch.int32, device=dest.device))


def transpose_indices(row_indices: torch.Tensor, column_indices: torch.Tensor, num_block_cols: int):
    """Transposed metadata of a block-sparse matrix without moving its data (MegaBlocks §5.1.4).

    A stable sort of the blocks by column gives the transpose indices π (column-major walk of `data`);
    the transpose's column indices are the original block rows, row_indices[π]. Column value
    `num_block_cols` marks an unused entry: it sorts last and is left out of the offsets.
    Returns (offsets_t [C + 1], block_offsets_t [nnz], column_indices_t [nnz]), all int32.
    """
    perm = torch.sort(column_indices, stable=True).indices  # [nnz] int64
    per_col = torch.zeros(num_block_cols + 1, dtype=torch.int32, device=column_indices.device)
    per_col.scatter_add_(0, column_indices.long(), torch.ones_like(column_indices))  # scatter: no sync
    offsets_t = torch.cat([per_col.new_zeros(1), torch.cumsum(per_col[:-1], 0, dtype=torch.int32)])
    return offsets_t, perm.int(), row_indices[perm]


def expert_topology(counts: torch.Tensor, ffn_size: int, block_size: int, num_rows: int) -> Topology:
    """Block-diagonal topology from the assignments per expert counts [E] (int64, on the device).

    num_rows: the static bound R on block rows (see `max_block_rows`). Expert e owns the block rows
    [row_end[e] − ceil(count_e / B), row_end[e]) and the block columns [e·F, (e+1)·F).
    """
    B, E = block_size, counts.numel()
    if ffn_size % B:
        raise ValueError(f"ffn_hidden_size {ffn_size} is not a multiple of moe.kernels.block_size {B}: the "
                         f"blocksparse backend tiles the expert width into {B}-wide blocks; use a multiple")
    F, dev = ffn_size // B, counts.device
    row_end = torch.cumsum((counts + B - 1) // B, 0)  # [E] inclusive block-row ends
    num_block_rows = row_end[-1:].int()  # [1]
    r = torch.arange(num_rows, device=dev)  # [R]
    expert_of_row = torch.searchsorted(row_end, r, right=True)  # [R], E past the last row in use
    cols = expert_of_row[:, None] * F + torch.arange(F, device=dev)  # [R, F]
    column_indices = torch.where(expert_of_row[:, None] < E, cols, E * F).reshape(-1).int()
    row_indices = r.repeat_interleave(F).int()
    rows_used = torch.minimum(torch.arange(num_rows + 1, device=dev), row_end[-1])  # [R + 1]
    row_offsets = (rows_used * F).int()
    offsets_t, block_offsets_t, column_indices_t = transpose_indices(row_indices, column_indices, E * F)
    return Topology(B, E, F, num_rows, num_block_rows, row_offsets, column_indices, row_indices,
                    offsets_t, block_offsets_t, column_indices_t)
