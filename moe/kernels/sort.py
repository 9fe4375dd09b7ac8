"""Stable counting sort of expert ids on the GPU: three launches where torch.sort and the group bounds take 16.

Small layers are bound by launches (S1 of benchmarks/bench_moe.py), and a radix sort of 16-bit keys plus the
searchsorted group ends is 16 kernels, most of a microsecond of work each. With few experts a counting sort
is cheaper: keys are split into blocks of BLOCK;
    1. `_block_counts_kernel`: hist[b, e] = keys of expert e in block b;
    2. `_scan_kernel`: cum[b, e] = hist[0, e] + ... + hist[b, e], one program per expert (torch.cumsum over
       the outer dim took 0.04 ms, more than the whole sort);
    3. `_place_kernel`: key i of block b with expert e goes to sorted position
       ends[e] - counts[e] + (cum[b, e] - hist[b, e]) + (keys of e before i within the block),
       so equal keys keep their index order (stable), with no atomics (deterministic).
Expert ids must lie in [0, E).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels.launch import cdiv, launch, next_pow2


@triton.jit
def _block_counts_kernel(ids_ptr, hist_ptr, n, E_POW2: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=E_POW2)  # past the end: matches no expert
    onehot = (ids[:, None] == tl.arange(0, E_POW2)[None, :]).to(tl.int32)  # [BLOCK, E_POW2]
    tl.store(hist_ptr + b * E_POW2 + tl.arange(0, E_POW2), tl.sum(onehot, 0))


@triton.jit
def _scan_kernel(hist_ptr, cum_ptr, num_blocks, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    e = tl.program_id(0)
    carry = tl.zeros((), dtype=tl.int32)
    for b0 in range(0, num_blocks, CHUNK):
        offs = b0 + tl.arange(0, CHUNK)
        h = tl.load(hist_ptr + offs * E_POW2 + e, mask=offs < num_blocks, other=0)
        tl.store(cum_ptr + offs * E_POW2 + e, tl.cumsum(h, 0) + carry, mask=offs < num_blocks)
        carry += tl.sum(h, 0)


@triton.jit
def _place_kernel(ids_ptr, hist_ptr, cum_ptr, order_ptr, expert_of_ptr, counts_ptr, ends_ptr, n, num_blocks,
                  E: tl.constexpr, E_POW2: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs_e = tl.arange(0, E_POW2)
    counts = tl.load(cum_ptr + (num_blocks - 1) * E_POW2 + offs_e)  # [E_POW2] keys per expert
    ends = tl.cumsum(counts, 0)
    earlier = tl.load(cum_ptr + b * E_POW2 + offs_e) - tl.load(hist_ptr + b * E_POW2 + offs_e)  # in blocks < b
    base = ends - counts + earlier  # [E_POW2] sorted position of this block's first key of each expert
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ids = tl.load(ids_ptr + offs, mask=mask, other=E_POW2)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [BLOCK, E_POW2]
    rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # [BLOCK] keys of the same expert before it in the block
    pos = tl.sum(onehot * base[None, :], 1) + rank
    tl.store(order_ptr + pos, offs.to(tl.int64), mask=mask)
    tl.store(expert_of_ptr + pos, ids.to(expert_of_ptr.dtype.element_ty), mask=mask)
    if b == 0:
        tl.store(counts_ptr + offs_e, counts.to(tl.int64), mask=offs_e < E)
        tl.store(ends_ptr + offs_e, ends.to(tl.int64), mask=offs_e < E)


def counting_sort(ids: torch.Tensor, num_experts: int, key_type: torch.dtype):
    """ids [n] int in [0, E) -> (order [n] int64, sorted ids [n] key_type, counts [E] int64, ends [E] int64):
    the stable sort of `ids` and its group sizes and ends (inclusive cumulative counts)."""
    n, e_pow2 = ids.numel(), next_pow2(num_experts)
    block = max(16, 8192 // e_pow2)  # the [BLOCK, E] one-hot of a program stays 8K elements
    num_blocks = cdiv(n, block)
    order = torch.empty(n, dtype=torch.int64, device=ids.device)
    expert_of = torch.empty(n, dtype=key_type, device=ids.device)
    if n == 0:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
        return order, expert_of, counts, counts.clone()
    counts = torch.empty(num_experts, dtype=torch.int64, device=ids.device)  # both written by program 0
    ends = torch.empty(num_experts, dtype=torch.int64, device=ids.device)
    hist = torch.empty(num_blocks, e_pow2, dtype=torch.int32, device=ids.device)
    launch(_block_counts_kernel, (num_blocks,), (ids, hist), (n,), {"E_POW2": e_pow2, "BLOCK": block})
    cum = torch.empty_like(hist)
    launch(_scan_kernel, (e_pow2,), (hist, cum), (num_blocks,), {"E_POW2": e_pow2, "CHUNK": 1024})
    launch(_place_kernel, (num_blocks,), (ids, hist, cum, order, expert_of, counts, ends), (n, num_blocks),
           {"E": num_experts, "E_POW2": e_pow2, "BLOCK": block})
    return order, expert_of, counts, ends
