"""SparseMixer router gradients (v1: Liu et al. 2023, top-1; v2: GRIN 2024, top-1/top-2).

Only the selected experts are computed. The estimator changes the forward multiplier of the chosen expert
and the gradient that flows from that multiplier into the router logits (docs/algorithms.md §4):

- mask (no gradient): expert j is out when (m - l_j) / max(|l_j|, m) > 2*eps, m = max_j l_j (the experts
  that Switch's multiplicative jitter U[1-eps, 1+eps] could never select); p = softmax over the rest;
- training: D ~ p by Gumbel-max; evaluation: D = argmax;
- v1 (k=1): forward multiplier p_D if D is the argmax or u > 1/2, else p_D / 2 (mid-point); the backward
  gives dL/dl = 2 g p_D (onehot_D - p) in both branches, g = dL/d(multiplier);
- v2 (k=2): two stages in sequence; stage 2 excludes D1 and
  re-masks relative to the remaining maximum. Forward p_D if D is the stage's argmax or u > 3/4, else p_D / 3
  (Heun); backward dL/dl = g p_D (onehot_D - p) (the unscaled gate's softmax Jacobian), both stages adding
  into the same logits.
- evaluation: argmax at each stage, unscaled masked-softmax multipliers, plain autograd.

k=1 runs v1 (with the learnable channel scale omega [d], held by the router and applied by MoELayer);
k=2 runs v2. Probabilities returned for the load-balance loss: v1 the masked softmax (as the v1 code), v2 the
full softmax of the raw logits (as the v2 code and the PhiMoE port).
"""
from __future__ import annotations

import torch

V1 = {"full_prob": 0.5, "scale": 0.5, "grad_factor": 2.0}  # mid-point
V2 = {"full_prob": 0.25, "scale": 1.0 / 3.0, "grad_factor": 1.0}  # Heun's third-order rule


def jitter_mask(logits: torch.Tensor, eps: float, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """[T, E] bool, True where masked: relative gap to the (remaining) maximum above 2*eps, or `excluded`."""
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    m = logits.max(-1, keepdim=True).values  # [T, 1]
    n = torch.maximum(logits.abs(), m)
    mask = (m - logits) > 2 * eps * n  # (m - l)/n > 2 eps without dividing by n = 0
    return mask if excluded is None else mask | excluded


def scaled_gate(p_D: torch.Tensor, scale: torch.Tensor, grad_factor: float) -> torch.Tensor:
    """Forward scale * p_D; backward grad_factor * g into p_D (so into the logits through the softmax:
    grad_factor * g * p_D * (onehot_D - p)), whatever the forward scale."""
    return grad_factor * p_D + (scale - grad_factor) * p_D.detach()


def _select(logits: torch.Tensor, mask: torch.Tensor, training: bool, rule: dict):
    """One stage: masked softmax, choice, multiplier. Returns (D [T,1], multiplier [T,1], p [T,E])."""
    masked = logits.masked_fill(mask, float("-inf"))
    p = masked.softmax(-1)  # [T, E], 0 where masked
    best = masked.argmax(-1, keepdim=True)  # [T, 1]
    if not training:
        return best, p.gather(1, best), p
    with torch.no_grad():
        gumbel = -torch.empty_like(masked).exponential_().clamp_min(1e-30).log()
        D = (masked + gumbel).argmax(-1, keepdim=True)  # D ~ p
        full = (D == best) | (torch.rand_like(p[:, :1]) > 1 - rule["full_prob"])
        scale = torch.where(full, 1.0, rule["scale"])  # [T, 1]
    return D, scaled_gate(p.gather(1, D), scale, rule["grad_factor"]), p


def sparsemixer_route(logits: torch.Tensor, top_k: int, eps: float, training: bool):
    """logits [T, E] fp32 -> (expert_ids [T, k], weights [T, k], probs [T, E] for the balance loss)."""
    if top_k == 1:
        D, w, p = _select(logits, jitter_mask(logits.detach(), eps), training, V1)
        return D, w, p
    if top_k != 2:
        raise ValueError(f"SparseMixer supports top_k 1 or 2, not {top_k}")
    D1, w1, _ = _select(logits, jitter_mask(logits.detach(), eps), training, V2)
    excluded = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, D1, True)
    D2, w2, _ = _select(logits, jitter_mask(logits.detach(), eps, excluded), training, V2)
    return torch.cat([D1, D2], 1), torch.cat([w1, w2], 1), logits.softmax(-1)
