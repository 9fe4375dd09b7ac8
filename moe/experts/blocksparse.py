"""MegaBlocks-style dropless experts: block-sparse products over a block-diagonal topology.

    x [T, d] --pad gather--> X_pad [R·B, d] --SDD(W1), act--> A (blocks) --DSD(W2)--> Y_pad [R·B, d]
      --gather, gates--> y [T, d]

Assignments are sorted by expert and each expert's group padded to a multiple of the block size B
(`cfg.block_size`); the padding is fused into the permutation: the token rows are copied straight to
their padded positions, the other rows zero, in a buffer sized for the worst case R·B rows
(R = `max_block_rows`, needing only shapes), so there is no host sync anywhere in the layer. The weights
keep the stacked [E, d, f] / [E, f, d] layout; the kernels read them as the blocks of the concatenated
W1cat / W2cat (moe/kernels/blocksparse.py). Nothing is dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

from moe.experts.base import Experts, activate, compute_dtype
from moe.kernels import blocksparse as bs
from moe.kernels.topology import (Topology, expert_topology, max_block_rows, padded_destinations,
                                  padded_sources)
from moe.permute import sort_by_expert
from moe.routing import Routing


class _PadGather(Function):
    """x [T, d] -> X_pad [rows, d]: row dest[t, j] holds x[t], padding rows are zero (one pass, no memset).
    Backward: dx[t] = Σ_j dX_pad[dest[t, j]]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dest_TK: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(dest_TK)
        return bs.pad_rows(x, src, dest_TK.shape[1])

    @staticmethod
    def backward(ctx, dx_pad: torch.Tensor):
        (dest_TK,) = ctx.saved_tensors
        return bs.combine_rows(dx_pad, dest_TK), None, None


class _Unpermute(Function):
    """y[t] = Σ_j w[t, j] · Y_pad[dest[t, j]]: the un-permute with the gates fused (fp32 accumulation).
    Backward: dY_pad[dest[t, j]] = w[t, j] · dy[t] with zero padding rows (algorithms.md §1.8), and the gate
    gradient dw[t, j] = ⟨Y_pad[dest[t, j]], dy[t]⟩."""

    @staticmethod
    def forward(ctx, y_pad: torch.Tensor, dest_TK: torch.Tensor, src: torch.Tensor, weights: torch.Tensor):
        ctx.save_for_backward(y_pad, dest_TK, src, weights)
        return bs.combine_rows(y_pad, dest_TK, weights)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y_pad, dest_TK, src, weights = ctx.saved_tensors
        dy_pad = bs.pad_rows(dy, src, dest_TK.shape[1], scale=weights.reshape(-1))
        return dy_pad, None, None, bs.row_dots(y_pad, dest_TK, dy).to(weights.dtype)


class _BlockSparseMLP(Function):
    """Y_pad = act(X_pad · W1cat [, X_pad · W3cat]) · W2cat on the topology's blocks; padded rows in and out."""

    @staticmethod
    def forward(ctx, x_pad, w1, w2, w3, topo: Topology, activation: str):
        if activation == "swiglu":
            h1, h3 = bs.sdd(x_pad, w1, topo), bs.sdd(x_pad, w3, topo)  # [nnz, B, B] each
            a = activate(h1, h3, activation)
        else:
            (h1, a), h3 = bs.sdd(x_pad, w1, topo, act=bs.ACT_GELU), None
        ctx.topo, ctx.activation = topo, activation
        ctx.save_for_backward(x_pad, w1, w2, w3, h1, h3, a)
        return bs.dsd(a, w2, topo)  # [R·B, d]

    @staticmethod
    def backward(ctx, dy_pad):
        x_pad, w1, w2, w3, h1, h3, a = ctx.saved_tensors
        topo = ctx.topo
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
    def __init__(self, cfg, num_experts, hidden_size, ffn_hidden_size, activation, init_std, output_std):
        if ffn_hidden_size % cfg.block_size:
            raise ValueError(f"blocksparse backend: ffn_hidden_size {ffn_hidden_size} is not a multiple of "
                             f"moe.block_size {cfg.block_size}; pick a multiple or a smaller block size")
        super().__init__(cfg, num_experts, hidden_size, ffn_hidden_size, activation, init_std, output_std)

    @torch.compiler.disable  # the topology (a tuple of index tensors) rides through autograd: keep it eager
    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        T, k = routing.expert_ids.shape
        E, B = self.num_experts, self.cfg.block_size
        num_dropped = x.new_zeros((), dtype=torch.int64)
        if T == 0:
            return x.new_zeros(x.shape), num_dropped
        srt = sort_by_expert(routing.expert_ids, E)
        R = max_block_rows(T * k, E, B)
        topo = expert_topology(srt.counts, self.ffn_hidden_size, B, R)
        dest = padded_destinations(srt, B).view(T, k)  # padded row of each assignment
        src = padded_sources(dest.reshape(-1), R * B)  # [R·B] assignment of each padded row, −1 for padding
        dt = compute_dtype(x)
        x_pad = _PadGather.apply(x.to(dt), dest, src)  # [R·B, d]
        w1, w2 = self.w1.to(dt), self.w2.to(dt)
        w3 = self.w3.to(dt) if self.w3 is not None else None
        y_pad = _BlockSparseMLP.apply(x_pad, w1, w2, w3, topo, self.activation)  # [R·B, d]
        return _Unpermute.apply(y_pad, dest, src, routing.weights), num_dropped
