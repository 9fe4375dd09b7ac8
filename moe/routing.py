"""The router's output: what the capacity step and the token dispatcher consume.

Shapes: T tokens, k choices per token, E experts (all experts, before any expert-parallel split).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    expert_ids: torch.Tensor  # [T, k] int64, expert chosen for each (token, slot)
    weights: torch.Tensor  # [T, k] fp32, gate multiplying that expert's output
    probs: torch.Tensor  # [T, E] fp32, router probabilities (for losses, the bpr / probability drop policies)
    logits: torch.Tensor  # [T, E] fp32 raw router scores (Rectify-Router ranks tokens by them)
    counts: torch.Tensor  # [E] int64 assignments per expert, as chosen (before any drop)
    aux_loss: torch.Tensor  # [] load-balance loss (unweighted)
    z_loss: torch.Tensor  # [] router z-loss (unweighted)
    kept: torch.Tensor | None = None  # [T, k] bool, set by the capacity step: False = not dispatched
    intra: torch.Tensor | None = None  # [T, k] bool, set by Rectify-Router: computed on this rank, never sent

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]
