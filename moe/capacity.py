"""The capacity step of the padded backend (GShard / Tutel): which assignments each expert keeps.

Between the router and the dispatcher, on the rank that routed the tokens, over the batch of T tokens:
    capacity C = max(ceil(capacity.factor * k * T / E), capacity.min), at most T (an expert gets each token
    once); factor = 0: C = the largest expert load (dynamic, dropless; one host sync, and only when
    Rectify-Router needs C).
Drop order (capacity.drop_policy); each expert keeps its first C assignments in this order. Every policy puts
every token's first choice before any second choice (GShard's priority, Lepikhin et al. 2020 §2.2), then orders
the tokens within a choice:
    position:    token order (GShard);
    bpr:         Batch Prioritized Routing (V-MoE, Riquelme et al. 2021 §4.1): by the token's top router
                 probability, highest first, for every choice (ties: token order);
    probability: by the router probability of that assignment itself, highest first (ties: token order).
A dropped assignment is not dispatched and gets no gate gradient; a token with all choices dropped keeps only
its residual (the layer outputs 0 for it). Rectify-Router (moe/rectify.py) then adds up to two assignments per
token, IR and FR: the routing grows from k to k + 2 slots, unused ones not kept.

Under expert parallelism (capacity.scope=global, the default) T is the batch of the whole expert-parallel group:
the ranks' tokens concatenated in rank order (parallel/comm.py `Peers`), so what is dropped does not depend on
the layout: ep ranks drop exactly the (token, slot) pairs one process drops on that batch, and an expert receives
at most C rows. Each rank decides for its own rows, without moving tokens, from an all-gather of every rank's
expert ids (T*k int64 per rank) and, for bpr / probability, the scores (T*k fp32 per rank); Fill-in
Rectification adds each token's candidate and score (T int64 + T fp32). At T = 8k tokens per rank, k = 2,
ep = 8 a rank receives 1 MiB of ids and 0.5 MiB of scores, against the tokens' own all-to-all of T*k*d*2 bytes
(64 MiB at d = 2048 in bf16); and every rank sorts the group's ep*T*k assignments (131k keys there).
capacity.scope=source is GShard's per-source capacity: C from each rank's own tokens, decided there with no
communication; an expert then receives at most ep * C rows, and which assignments are dropped depends on how the
tokens are split over ranks (layout-dependent).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from moe.config import CapacityConfig
from moe.positions import count_per_expert, positions_in_expert, rank_of
from moe.rectify import rectify
from moe.routing import Routing, gate_weights
from parallel.comm import Peers


class Capped(NamedTuple):
    routing: Routing  # with `kept` set (and k + 2 slots with Rectify-Router, the IR slot marked `intra`)
    capacity: int | None  # a bound on the rows every expert receives; None: no bound computed (dynamic)
    num_dropped: torch.Tensor  # [] int64 this rank's assignments dropped (after Rectify's rescues)


def capacity(cfg: CapacityConfig, num_tokens: int, top_k: int, counts: torch.Tensor) -> int:
    """C for T = num_tokens tokens with k choices over E = len(counts) experts (dynamic: a host sync)."""
    if cfg.factor == 0:
        return max(int(counts.max()), 1)
    C = max(math.ceil(cfg.factor * top_k * num_tokens / counts.numel()), cfg.min)
    return max(min(C, num_tokens), 1)


def drop_scores(routing: Routing, policy: str) -> torch.Tensor | None:
    """[T, k] what orders the tokens within each choice, highest first; None: token order (position)."""
    if policy == "position":
        return None
    p = routing.probs.detach()
    if policy == "bpr":  # V-MoE's priority score: the token's largest routing weight, for all its choices
        return p.max(1, keepdim=True).values.expand_as(routing.weights).contiguous()
    return p.gather(1, routing.expert_ids)


def priority(expert_ids: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """[T*k] distinct ranks of the flat assignments t*k+j in drop order (0 = kept first): choice j before
    choice j+1, within a choice by scores[:, j] highest first (None: token order), ties in token order."""
    T, k = expert_ids.shape
    device = expert_ids.device
    if scores is None:
        within = torch.arange(T, device=device)[:, None].expand(T, k)
    else:
        within = torch.stack([rank_of(s) for s in scores.unbind(1)], 1)
    return (within + torch.arange(k, device=device) * T).reshape(-1)


def apply_capacity(routing: Routing, cfg: CapacityConfig, renormalize: bool, peers: Peers | None = None,
                   local_experts: range | None = None, straight_through: bool = False) -> Capped:
    """Drop what exceeds each expert's capacity, then rescue with Rectify-Router if configured.

    `peers`: the expert-parallel group (None: this process alone); `local_experts`: the experts on this rank
    (None: all), the only ones Intra-GPU Rectification may choose."""
    (T, k), E = routing.expert_ids.shape, routing.num_experts
    if cfg.factor == 0 and not cfg.rectify:  # dynamic and nothing to fill: every assignment is kept
        return Capped(routing, None, routing.counts.new_zeros(()))
    peers = peers or Peers()
    ep = peers.size
    if cfg.scope == "source":  # GShard: each rank decides over its own tokens alone
        peers = Peers()
    with torch.no_grad():
        ids = peers.gather(routing.expert_ids)  # [P*T, k] the group's batch
        counts = count_per_expert(ids, E) if peers.size > 1 else routing.counts
        C = capacity(cfg, ids.shape[0], k, counts)
        scores = drop_scores(routing, cfg.drop_policy)
        prio = priority(ids, None if scores is None else peers.gather(scores))
        keep_all = (positions_in_expert(ids.reshape(-1), prio, E) < C).view(-1, k)
        keep = peers.own(keep_all)
        num_dropped = (~keep).sum()
    bound = C if peers.size == ep else ep * C  # source scope: every source rank fills up to C
    if not cfg.rectify:
        return Capped(dataclasses.replace(routing, weights=routing.weights * keep, kept=keep), bound, num_dropped)
    with torch.no_grad():
        fill = count_per_expert(torch.where(keep_all, ids, E), E + 1)[:E]  # [E] slots the top-k filled
        local = torch.zeros(E, dtype=torch.bool, device=ids.device)
        local[slice(local_experts.start, local_experts.stop) if local_experts is not None else slice(None)] = True
        rect = rectify(routing.logits, routing.expert_ids, keep, fill, C, cfg.drop_policy, local, peers,
                       cfg.rectify_intra, cfg.rectify_intra_capped, cfg.rectify_fill)
        num_dropped = num_dropped - rect.weight[:, 0].sum().long()  # rescued by IR
    if cfg.rectify_intra and not cfg.rectify_intra_capped:
        bound = None  # the paper's IR takes every dropped token: no static bound on an expert's rows
    p = routing.probs
    weights = torch.cat([p.gather(1, routing.expert_ids) * keep, p.gather(1, rect.expert) * rect.weight], 1)
    weights = gate_weights(weights, renormalize, straight_through)
    intra = torch.zeros(T, k + 2, dtype=torch.bool, device=keep.device)
    intra[:, k] = True  # the IR slot: computed on this rank, never sent (moe/dispatch.py)
    return Capped(dataclasses.replace(routing, expert_ids=torch.cat([routing.expert_ids, rect.expert], 1),
                                      weights=weights, kept=torch.cat([keep, rect.weight > 0], 1), intra=intra),
                  bound, num_dropped)
