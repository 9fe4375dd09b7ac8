"""Sorting assignments by expert: the sort record every backend and dispatcher reads, and how it is computed.

A flat assignment index is i = t * k + j (token t, slot j). Sorting the flat expert ids stably gives
`order[p]` = the flat index at sorted position p, so expert e owns sorted positions
[offsets[e] - counts[e], offsets[e]) and, within an expert, assignments stay in token order.

Small layers are bound by kernel launches, and a radix sort of 16-bit keys plus the searchsorted group ends is
16 kernels of little work each, so on the GPU with few experts the sort is a stable counting sort in two
launches (measured in benchmarks/results/, see its README). The keys are split into at most NB (<= 8192 / E)
blocks, one program each, read in chunks of SUB keys (a [SUB, E] one-hot of 8K elements):
    1. `_block_counts_kernel`: hist[b, e] = keys of expert e in block b;
    2. `_place_kernel`: every program reads the whole (small) hist, so key i of block b with expert e goes to
       ends[e] - counts[e] + (keys of e in blocks before b) + (keys of e before i within block b):
       equal keys keep their index order (stable), with no atomics (deterministic).
Expert ids must lie in [0, E).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moe.kernels.launch import cdiv, launch, next_pow2

COUNTING_SORT_MAX_EXPERTS = 512  # its per-program one-hot is [BLOCK, E]: wider, torch.sort wins


class Sorted(NamedTuple):
    order: torch.Tensor  # [T*k] int64, flat assignment index at each sorted position
    expert_of: torch.Tensor  # [T*k] int16 (int32 past 32767 experts), expert at each sorted position, non-decreasing
    counts: torch.Tensor  # [E] int64, assignments per expert
    offsets: torch.Tensor  # [E] int64, inclusive cumulative sum of counts (group ends)


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> Sorted:
    """Stable sort of the flat [T*k] expert ids (values in [0, num_experts)), without host syncs.

    On the GPU with up to COUNTING_SORT_MAX_EXPERTS experts: `counting_sort`. Else torch.sort of the keys as
    int16 (fewer radix passes than int64) and the group ends by a binary search of the sorted keys."""
    key_type = torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
    flat = expert_ids.reshape(-1)
    if flat.is_cuda and num_experts <= COUNTING_SORT_MAX_EXPERTS:
        return Sorted(*counting_sort(flat, num_experts, key_type))
    expert_of, order = torch.sort(flat.to(key_type), stable=True)
    experts = torch.arange(num_experts, device=expert_of.device, dtype=key_type)
    offsets = torch.searchsorted(expert_of, experts, right=True)  # [E] int64 group ends
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    return Sorted(order, expert_of, counts, offsets)


@triton.jit
def _block_counts_kernel(ids_ptr, hist_ptr, n, E_POW2: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr):
    b = tl.program_id(0)
    offs_e = tl.arange(0, E_POW2)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for s0 in range(0, BLOCK, SUB):
        offs = b * BLOCK + s0 + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=E_POW2)  # past the end: matches no expert
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), 0)
    tl.store(hist_ptr + b * E_POW2 + offs_e, counts)


@triton.jit
def _place_kernel(ids_ptr, hist_ptr, order_ptr, expert_of_ptr, counts_ptr, ends_ptr, n, num_blocks,
                  E: tl.constexpr, E_POW2: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr):
    b = tl.program_id(0)
    offs_e = tl.arange(0, E_POW2)
    offs_b = tl.arange(0, NB)[:, None]
    hist = tl.load(hist_ptr + offs_b * E_POW2 + offs_e[None, :], mask=offs_b < num_blocks, other=0)  # [NB, E_POW2]
    counts = tl.sum(hist, 0)  # [E_POW2] keys per expert
    ends = tl.cumsum(counts, 0)
    base = ends - counts + tl.sum(tl.where(offs_b < b, hist, 0), 0)  # where this block's next key of e goes
    for s0 in range(0, BLOCK, SUB):
        offs = b * BLOCK + s0 + tl.arange(0, SUB)
        mask = offs < n
        ids = tl.load(ids_ptr + offs, mask=mask, other=E_POW2)
        onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [SUB, E_POW2]
        rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # [SUB] keys of the same expert before it in the chunk
        pos = tl.sum(onehot * base[None, :], 1) + rank
        tl.store(order_ptr + pos, offs.to(tl.int64), mask=mask)
        tl.store(expert_of_ptr + pos, ids.to(expert_of_ptr.dtype.element_ty), mask=mask)
        base += tl.sum(onehot, 0)
    if b == 0:
        tl.store(counts_ptr + offs_e, counts.to(tl.int64), mask=offs_e < E)
        tl.store(ends_ptr + offs_e, ends.to(tl.int64), mask=offs_e < E)


@torch.library.custom_op("moetron::counting_sort", mutates_args=())
def counting_sort(ids: torch.Tensor, num_experts: int,
                  key_type: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [n] int in [0, E) -> (order [n] int64, sorted ids [n] key_type, counts [E] int64, ends [E] int64):
    the stable sort of `ids` and its group sizes and ends (inclusive cumulative counts). A custom op: opaque to
    torch.compile, which sees only the output shapes (below)."""
    n, e_pow2 = ids.numel(), next_pow2(num_experts)
    sub = nb = max(16, 8192 // e_pow2)  # keys per one-hot chunk; most blocks (hist [nb, E] is read whole)
    block = sub * next_pow2(cdiv(n, sub * nb))  # keys per program
    num_blocks = cdiv(n, block)
    order = torch.empty(n, dtype=torch.int64, device=ids.device)
    expert_of = torch.empty(n, dtype=key_type, device=ids.device)
    if n == 0:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
        return order, expert_of, counts, counts.clone()
    counts = torch.empty(num_experts, dtype=torch.int64, device=ids.device)  # both written by program 0
    ends = torch.empty(num_experts, dtype=torch.int64, device=ids.device)
    hist = torch.empty(num_blocks, e_pow2, dtype=torch.int32, device=ids.device)
    launch(_block_counts_kernel, (num_blocks,), (ids, hist), (n,), {"E_POW2": e_pow2, "BLOCK": block, "SUB": sub})
    launch(_place_kernel, (num_blocks,), (ids, hist, order, expert_of, counts, ends), (n, num_blocks),
           {"E": num_experts, "E_POW2": e_pow2, "NB": nb, "BLOCK": block, "SUB": sub})
    return order, expert_of, counts, ends


@counting_sort.register_fake
def _(ids, num_experts, key_type):
    n = ids.shape[0]
    counts = ids.new_empty(num_experts, dtype=torch.int64)
    return ids.new_empty(n, dtype=torch.int64), ids.new_empty(n, dtype=key_type), counts, torch.empty_like(counts)
