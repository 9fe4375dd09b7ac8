"""Grouped GEMM backend: assignments sorted by expert, one grouped matmul per projection, no padding, no drops.

On CUDA with bf16 activations or bf16 autocast, where torch has `_grouped_mm` (torch >= 2.8):
    torch._grouped_mm(x_sorted [T*k, d], w [E, d, f], offs=int32 group ends [E]) -> [T*k, f]
with autograd, no host sync. Elsewhere (CPU, fp32) a loop over the experts' contiguous segments of the sorted
rows (one host sync for the segment sizes).
"""
from __future__ import annotations

import torch

from moe.experts.base import Experts, activate, compute_dtype
from moe.permute import combine, sort_by_expert
from moe.routing import Routing


def grouped_mm_usable(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs here: CUDA, computing in bf16 (bf16 activations, or bf16 autocast)."""
    return hasattr(torch, "_grouped_mm") and x.is_cuda and compute_dtype(x) == torch.bfloat16


class GroupedExperts(Experts):
    def grouped_mlp(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """xs [N, d] sorted by expert, offsets [E] group ends -> [N, d] bf16 with torch._grouped_mm."""
        offs, bf16 = offsets.to(torch.int32), torch.bfloat16
        xs = xs.to(bf16)  # no-ops for bf16 tensors; under autocast the fp32 weights are cast as autocast would
        h3 = torch._grouped_mm(xs, self.w3.to(bf16), offs=offs) if self.w3 is not None else None
        h = activate(torch._grouped_mm(xs, self.w1.to(bf16), offs=offs), h3, self.activation)
        return torch._grouped_mm(h, self.w2.to(bf16), offs=offs)

    def looped_mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same on any device: each expert's MLP on its segment of the sorted rows."""
        segments = torch.split(xs, counts.tolist())
        return torch.cat([self.expert_mlp(seg, e) for e, seg in enumerate(segments)])

    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        T, k = routing.expert_ids.shape
        s = sort_by_expert(routing.expert_ids, self.num_experts)
        xs = x[s.order // k]  # [T*k, d] rows grouped by expert
        ys = self.grouped_mlp(xs, s.offsets) if grouped_mm_usable(x) else self.looped_mlp(xs, s.counts)
        y_flat = torch.empty_like(ys).index_copy_(0, s.order, ys)  # back to slot order [T*k, d]
        return combine(y_flat, routing.weights), x.new_zeros((), dtype=torch.int64)
