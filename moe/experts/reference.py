"""The ground truth: a plain loop over experts. Slow (one host sync per expert), never wrong."""
from __future__ import annotations

import torch

from moe.experts.base import Experts
from moe.permute import combine
from moe.routing import Routing


class ReferenceExperts(Experts):
    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        T, k = routing.expert_ids.shape
        flat_ids = routing.expert_ids.reshape(-1)  # [T*k]
        y_flat = x.new_zeros(T * k, x.shape[1])  # [T*k, d] slot order
        for e in range(self.num_experts):
            slots = (flat_ids == e).nonzero().squeeze(1)  # flat indices routed to e
            if slots.numel():
                y_flat = y_flat.index_put((slots,), self.expert_mlp(x[slots // k], e))
        return combine(y_flat, routing.weights), x.new_zeros((), dtype=torch.int64)
