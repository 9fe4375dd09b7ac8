"""Padded capacity backend (GShard / Tutel): dispatch into [E, C, d], batched matmul, combine.

capacity C = max(ceil(capacity_factor * k * T / E), min_capacity), at most T (an expert gets each token once);
capacity_factor = 0: C = the largest expert load (dynamic, dropless, padded; one host sync).
Drop order (moe.drop_policy), the first C assignments of each expert in this order are kept:
  position:    GShard priority, every token's first choice before any second choice, then token order;
  probability: higher router probability first (ties: slot-major order as above).
A dropped assignment produces nothing and gets no gate gradient; a token with all choices dropped keeps only
its residual (this layer outputs 0 for it). Empty slots hold zeros (or Rectify-Router fill-ins, moe/rectify.py).
No host sync except the dynamic capacity.
"""
from __future__ import annotations

import math

import torch

from moe.experts.base import Experts, activate
from moe.permute import combine, count_per_expert, positions_in_expert, rank_of
from moe.rectify import rectify
from moe.routing import Routing


class PaddedExperts(Experts):
    def capacity(self, num_tokens: int, top_k: int, counts: torch.Tensor) -> int:
        cf = self.cfg.capacity_factor
        if cf == 0:
            return max(int(counts.max()), 1)  # the one host sync of this backend
        C = max(math.ceil(cf * top_k * num_tokens / self.num_experts), self.cfg.min_capacity)
        return max(min(C, num_tokens), 1)

    def priority(self, routing: Routing) -> torch.Tensor:
        """[T*k] distinct ranks of the flat assignments t*k+j in drop order (0 = kept first)."""
        T, k = routing.expert_ids.shape
        slot_major = torch.arange(T * k, device=routing.expert_ids.device).view(k, T).t().reshape(-1)  # j*T+t
        if self.cfg.drop_policy == "position":
            return slot_major
        p = routing.probs.detach().gather(1, routing.expert_ids).reshape(-1)  # [T*k]
        # rank by probability, ties in slot-major order: rank the assignments listed in slot-major order
        by_slot = torch.empty_like(slot_major).scatter_(0, slot_major, torch.arange(T * k, device=p.device))
        return torch.empty_like(by_slot).scatter_(0, by_slot, rank_of(p[by_slot]))

    def batched_mlp(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """[E, C, d] -> [E, C, d]: one batched matmul per projection."""
        h3 = torch.bmm(x_ECD, self.w3) if self.w3 is not None else None
        return torch.bmm(activate(torch.bmm(x_ECD, self.w1), h3, self.activation), self.w2)

    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, E = self.cfg, self.num_experts
        (T, k), d = routing.expert_ids.shape, x.shape[1]
        with torch.no_grad():
            flat = routing.expert_ids.reshape(-1)  # [T*k]
            counts = count_per_expert(flat, E)
            C = self.capacity(T, k, counts)
            pos = positions_in_expert(flat, self.priority(routing), E)  # [T*k]
            keep = pos < C
            dest = torch.where(keep, flat * C + pos, E * C).view(T, k)  # E*C: the discarded slot
            num_dropped = (~keep).sum()
        weights = routing.weights * keep.view(T, k)  # [T, k]; dropped: no output, no gate gradient
        if cfg.rectify_intra or cfg.rectify_fill:
            with torch.no_grad():
                fill = torch.clamp(counts, max=C)
                scores = routing.logits if routing.logits is not None else routing.probs  # same order per token
                rect = rectify(scores, routing.expert_ids, keep.view(T, k), fill, C, cfg.drop_policy,
                               cfg.rectify_intra, cfg.rectify_fill)
                num_dropped = num_dropped - rect.weight[:, 0].sum().long()  # rescued by IR
                dest = torch.cat([dest, rect.dest], 1)  # [T, k+2]
            p = routing.probs
            weights = torch.cat([p.gather(1, routing.expert_ids) * keep.view(T, k),
                                 p.gather(1, rect.expert) * rect.weight], 1)  # [T, k+2] processed only
            if cfg.renormalize:
                weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-20)
        K = dest.shape[1]
        # dispatch: copy each token's rows into its slots of a zeroed [E*C + 1, d] buffer; unused assignments
        # write the extra last row, which is cut off (its gradient is zero)
        rows = x if K == 1 else x.repeat_interleave(K, 0)  # [T*K, d] in slot order
        x_pad = x.new_zeros(E * C + 1, d).index_copy(0, dest.reshape(-1), rows)[:-1].view(E, C, d)
        y_pad = self.batched_mlp(x_pad).view(E * C, d)
        # combine: unused assignments (weight 0) read arbitrary real rows spread over the buffer, so that their
        # zero gradients do not all pile onto one row in the backward scatter-add
        spread = torch.arange(T * K, device=x.device) % (E * C)
        flat_dest = dest.reshape(-1)
        y_flat = y_pad[torch.where(flat_dest < E * C, flat_dest, spread)]  # [T*K, d] slot order
        return combine(y_flat, weights), num_dropped
