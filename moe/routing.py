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


def gate_weights(weights: torch.Tensor, renormalize: bool, straight_through: bool = False) -> torch.Tensor:
    """The combine weights [T, k] from the chosen experts' probabilities [T, k].

    renormalize: rescaled to sum to 1 over the k choices (Mixtral; for top-1 the weight is 1, whose gradient is 0:
    the router then learns only from the auxiliary losses). straight_through (with renormalize): the renormalised
    values, the probabilities' own gradient (w + sg(w_renormalised - w)). Why: with the plain probabilities a top-1
    expert's output is scaled by p ~ 1/E at initialisation, and under Adam (whose step does not depend on the
    gradient's scale) that divides the expert path's effective learning rate by about E; the straight-through gate
    keeps the output at full scale and gives the router Switch's gradient dL/dp = <dL/dy, expert(x)>."""
    if not renormalize:
        return weights
    normalised = weights / weights.sum(-1, keepdim=True).clamp(min=1e-20)
    return weights + (normalised - weights).detach() if straight_through else normalised
