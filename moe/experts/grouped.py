"""Grouped GEMM backend: one grouped matmul per projection over the rows grouped by expert, no padding, no drops.

On CUDA with bf16 activations or bf16 autocast, where torch has `_grouped_mm` (torch >= 2.8):
    torch._grouped_mm(x_grouped [M, d], w [E, d, f], offs=int32 group ends [E]) -> [M, f]
with autograd, no host sync. Elsewhere (CPU, fp32) a loop over the experts' contiguous segments of the
grouped rows (one host sync for the segment sizes).
"""
from __future__ import annotations

import torch

from moe.experts.base import ExpertRows, Experts, activate, compute_dtype


def grouped_mm_usable(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs here: CUDA, computing in bf16 (bf16 activations, or bf16 autocast)."""
    return hasattr(torch, "_grouped_mm") and x.is_cuda and compute_dtype(x) == torch.bfloat16


class GroupedExperts(Experts):
    def grouped_mlp(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """xs [M, d] grouped by expert, offsets [E] group ends -> [M, d] bf16 with torch._grouped_mm."""
        offs, bf16 = offsets.to(torch.int32), torch.bfloat16
        xs = xs.to(bf16)  # no-ops for bf16 tensors; under autocast the fp32 weights are cast as autocast would
        h3 = torch._grouped_mm(xs, self.w3.to(bf16), offs=offs) if self.w3 is not None else None
        h = activate(torch._grouped_mm(xs, self.w1.to(bf16), offs=offs), h3, self.activation)
        return torch._grouped_mm(h, self.w2.to(bf16), offs=offs)

    def looped_mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same on any device: each expert's MLP on its segment of the grouped rows."""
        segments = torch.split(xs, counts.tolist())
        return torch.cat([self.expert_mlp(seg, e) for e, seg in enumerate(segments)])

    def compute(self, rows: ExpertRows) -> torch.Tensor:
        xs = rows.gathered()
        if grouped_mm_usable(xs):
            return self.grouped_mlp(xs, rows.sort.offsets)
        return self.looped_mlp(xs, rows.sort.counts)
