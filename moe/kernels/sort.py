"""Stable counting sort of expert ids on the GPU: two launches where torch.sort and the group bounds take 16.

Small layers are bound by launches (S1 of benchmarks/bench_moe.py), and a radix sort of 16-bit keys plus the
searchsorted group ends is 16 kernels, most of a microsecond of work each. With few experts a counting sort
is cheaper. The keys are split into at most NB (<= 8192 / E) blocks, one program each, read in chunks of SUB
keys (a [SUB, E] one-hot of 8K elements):
    1. `_block_counts_kernel`: hist[b, e] = keys of expert e in block b;
    2. `_place_kernel`: every program reads the whole (small) hist, so key i of block b with expert e goes to
       ends[e] - counts[e] + (keys of e in blocks before b) + (keys of e before i within block b):
       equal keys keep their index order (stable), with no atomics (deterministic).
Expert ids must lie in [0, E).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels.launch import cdiv, launch, next_pow2


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


def counting_sort(ids: torch.Tensor, num_experts: int, key_type: torch.dtype):
    """ids [n] int in [0, E) -> (order [n] int64, sorted ids [n] key_type, counts [E] int64, ends [E] int64):
    the stable sort of `ids` and its group sizes and ends (inclusive cumulative counts)."""
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
