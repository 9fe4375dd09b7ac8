"""Counting and ranking assignments on the device, without host syncs: the helpers of the capacity step
(moe/capacity.py), Rectify-Router (moe/rectify.py) and the router's load counts."""
from __future__ import annotations

import torch


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 assignments per expert by scatter-add (no host sync, unlike bincount().tolist())."""
    flat = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


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
