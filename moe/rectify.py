"""Rectify-Router (Zeng et al. 2024) for the capacity step: use the capacity that top-k leaves empty.

Both passes work on the [E, C] slot table after the top-k drop (moe/capacity.py), keep the capacity C (so the
cost of the padded batched matmul is unchanged), and run on the device without host syncs. Scores are the
router logits. The result is up to two more assignments per token, which the dispatcher sends like the others.

Intra rectification (IR), for dropped assignments. The paper sends a dropped token to the best expert on its
own GPU, without capacity limit. With a single expert-parallel rank every expert is local, so the equivalent
chosen here keeps the fixed cost instead: a token that lost m >= 1 of its k assignments proposes ONE expert h,
its highest-scoring expert outside its top-k that still has free slots after the top-k dispatch; each expert
accepts proposals up to its free slots, in the drop policy's order (position: token order; probability:
higher score first), in one round (a rejected token stays dropped). h is weighted m times (A4 of the note).

Fill-in rectification (FR), for padding, after IR: each token's candidate is its (k+1)-th highest-scoring
expert; each expert's still-empty slots take its candidates with the highest scores (ties: token order).
A candidate already placed there by IR is skipped. With k = E there is no candidate and FR does nothing.

Weights: the processed experts of a token (kept top-k, IR expert with multiplicity m, FR expert) are weighted
by their router probabilities; with moe.router.renormalize they are normalised over the processed experts, which is
eq. A4 exactly. Without renormalisation the router gets a gradient through p even at k = 1 (Switch style).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from moe.positions import count_per_expert, positions_in_expert, rank_of


class Rectified(NamedTuple):
    expert: torch.Tensor  # [T, 2] int64 IR and FR expert of each token (arbitrary where unused)
    weight: torch.Tensor  # [T, 2] fp32 multiplicity: m for IR (lost assignments rescued), 1 for FR, 0 unused


def _place(logits_masked: torch.Tensor, want: torch.Tensor, priority: torch.Tensor | None,
           fill: torch.Tensor, C: int):
    """Each wanting token proposes its best unmasked expert; experts accept up to their free slots.

    Returns (expert [T], placed [T] bool, new fill [E]). priority None: by score, highest first.
    """
    E = fill.numel()
    score, expert = logits_masked.max(1)  # [T]
    want = want & torch.isfinite(score)
    bins = torch.where(want, expert, E)  # non-proposals go to an extra bin
    prio = rank_of(score) if priority is None else priority
    pos = positions_in_expert(bins, prio, E + 1)  # [T]
    free = C - fill  # [E]
    placed = want & (pos < free[expert])
    used = count_per_expert(torch.where(placed, expert, E), E + 1)[:E]
    return expert, placed, fill + used


def rectify(logits: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor, C: int,
            policy: str, intra: bool, fill_in: bool) -> Rectified:
    """logits [T, E] fp32, expert_ids / keep [T, k], fill [E] slots used per expert (<= C), C capacity."""
    T = logits.shape[0]
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, expert_ids, True)  # [T, E] top-k
    outside = logits.detach().masked_fill(chosen, float("-inf"))  # [T, E] scores outside the top-k
    ir_expert, ir_weight = torch.zeros(T, dtype=torch.int64, device=logits.device), logits.new_zeros(T)
    fr_expert, fr_weight = ir_expert, ir_weight
    ir_placed = torch.zeros(T, dtype=torch.bool, device=logits.device)
    if intra:
        lost = (~keep).sum(1)  # [T] dropped assignments
        priority = torch.arange(T, device=logits.device) if policy == "position" else None
        ir_expert, ir_placed, fill = _place(outside.masked_fill((fill >= C)[None], float("-inf")), lost > 0,
                                            priority, fill, C)
        ir_weight = (lost * ir_placed).float()
    if fill_in:
        c = outside.argmax(1)  # [T] the (k+1)-th choice
        candidate = torch.full_like(outside, float("-inf")).scatter_(1, c[:, None], outside.gather(1, c[:, None]))
        candidate = candidate.masked_fill((fill >= C)[None], float("-inf"))  # [T, E] one finite entry at most
        fr_expert, placed, fill = _place(candidate, ~(ir_placed & (ir_expert == c)), None, fill, C)
        fr_weight = placed.float()
    return Rectified(torch.stack([ir_expert, fr_expert], 1), torch.stack([ir_weight, fr_weight], 1))
