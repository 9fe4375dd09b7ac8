"""The capacity step of the padded backend (GShard / Tutel): which assignments each expert keeps.

Between the router and the dispatcher, on the rank that routed the tokens:
    capacity C = max(ceil(capacity.factor * k * T / E), capacity.min), at most T (an expert gets each token
    once); factor = 0: C = the largest expert load (dynamic, dropless; one host sync, and only when
    Rectify-Router needs C).
Drop order (capacity.drop_policy); each expert keeps its first C assignments in this order:
    position:    GShard priority, every token's first choice before any second choice, then token order;
    probability: higher router probability first (ties: slot-major order as above).
A dropped assignment is not dispatched and gets no gate gradient; a token with all choices dropped keeps only
its residual (the layer outputs 0 for it). Rectify-Router (moe/rectify.py) then adds up to two assignments
per token into the capacity the top-k left: the routing grows from k to k + 2 slots, unused ones not kept.

Under expert parallelism C is computed from each source rank's own tokens (GShard's per-source capacity):
an expert receives at most ep * C rows, the bound the padded experts size their buffer by.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from moe.config import CapacityConfig
from moe.positions import positions_in_expert, rank_of
from moe.rectify import rectify
from moe.routing import Routing


class Capped(NamedTuple):
    routing: Routing  # with `kept` set (and k + 2 slots with Rectify-Router)
    capacity: int | None  # C, a bound on every expert's kept assignments; None: dynamic, no bound computed
    num_dropped: torch.Tensor  # [] int64 assignments dropped (after Rectify's rescues)


def capacity(cfg: CapacityConfig, num_tokens: int, top_k: int, counts: torch.Tensor) -> int:
    """C for T = num_tokens tokens with k choices over E = len(counts) experts (dynamic: a host sync)."""
    if cfg.factor == 0:
        return max(int(counts.max()), 1)
    C = max(math.ceil(cfg.factor * top_k * num_tokens / counts.numel()), cfg.min)
    return max(min(C, num_tokens), 1)


def priority(routing: Routing, policy: str) -> torch.Tensor:
    """[T*k] distinct ranks of the flat assignments t*k+j in drop order (0 = kept first)."""
    T, k = routing.expert_ids.shape
    slot_major = torch.arange(T * k, device=routing.expert_ids.device).view(k, T).t().reshape(-1)  # j*T+t
    if policy == "position":
        return slot_major
    p = routing.probs.detach().gather(1, routing.expert_ids).reshape(-1)  # [T*k]
    # rank by probability, ties in slot-major order: rank the assignments listed in slot-major order
    by_slot = torch.empty_like(slot_major).scatter_(0, slot_major, torch.arange(T * k, device=p.device))
    return torch.empty_like(by_slot).scatter_(0, by_slot, rank_of(p[by_slot]))


def apply_capacity(routing: Routing, cfg: CapacityConfig, renormalize: bool) -> Capped:
    """Drop what exceeds each expert's capacity, then rescue with Rectify-Router if configured."""
    (T, k), E = routing.expert_ids.shape, routing.num_experts
    if cfg.factor == 0 and not cfg.rectify:  # dynamic and nothing to fill: every assignment is kept
        return Capped(routing, None, routing.counts.new_zeros(()))
    with torch.no_grad():
        flat = routing.expert_ids.reshape(-1)  # [T*k]
        C = capacity(cfg, T, k, routing.counts)
        keep = (positions_in_expert(flat, priority(routing, cfg.drop_policy), E) < C).view(T, k)
        num_dropped = (~keep).sum()
    if not cfg.rectify:
        return Capped(dataclasses.replace(routing, weights=routing.weights * keep, kept=keep), C, num_dropped)
    with torch.no_grad():
        fill = torch.clamp(routing.counts, max=C)  # [E] slots the top-k filled
        rect = rectify(routing.logits, routing.expert_ids, keep, fill, C, cfg.drop_policy, cfg.rectify_intra,
                       cfg.rectify_fill)
        num_dropped = num_dropped - rect.weight[:, 0].sum().long()  # rescued by IR
    p = routing.probs
    weights = torch.cat([p.gather(1, routing.expert_ids) * keep, p.gather(1, rect.expert) * rect.weight], 1)
    if renormalize:
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-20)
    return Capped(dataclasses.replace(routing, expert_ids=torch.cat([routing.expert_ids, rect.expert], 1),
                                      weights=weights, kept=torch.cat([keep, rect.weight > 0], 1)),
                  C, num_dropped)
