"""Padded capacity backend (GShard / Tutel): each expert's rows into a [E, C, d] buffer, batched matmul, back.

C is `rows.capacity`, the bound the capacity step (moe/capacity.py) guarantees, or, with dynamic capacity
(moe.capacity.factor=0), the largest expert load (one host sync). Which assignments an expert keeps is the
capacity step's decision; here every grouped row of an expert fits, and the slots it leaves empty hold zeros.
"""
from __future__ import annotations

import torch

from moe.experts.base import ExpertRows, Experts, activate


class PaddedExperts(Experts):
    def batched_mlp(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """[E, C, d] -> [E, C, d]: one batched matmul per projection."""
        h3 = torch.bmm(x_ECD, self.w3) if self.w3 is not None else None
        return torch.bmm(activate(torch.bmm(x_ECD, self.w1), h3, self.activation), self.w2)

    def compute(self, rows: ExpertRows) -> torch.Tensor:
        E, (M, d), srt = self.num_experts, (rows.num_rows, rows.x.shape[1]), rows.sort
        C = rows.capacity or max(int(srt.counts.max()), 1)  # dynamic: the one host sync of this backend
        with torch.no_grad():
            p = torch.arange(M, device=rows.x.device)
            e = srt.expert_of.long().clamp(max=E - 1)  # past the groups: dropped, parked below
            slot = e * C + p - (srt.offsets - srt.counts)[e]  # [M] slot e * C + position within the expert
            kept = p < srt.offsets[-1]
            write = torch.where(kept, slot, E * C)  # E * C: the discarded slot
            # rows past the groups read arbitrary real slots, spread so that their (unused) gradients do not
            # all pile onto one row in the backward scatter-add
            read = torch.where(kept, slot, p % (E * C))
        # rows into their slots of a zeroed [E*C + 1, d] buffer; the extra last row is cut off
        x_pad = rows.x.new_zeros(E * C + 1, d).index_copy(0, write, rows.gathered())[:-1].view(E, C, d)
        return self.batched_mlp(x_pad).view(E * C, d)[read]  # [M, d] grouped order
