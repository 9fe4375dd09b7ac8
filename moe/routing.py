"""The router's output: the one object every expert backend consumes.

Shapes: T tokens, k choices per token, E experts (all experts, before any expert-parallel split).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Routing:
    expert_ids: torch.Tensor  # [T, k] int64, expert chosen for each (token, slot)
    weights: torch.Tensor  # [T, k] fp32, gate multiplying that expert's output
    probs: torch.Tensor  # [T, E] fp32, router probabilities (for losses and metrics)
    aux_loss: torch.Tensor  # [] load-balance loss (unweighted)
    z_loss: torch.Tensor  # [] router z-loss (unweighted)
    num_experts: int
    stats: dict = field(default_factory=dict)  # extra per-call tensors, never synced to the host here
    logits: torch.Tensor | None = None  # [T, E] fp32 raw router scores (Rectify-Router ranks tokens by them)

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]
