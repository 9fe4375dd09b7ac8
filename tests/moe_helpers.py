"""Shared by the MoE tests: a routing record from hand-made choices, and experts run through the local
dispatcher (dispatch -> experts -> combine), as the MoE layer runs them."""
from __future__ import annotations

import torch

from moe import layer
from moe.dispatch import LocalDispatcher
from moe.positions import count_per_expert
from moe.routing import Routing


def make_routing(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, probs: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None) -> Routing:
    """A Routing of the given choices and gates; probs and logits arbitrary unless given."""
    T = ids.shape[0]
    if probs is None:
        probs = torch.full((T, num_experts), 1 / num_experts, dtype=weights.dtype)
    if logits is None:
        logits = probs.clamp_min(1e-30).log()
    zero = weights.new_zeros(())
    return Routing(ids, weights, probs, logits, count_per_expert(ids, num_experts), zero, zero)


def run_experts(experts: torch.nn.Module, x: torch.Tensor, routing: Routing, capacity=None, renormalize=False):
    """y [T, d]: the experts on x through the local dispatcher, gates applied, as the MoE layer runs them;
    with `capacity` (a CapacityConfig) after the capacity step, and then (y, assignments dropped)."""
    y, dropped = layer.run_experts(LocalDispatcher(), experts, x, routing, capacity, renormalize)
    return y if capacity is None else (y, dropped)
