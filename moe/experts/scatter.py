"""ScatterMoE backend: layer 1 scattered->grouped (activation fused), layer 2 grouped->scattered with the gates.

No padded or grouped copy of x exists in the forward: kernels read x rows by index. The backward does the same,
except where torch._grouped_mm computes the weight gradients (wide experts, bf16 on CUDA: see xty): there x and
dout are gathered into expert order once each, transients of the backward.
Saved for backward: x [T, d], the pre-activation h [T*k, f] ([T*k, 2f] for SwiGLU), the gates and the
sort (order, counts); the activation is recomputed in backward.

Backward, with dout [T, d] (s = slot of sorted position p, t = s // k, g = gates[s]):
    da[p] = dout[t] @ w2[e]^T                                    (scatter_mm scattered (or gathered) ->grouped)
    a = act(h);  dgates[s] = <a[p], da[p]> (= <y_exp[s], dout[t]>);
    dh[p] = g * da[p] * act'(h[p]);  ga[p] = g * a[p]            (act_bwd, one pass over the rows)
    dw2[e] = sum_p ga[p]^T dout[t];  dw1[e] = sum_p x[t]^T dh[p]  (group_xty, or torch._grouped_mm: see xty)
    dx[t] = sum_j dh[p(t, j)] @ w1[e]^T                          (scatter_mm grouped->scattered)
"""
from __future__ import annotations

import torch

from moe.experts.base import Experts, compute_dtype
from moe.kernels import scatter as K
from moe.permute import sort_by_expert
from moe.routing import Routing


# torch._grouped_mm (CUTLASS) computes the weight gradients faster than our XᵀdY kernel once the experts are
# wide enough to pay for gathering the scattered operand ([T*k, d] rows, a transient in backward only).
# dW1 + dW2 on an H100, ms (benchmarks/results/2026-11-22-h100-scatter-v2.md): group_xty vs gather + torch._grouped_mm
# f = 2048 (S1) 0.40 vs 0.38; f = 4096 (S2) 1.03 vs 0.80; f = 14336 (S3) 8.41 vs 6.53; f = 1024, k = 8 (S4)
# 2.43 vs 2.38, a wash that would cost two 512 MiB gathers, so narrow experts keep the Triton kernel.
GROUPED_MM_MIN_FFN = 2048


def grouped_mm_pays(dout: torch.Tensor, d: int, f: int) -> bool:
    """Weight gradients through torch._grouped_mm: bf16 on CUDA, wide experts, 16-byte aligned rows."""
    return (dout.is_cuda and dout.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and f >= GROUPED_MM_MIN_FFN and f % 8 == 0 and d % 8 == 0)


def xty(x: torch.Tensor, dy: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor,
        x_scattered: bool, dy_scattered: bool, grouped_mm: bool) -> torch.Tensor:
    """dW[e] = X_e^T dY_e -> [E, K, N] over each expert's sorted rows (K.group_xty's contract); with
    `grouped_mm`, the scattered operand is gathered into expert order and torch._grouped_mm does the rest."""
    if not grouped_mm:
        return K.group_xty(x, dy, tokens, counts, ends, x_scattered, dy_scattered)
    xs = x[tokens] if x_scattered else x  # [T*k, K] in expert order
    dys = dy[tokens] if dy_scattered else dy  # [T*k, N]
    return torch._grouped_mm(xs.t(), dys, offs=ends.int())  # int32 offsets (backward converts them once)


def _sum_slots(y: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """[T*k, n] in slot order -> [T, n]. For k = 2 an elementwise add, rounded the same as the sum over k and
    1.5x faster on an H100 (S3: 0.10 against 0.15 ms)."""
    if k == 1:
        return y
    y_TKN = y.view(T, k, y.shape[1])
    return y_TKN[:, 0] + y_TKN[:, 1] if k == 2 else y_TKN.sum(1)


class ScatterMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gates, w1, w3, w2, order, counts, ends):
        # x [T, d]; gates [T, k] fp32 (fp64 for fp64 x); w1, w3 [E, d, f]; w2 [E, f, d]
        # order [T*k] int64; counts, ends [E] int64
        T, k = gates.shape
        gates_flat = gates.reshape(-1).contiguous()
        h, a = K.mlp_in_fwd(x, w1, w3, order, counts, k)  # [T*k, f or 2f], [T*k, f] sorted
        y = K.scatter_mm(a, w2, order, counts, k, scattered_in=False, scattered_out=True, gates=gates_flat)
        ctx.save_for_backward(x, h, gates_flat, w1, w3, w2, order, counts, ends)
        ctx.top_k = k
        return _sum_slots(y, T, k)  # [T, d]

    @staticmethod
    def backward(ctx, dout):
        x, h, gates_flat, w1, w3, w2, order, counts, ends = ctx.saved_tensors
        k, T, f = ctx.top_k, x.shape[0], w1.shape[2]
        tokens = order if k == 1 else order // k  # [T*k] token of each sorted position
        gmm = grouped_mm_pays(dout, x.shape[1], f)
        if gmm:  # grouped_mm wants dout in expert order: gathered once, read grouped by dA's kernel too
            dout = dout[tokens]
            ends = ends.to(torch.int32)  # torch._grouped_mm's offsets, converted once for every weight gradient
        dh, ga, dgates = K.mlp_out_bwd(dout, w2, h, gates_flat, order, counts, k, dout_grouped=gmm)
        dw2 = xty(ga, dout, tokens, counts, ends, x_scattered=False, dy_scattered=not gmm, grouped_mm=gmm)
        del ga
        xs = x[tokens] if gmm else x  # grouped_mm wants x in expert order: gathered once for dw1 and dw3
        dw1 = xty(xs, dh[:, :f], tokens, counts, ends, x_scattered=not gmm, dy_scattered=False, grouped_mm=gmm)
        dw3 = None
        if w3 is not None:
            dw3 = xty(xs, dh[:, f:], tokens, counts, ends, x_scattered=not gmm, dy_scattered=False, grouped_mm=gmm)
        del xs
        dx = None
        if ctx.needs_input_grad[0]:
            dx_slots = K.scatter_mm(dh, w1.transpose(1, 2), order, counts, k, scattered_in=False, scattered_out=True,
                                    w_2=None if w3 is None else w3.transpose(1, 2))  # [T*k, d] slot order
            dx = _sum_slots(dx_slots, T, k)
        return dx, dgates.view(T, k), dw1, dw3, dw2, None, None, None


class ScatterExperts(Experts):
    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        if not x.is_cuda and not K.INTERPRET:
            raise RuntimeError("moe.backend=scatter runs Triton kernels: on CPU set TRITON_INTERPRET=1 before "
                               "importing triton (slow, for tests), or use moe.backend=reference or grouped")
        if x.shape[0] == 0:  # no tokens here (expert parallelism): zero output, every parameter still in the graph
            return self.expert_mlp(x, 0) + 0 * routing.weights.sum(), x.new_zeros((), dtype=torch.int64)
        srt = sort_by_expert(routing.expert_ids, self.num_experts)
        dt = compute_dtype(x)
        w3 = None if self.w3 is None else self.w3.to(dt)
        gates = routing.weights.to(torch.float64 if dt == torch.float64 else torch.float32)
        y = ScatterMLP.apply(x.to(dt), gates, self.w1.to(dt), w3, self.w2.to(dt),
                             srt.order, srt.counts, srt.offsets)
        return y, x.new_zeros((), dtype=torch.int64)
