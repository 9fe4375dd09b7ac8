"""Local permutation: flat assignments sorted by expert, without host syncs.

A flat assignment index is i = t * k + j (token t, slot j). Sorting the flat expert ids stably gives
`order[p]` = the flat index at sorted position p, so expert e owns sorted positions
[offsets[e] - counts[e], offsets[e]).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from moe.kernels.sort import counting_sort

COUNTING_SORT_MAX_EXPERTS = 512  # its per-program one-hot is [BLOCK, E]: wider, torch.sort wins


class Sorted(NamedTuple):
    order: torch.Tensor  # [T*k] int64, flat assignment index at each sorted position
    expert_of: torch.Tensor  # [T*k] int16 (int32 past 32767 experts), expert at each sorted position, non-decreasing
    counts: torch.Tensor  # [E] int64, assignments per expert
    offsets: torch.Tensor  # [E] int64, inclusive cumulative sum of counts (group ends)


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 assignments per expert by scatter-add (no host sync, unlike bincount().tolist())."""
    flat = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> Sorted:
    """Stable sort of the flat [T*k] expert ids: within an expert, assignments stay in token order.

    On the GPU with up to COUNTING_SORT_MAX_EXPERTS experts: a counting sort in two launches
    (moe/kernels/sort.py). Else torch.sort of the keys as int16 (fewer radix passes than int64) and the group
    ends by a binary search of the sorted keys."""
    key_type = torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
    flat = expert_ids.reshape(-1)
    if flat.is_cuda and num_experts <= COUNTING_SORT_MAX_EXPERTS:
        return Sorted(*counting_sort(flat, num_experts, key_type))
    expert_of, order = torch.sort(flat.to(key_type), stable=True)
    experts = torch.arange(num_experts, device=expert_of.device, dtype=key_type)
    offsets = torch.searchsorted(expert_of, experts, right=True)  # [E] int64 group ends
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    return Sorted(order, expert_of, counts, offsets)


def combine(y_flat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * y_flat[t * k + j], as an elementwise weighted sum.

    y_flat [T*k, d] in slot order, weights [T, k] -> [T, d]. Elementwise multiply-and-sum is several times
    faster than the [T,1,k] x [T,k,d] batched matmul at small widths.
    """
    T, k = weights.shape
    y_TKD = y_flat.view(T, k, y_flat.shape[-1])  # explicit width: T may be 0 (a rank with no tokens)
    return (y_TKD * weights.to(y_flat.dtype).unsqueeze(-1)).sum(1)


def rank_of(values: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """[N] int64 rank of each value (0 = first), ties broken by index: a priority for `positions_in_expert`."""
    order = torch.sort(values, descending=descending, stable=True).indices
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def positions_in_expert(expert_flat: torch.Tensor, priority: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[N] int64 position of each assignment among those of its expert, in order of `priority` (0 = first).

    expert_flat [N] in [0, num_bins), priority [N] distinct integers in [0, N). One sort of the unique keys
    expert * N + priority; no host sync.
    """
    N = expert_flat.numel()
    order = torch.sort(expert_flat * N + priority).indices  # sorted position -> assignment
    counts = count_per_expert(expert_flat, num_bins)
    starts = torch.cumsum(counts, 0) - counts  # [num_bins] first sorted position of each bin
    pos_sorted = torch.arange(N, device=expert_flat.device) - starts[expert_flat[order]]
    return torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)
