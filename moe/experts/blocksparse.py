"""MegaBlocks-style dropless experts: block-sparse products over a block-diagonal topology.

    rows (grouped by expert) --pad gather--> X_pad [R·B, d] --SDD(W1), act--> A (blocks) --DSD(W2)--> Y_pad
      --un-pad gather--> y [M, d] grouped

Each expert's group of rows is padded to a multiple of the block size B (`moe.kernels.block_size`); the
padding is fused into the gather: the rows are copied straight from x to their padded positions, the other
rows zero, in a buffer sized for the worst case R·B rows (R = `max_block_rows`, needing only shapes), so there
is no host sync anywhere. The weights keep the stacked [E, d, f] / [E, f, d] layout; the kernels read them as
the blocks of the concatenated W1cat / W2cat (moe/kernels/blocksparse.py). Nothing is dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

from moe.config import KernelConfig
from moe.experts.base import ExpertRows, Experts, activate, compute_dtype
from moe.kernels import blocksparse as bs
from moe.kernels import rows as R
from moe.kernels.topology import Topology, expert_topology, max_block_rows, padded_destinations, padded_sources


class _PadGather(Function):
    """x [N, d] -> X_pad [rows, d]: row dest[t, j] holds x[t], padding rows are zero (one pass, no memset).
    Backward: dx[t] = Σ_j dX_pad[dest[t, j]]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dest_TK: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(dest_TK)
        return R.pad_rows(x, src, dest_TK.shape[1])

    @staticmethod
    def backward(ctx, dx_pad: torch.Tensor):
        (dest_TK,) = ctx.saved_tensors
        return R.combine_rows(dx_pad, dest_TK), None, None


class _Unpad(Function):
    """Y_pad [rows, d] -> y [M, d] grouped: y[p] = Y_pad[dest[p]]. Backward: dY_pad[dest[p]] = dy[p], padding rows
    zero (docs/algorithms.md §1.8)."""

    @staticmethod
    def forward(ctx, y_pad: torch.Tensor, dest_M1: torch.Tensor, src: torch.Tensor):
        ctx.save_for_backward(src)
        return R.combine_rows(y_pad, dest_M1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (src,) = ctx.saved_tensors
        return R.pad_rows(dy, src, 1), None, None


class _BlockSparseMLP(Function):
    """Y_pad = act(X_pad · W1cat [, X_pad · W3cat]) · W2cat on the topology's blocks; padded rows in and out."""

    @staticmethod
    def forward(ctx, x_pad, w1, w2, w3, topo: Topology, activation: str):
        if activation == "swiglu":
            h1, h3 = bs.sdd(x_pad, w1, topo), bs.sdd(x_pad, w3, topo)  # [nnz, B, B] each
            a = activate(h1, h3, activation)
        else:
            (h1, a), h3 = bs.sdd(x_pad, w1, topo, act=bs.ACT_GELU), None
        ctx.sizes, ctx.activation = tuple(topo[:4]), activation
        ctx.save_for_backward(x_pad, w1, w2, w3, h1, h3, a, *topo[4:])
        return bs.dsd(a, w2, topo)  # [R·B, d]

    @staticmethod
    def backward(ctx, dy_pad):
        x_pad, w1, w2, w3, h1, h3, a, *index = ctx.saved_tensors
        topo = Topology(*ctx.sizes, *index)
        dy_pad = dy_pad.contiguous()
        dw2 = bs.dstd(a, dy_pad, topo)  # DSᵀD [E, f, d]
        dw3 = None
        if ctx.activation == "swiglu":
            da = bs.sdd(dy_pad, w2, topo, trans_w=True).float()  # SDDᵀ
            h1f = h1.float()
            sig = torch.sigmoid(h1f)
            dh1 = (da * h3.float() * sig * (1 + h1f * (1 - sig))).to(h1.dtype)
            dh3 = (da * F.silu(h1f)).to(h3.dtype)
            dx_pad = bs.dsd(dh1, w1, topo, trans_w=True) + bs.dsd(dh3, w3, topo, trans_w=True)  # DSDᵀ
            dw3 = bs.ddts(x_pad, dh3, topo)
        else:
            dh1 = bs.sdd(dy_pad, w2, topo, trans_w=True, act=bs.ACT_GELU_GRAD, aux=h1)  # SDDᵀ ⊙ GELU'(H)
            dx_pad = bs.dsd(dh1, w1, topo, trans_w=True)  # DSDᵀ [R·B, d]
        dw1 = bs.ddts(x_pad, dh1, topo)  # DDᵀS [E, d, f]
        return dx_pad, dw1, dw2, dw3, None, None


class BlockSparseExperts(Experts):
    def __init__(self, num_experts, hidden_size, ffn_hidden_size, activation, init_std, output_std, local=None,
                 kernels: KernelConfig | None = None):
        self.block_size = (kernels or KernelConfig()).block_size
        if ffn_hidden_size % self.block_size:
            raise ValueError(f"blocksparse backend: ffn_hidden_size {ffn_hidden_size} is not a multiple of "
                             f"moe.kernels.block_size {self.block_size}; pick a multiple or a smaller block size")
        super().__init__(num_experts, hidden_size, ffn_hidden_size, activation, init_std, output_std, local)

    def compute(self, rows: ExpertRows) -> torch.Tensor:
        srt, k, B, E = rows.sort, rows.top_k, self.block_size, self.num_experts
        M = rows.num_rows
        R = max_block_rows(M, E, B)
        topo = expert_topology(srt.counts, self.ffn_hidden_size, B, R)
        dest = padded_destinations(srt, B)  # [M] padded row of each grouped position
        slot_dest = torch.empty_like(dest).scatter_(0, srt.order, dest)  # [N*k] padded row of each slot
        N = rows.x.shape[0]
        dt = compute_dtype(rows.x)
        x_pad = _PadGather.apply(rows.x.to(dt), slot_dest.view(N, k), padded_sources(slot_dest, R * B))
        w1, w2 = self.w1.to(dt), self.w2.to(dt)
        w3 = self.w3.to(dt) if self.w3 is not None else None
        y_pad = _BlockSparseMLP.apply(x_pad, w1, w2, w3, topo, self.activation)  # [R·B, d]
        return _Unpad.apply(y_pad, dest.view(M, 1), padded_sources(dest, R * B))  # [M, d] grouped
