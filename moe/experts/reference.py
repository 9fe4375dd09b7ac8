"""The ground truth: a plain loop over the experts. Slow (one host sync for the group bounds), never wrong."""
from __future__ import annotations

import torch

from moe.experts.base import ExpertRows, Experts


class ReferenceExperts(Experts):
    def compute(self, rows: ExpertRows) -> torch.Tensor:
        tokens, ends = rows.tokens(), rows.sort.offsets.tolist()
        outs, start = [], 0
        for e, end in enumerate(ends):  # an empty expert runs on no rows
            outs.append(self.expert_mlp(rows.x[tokens[start:end]], e))
            start = end
        tail = rows.num_rows - start  # dropped assignments (capacity): never read back
        outs.append(rows.x.new_zeros(tail, rows.x.shape[1]))
        return torch.cat(outs)
