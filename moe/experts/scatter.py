"""ScatterMoE backend: layer 1 reads the rows by index (scattered->grouped, activation fused), layer 2 is
grouped->grouped; no grouped copy of x exists in the forward.

The backward reads x by index too, except where torch._grouped_mm computes the weight gradients (wide experts,
bf16 on CUDA: see xty): there x is gathered into expert order once, a transient of the backward.
Saved for backward: x [N, d], the pre-activation h [M, f] ([M, 2f] for SwiGLU) and the sort (order, counts,
ends); the activation is recomputed in backward.

Backward, with dy [M, d] grouped (p a grouped position, row t = order[p] // k of x, e its expert):
    da[p] = dy[p] @ w2[e]^T                                      (scatter_mm grouped->grouped)
    dh[p] = da[p] * act'(h[p]);  a = act(h)                      (act_bwd, one pass over the rows)
    dw2[e] = sum_p a[p]^T dy[p];  dw1[e] = sum_p x[t]^T dh[p]     (group_xty, or torch._grouped_mm: see xty)
    dx[t] = sum over the slots of t of dh[p] @ w1[e]^T            (scatter_mm grouped->scattered, slot sum)
"""
from __future__ import annotations

import torch

from moe.experts.base import ExpertRows, Experts, compute_dtype
from moe.kernels import scatter as K

# torch._grouped_mm (CUTLASS) computes the weight gradients faster than our XᵀdY kernel once the experts are
# wide enough to pay for gathering x into expert order ([T*k, d] rows, a transient in backward only).
# Measured per expert width with benchmarks/sweep_scatter.py (benchmarks/results/): from f = 2048 on it is
# faster; below, a wash that would cost gathers of the scattered operand, so narrow experts keep the Triton kernel.
GROUPED_MM_MIN_FFN = 2048


def grouped_mm_pays(dy: torch.Tensor, d: int, f: int) -> bool:
    """Weight gradients through torch._grouped_mm: bf16 on CUDA, wide experts, 16-byte aligned rows."""
    return (dy.is_cuda and dy.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and f >= GROUPED_MM_MIN_FFN and f % 8 == 0 and d % 8 == 0)


def xty(x: torch.Tensor, dy: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor,
        x_scattered: bool, grouped_mm: bool) -> torch.Tensor:
    """dW[e] = X_e^T dY_e -> [E, K, N] over each expert's grouped rows, dy grouped (K.group_xty's contract);
    with `grouped_mm`, x must be grouped too and torch._grouped_mm (int32 `ends`) computes it."""
    if not grouped_mm:
        return K.group_xty(x, dy, tokens, counts, ends, x_scattered)
    assert not x_scattered, "torch._grouped_mm reads x in expert order"
    return grouped_mm_xty(x, dy, ends)


@torch.library.custom_op("moetron::grouped_mm_xty", mutates_args=())
def grouped_mm_xty(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x^T, dy) over the groups ending at `ends`, as an op of its own: torch._grouped_mm wants
    16-byte aligned group strides, which the row-major x and dy have, but a compiled graph may lay out x^T anew."""
    return torch._grouped_mm(x.t(), dy, offs=ends)


@grouped_mm_xty.register_fake
def _(x, dy, ends):
    return x.new_empty(ends.shape[0], x.shape[1], dy.shape[1])


def _sum_slots(y: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """[T*k, n] in slot order -> [T, n]. For k = 2 an elementwise add, rounded the same as the sum over k and
    faster (benchmarks/results/README.md)."""
    if k == 1:
        return y
    y_TKN = y.view(T, k, y.shape[1])
    return y_TKN[:, 0] + y_TKN[:, 1] if k == 2 else y_TKN.sum(1)


class ScatterMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w3, w2, order, counts, ends, k: int):
        # x [N, d]; w1, w3 [E, d, f]; w2 [E, f, d]; order [M] int64 (row order[p] // k of x); counts, ends [E]
        h, a = K.mlp_in_fwd(x, w1, w3, order, counts, k)  # [M, f or 2f], [M, f] grouped
        y = K.scatter_mm(a, w2, order, counts, k, scattered_in=False, scattered_out=False)  # [M, d] grouped
        ctx.save_for_backward(x, h, w1, w3, w2, order, counts, ends)
        ctx.top_k = k
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, w1, w3, w2, order, counts, ends = ctx.saved_tensors
        k, N, f = ctx.top_k, x.shape[0], w1.shape[2]
        dy = dy.contiguous()
        tokens = order if k == 1 else order // k  # [M] row of x at each grouped position
        gmm = grouped_mm_pays(dy, x.shape[1], f)
        if gmm:
            ends = ends.to(torch.int32)  # torch._grouped_mm's offsets, converted once for every weight gradient
        dh, a = K.mlp_out_bwd(dy, w2, h, order, counts, k)
        dw2 = xty(a, dy, tokens, counts, ends, x_scattered=False, grouped_mm=gmm)
        del a
        xs = x[tokens] if gmm else x  # grouped_mm wants x in expert order: gathered once for dw1 and dw3
        dw1 = xty(xs, dh[:, :f], tokens, counts, ends, x_scattered=not gmm, grouped_mm=gmm)
        dw3 = None
        if w3 is not None:
            dw3 = xty(xs, dh[:, f:], tokens, counts, ends, x_scattered=not gmm, grouped_mm=gmm)
        del xs
        dx = None
        if ctx.needs_input_grad[0]:
            dx_slots = K.scatter_mm(dh, w1.transpose(1, 2), order, counts, k, scattered_in=False, scattered_out=True,
                                    w_2=None if w3 is None else w3.transpose(1, 2))  # [N*k, d] slot order
            dx = _sum_slots(dx_slots, N, k)
        return dx, dw1, dw3, dw2, None, None, None, None


class ScatterExperts(Experts):
    def compute(self, rows: ExpertRows) -> torch.Tensor:
        x = rows.x
        if not x.is_cuda and not K.INTERPRET:
            raise RuntimeError("moe.backend=scatter runs Triton kernels: on CPU set TRITON_INTERPRET=1 before "
                               "importing triton (slow, for tests), or use moe.backend=reference or grouped")
        dt = compute_dtype(x)
        w3 = None if self.w3 is None else self.w3.to(dt)
        srt = rows.sort
        return ScatterMLP.apply(x.to(dt), self.w1.to(dt), w3, self.w2.to(dt), srt.order, srt.counts, srt.offsets,
                                rows.top_k)
