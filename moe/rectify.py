"""Rectify-Router (Zeng et al. 2024) for the capacity step: a second chance for dropped assignments (IR) and
the padding slots put to use (FR).

Both passes run in the capacity step (moe/capacity.py), before dispatch, on the device without host syncs, over
the batch of the expert-parallel group (parallel/comm.py `Peers`; one process: a group of one). Scores are the
router logits. The result is up to two more assignments per token, slot k (IR) and slot k + 1 (FR).

Intra-GPU Rectification (IR), for dropped assignments. A token that lost m >= 1 of its k assignments to
capacity goes to ONE expert h: its highest-scoring expert among the experts on its own GPU (this rank's; in one
process all E), outside its top-k, weighted m times (eq. A4 of the note). Outside the top-k because the
experts of the top-k either process the token already or have just refused it for capacity (re-admitting that
one would undo the capacity: in one process IR would then be no capacity at all). The IR assignment is computed
on the token's own rank, in the same layer, beside the rows the all-to-all brought (moe/dispatch.py): no extra
exchange. Capacity does not apply to it: the seed paper defines IR for every dropped token, "routes the dropped
tokens to the experts within the GPU where they are located, eliminating the need for inter-GPU communication"
(seed 003, §2.4), and expects it to matter most "with a lower capacity factor, as it deals with a larger number
of dropped tokens" (§2.7); no capacity for the IR pass is stated (docs/algorithms.md §3.2). So an expert's rows
are no longer bounded by C, and the padded backend sizes its buffer dynamically (one host sync).
Where the best expert outside the top-k is on another GPU, ep > 1 picks the best local one instead: the
documented difference from one process (the same result wherever the local experts include it).

capacity.rectify_intra_capped: the fixed-cost variant instead: the token proposes its best local expert outside
its top-k that still has free slots after the top-k, and each expert accepts proposals up to its free slots in
one round, in the drop policy's order (position: token order; bpr / probability: higher score first); a rejected
token stays dropped. C stays a bound. Under ep > 1 only this rank's tokens compete for this rank's experts.

Fill-in rectification (FR), for padding, after IR: each token's candidate is its (k+1)-th highest-scoring
expert; each expert's still-empty slots take its candidates with the highest scores over the whole group
(ties: token order), so the result does not depend on the layout. A candidate already placed there by IR is
skipped. With k = E there is no candidate and FR does nothing. FR assignments are dispatched like the top-k.

Weights: the processed experts of a token (kept top-k, IR expert with multiplicity m, FR expert) are weighted
by their router probabilities; with moe.router.renormalize they are normalised over the processed experts, which is
eq. A4 exactly. Without renormalisation the router gets a gradient through p even at k = 1 (Switch style).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from moe.positions import count_per_expert, positions_in_expert, rank_of
from parallel.comm import Peers


class Rectified(NamedTuple):
    expert: torch.Tensor  # [T, 2] int64 IR and FR expert of each token (arbitrary where unused)
    weight: torch.Tensor  # [T, 2] fp32 multiplicity: m for IR (lost assignments rescued), 1 for FR, 0 unused


def _place(expert: torch.Tensor, score: torch.Tensor, want: torch.Tensor, priority: torch.Tensor | None,
           fill: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each wanting token proposes `expert`; experts accept up to their free slots C - fill, in `priority`
    order (None: by score, highest first, ties in token order). -> (placed [N] bool, slots used [E])."""
    E = fill.numel()
    bins = torch.where(want, expert, E)  # non-proposals go to an extra bin
    pos = positions_in_expert(bins, rank_of(score) if priority is None else priority, E + 1)  # [N]
    placed = want & (pos < (C - fill)[expert])
    return placed, count_per_expert(torch.where(placed, expert, E), E + 1)[:E]


def rectify(logits: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor, C: int,
            policy: str, local: torch.Tensor, peers: Peers, intra: bool, capped: bool, fill_in: bool) -> Rectified:
    """This rank's tokens: logits [T, E] fp32, expert_ids / keep [T, k]. The group's: fill [E] slots the top-k
    used per expert (<= C), C capacity. local [E] bool: the experts on this rank."""
    T = logits.shape[0]
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, expert_ids, True)  # [T, E] top-k
    outside = logits.detach().masked_fill(chosen, float("-inf"))  # [T, E] scores outside the top-k
    ir_expert, ir_weight = torch.zeros(T, dtype=torch.int64, device=logits.device), logits.new_zeros(T)
    fr_expert, fr_weight = ir_expert, ir_weight
    ir_placed = torch.zeros(T, dtype=torch.bool, device=logits.device)
    if intra:
        lost = (~keep).sum(1)  # [T] dropped assignments
        candidates = outside.masked_fill(~local[None], float("-inf"))
        if capped:
            candidates = candidates.masked_fill((fill >= C)[None], float("-inf"))
        score, ir_expert = candidates.max(1)
        ir_placed = (lost > 0) & torch.isfinite(score)
        if capped:
            order = torch.arange(T, device=logits.device) if policy == "position" else None
            ir_placed, used = _place(ir_expert, score, ir_placed, order, fill, C)
            fill = fill + peers.sum(used)  # each rank's IR uses only its own experts' slots
        ir_weight = (lost * ir_placed).float()
    if fill_in:
        score, c = outside.max(1)  # [T] the (k+1)-th choice
        want = ~(ir_placed & (ir_expert == c)) & torch.isfinite(score)
        placed, _ = _place(peers.gather(c), peers.gather(score), peers.gather(want.to(torch.uint8)).bool(), None,
                           fill, C)
        fr_expert, fr_weight = c, peers.own(placed).float()
    return Rectified(torch.stack([ir_expert, fr_expert], 1), torch.stack([ir_weight, fr_weight], 1))
