"""ScatterMoE-style kernels: gather rows by index into tiles, multiply by each expert's weight, write by index.

Indices (the sort record of moe/kernels/sort.py): `order [T*k]` holds the flat slot index s = t*k + j at each
expert-sorted position p; `counts [E]` the rows per expert. A row is *scattered* when it is addressed by slot (input row
s // k of X [T, K], output row s of Y [T*k, N]) and *grouped* when addressed by sorted position p.

`scatter_mm` computes Y[out(p)] = X[in(p)] @ W[e_p] for every sorted position p, in any of the four layouts.
Row tiles never straddle experts: expert e gets ceil(counts[e] / BM) tiles, and each program finds its
expert from `counts` on the device (no host sync); the grid is sized for the worst case
ceil(T*k / BM) + E tiles and the programs past the last tile exit at once. An expert's last tile runs with
BM / 2 rows when its rows fit, which about halves the padding rows computed at a few hundred rows per expert
(measured with benchmarks/sweep_scatter.py, benchmarks/results/).

Fused epilogues for the expert MLP (EPI):
    0 plain: Y = acc (layer 2, the gradients through the weights)
    1 layer 1 forward: H = acc (pre-activation, kept for backward), A = act(acc); GELU in 16-bit on the GPU
      through the hardware tanh (FAST_GELU: the sigmoid's exp and reciprocal bound this epilogue)
With GLU (SwiGLU), a second weight W_2 (= w3) is in play: in EPI 1 it gives a second accumulator
(H = [h1 | h3], A = silu(h1) * h3); in EPI 0 X has 2K columns and the product is
X[:, :K] @ W + X[:, K:] @ W_2 (the input gradient through w1 and w3).

`act_bwd` is the backward through the activation, one pass over the sorted rows: dA = dY @ W2^T (a plain
`scatter_mm`) -> dH = dA * act'(H) and act(H) (recomputed, for dW2). Fusing it into the GEMM's epilogue was
slower on the GPU: its registers forced 128x128 tiles where the plain GEMM runs 128x256 (benchmarks/results/).

`group_xty` computes the weight gradient dW[e] = sum_{p in e} X[row(p)]^T dY[p].
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moe.kernels.activations import gelu_grad, gelu_sigmoid, gelu_tanh_approx
from moe.kernels.launch import INTERPRET, autotune, cdiv, launch_tuned, next_pow2

EPI_PLAIN, EPI_ACT_FWD = tl.constexpr(0), tl.constexpr(1)

# the interpreter's one config of each kernel
_MM_INTERPRET = triton.Config({"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)
_XTY_INTERPRET = triton.Config({"BM": 64, "BN": 64, "BK": 64, "GROUP_K": 3}, num_warps=4, num_stages=1)
_ACT_INTERPRET = triton.Config({"BM": 16, "BN": 64}, num_warps=4, num_stages=1)
# from benchmarks/sweep_scatter.py (benchmarks/results/README.md): the best (BM, BN, BK, warps, stages) of
# each kernel over the bench_moe shapes
_MM_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
               for bm, bn, bk, w, st in [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                         (128, 128, 64, 8, 5), (64, 256, 64, 8, 4), (128, 128, 64, 8, 4)]]
# XᵀdY: the row-index load in the loop costs one pipeline stage (num_stages - 2 buffers in flight)
_XTY_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_K": g}, num_warps=w, num_stages=st)
                for bm, bn, bk, w, st, g in [(64, 256, 128, 8, 5, 8), (64, 256, 128, 8, 5, 16),
                                             (32, 256, 128, 8, 6, 8), (64, 128, 256, 8, 5, 8),
                                             (64, 256, 128, 8, 6, 8), (64, 128, 128, 8, 3, 8)]]
_ACT_CONFIGS = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
                for bm, bn, w, st in [(16, 256, 4, 2), (32, 256, 8, 2), (4, 1024, 4, 2), (32, 128, 4, 3)]]


@triton.jit
def _mm_tile(
    X, W, W_2, Y, H, A, order_ptr, start, end, e, pid_n, N, K, top_k,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_hm, stride_am,
    SCATTER_IN: tl.constexpr, SCATTER_OUT: tl.constexpr, EPI: tl.constexpr, GLU: tl.constexpr,
    ACC: tl.constexpr, FAST_GELU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One output tile: sorted rows [start, min(start + BM, end)) of expert e, columns pid_n * BN + [0, BN)."""
    offs_m = start + tl.arange(0, BM)  # [BM] sorted positions
    mask_m = offs_m < end
    if SCATTER_IN or SCATTER_OUT:
        slot = tl.load(order_ptr + offs_m, mask=mask_m, other=0)  # [BM] int64 flat slot t*k+j
    if SCATTER_IN:
        in_row = slot // top_k
    else:
        in_row = offs_m.to(tl.int64)
    if SCATTER_OUT:
        out_row = slot
    else:
        out_row = offs_m.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BK)

    # main loop: acc [BM, BN] = X[in_row] @ W[e]
    x_ptrs = X + in_row[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
    w_off = e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BK, BN]
    acc = tl.zeros((BM, BN), dtype=ACC)
    if GLU and EPI == EPI_ACT_FWD:
        acc3 = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + w_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, out_dtype=ACC)
        if GLU and EPI == EPI_ACT_FWD:
            w3 = tl.load(W_2 + w_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc3 = tl.dot(x, w3, acc3, out_dtype=ACC)
        x_ptrs += BK * stride_xk
        w_off += BK * stride_wk
    if GLU and EPI == EPI_PLAIN:  # second pair: X[:, K:2K] @ W_2[e]
        w_off = e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        x_ptrs = X + in_row[:, None] * stride_xm + (K + offs_k[None, :]) * stride_xk
        for k0 in range(0, K, BK):
            mask_k = offs_k < K - k0
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(W_2 + w_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(x, w, acc, out_dtype=ACC)
            x_ptrs += BK * stride_xk
            w_off += BK * stride_wk

    mask = mask_m[:, None] & mask_n[None, :]
    if EPI == EPI_PLAIN:
        tl.store(Y + out_row[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=mask)
    else:  # EPI_ACT_FWD, grouped out: H [rows, N or 2N], A [rows, N]
        h_ptrs = H + out_row[:, None] * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, acc.to(H.dtype.element_ty), mask=mask)
        if GLU:
            tl.store(h_ptrs + N, acc3.to(H.dtype.element_ty), mask=mask)
            act = acc * tl.sigmoid(acc) * acc3
        elif FAST_GELU:
            act = gelu_tanh_approx(acc)
        else:
            act = acc * gelu_sigmoid(acc)
        tl.store(A + out_row[:, None] * stride_am + offs_n[None, :], act.to(A.dtype.element_ty), mask=mask)


@autotune(_MM_CONFIGS, key=["rows_key", "N", "K", "SCATTER_IN", "SCATTER_OUT", "EPI", "GLU"])
@triton.jit
def _scatter_mm_kernel(
    X, W, W_2, Y, H, A, order_ptr, counts_ptr,
    num_rows, rows_key, N, K, top_k,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_hm, stride_am,
    E: tl.constexpr, E_POW2: tl.constexpr, SCATTER_IN: tl.constexpr, SCATTER_OUT: tl.constexpr,
    EPI: tl.constexpr, GLU: tl.constexpr, ACC: tl.constexpr, FAST_GELU: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # program -> (row tile, column tile), row tiles grouped by GROUP_M for L2 reuse of W[e]
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BM) + E
    num_pid_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    # row tile -> expert e and its sorted rows [start, end)
    offs_e = tl.arange(0, E_POW2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)  # [E]
    tiles = (cnt + BM - 1) // BM
    tile_end = tl.cumsum(tiles, 0)
    if pid_m >= tl.sum(tiles, 0):
        return
    e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    sel = offs_e == e
    end = tl.sum(tl.where(sel, tl.cumsum(cnt, 0), 0), 0)
    start = end - tl.sum(tl.where(sel, cnt, 0), 0) + (pid_m - tl.sum(tl.where(sel, tile_end - tiles, 0), 0)) * BM

    # an expert's last rows that fit half a tile get a half tile (module docstring)
    if end - start <= BM // 2:
        _mm_tile(X, W, W_2, Y, H, A, order_ptr, start, end, e, pid_n, N, K, top_k,
                 stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_hm, stride_am,
                 SCATTER_IN, SCATTER_OUT, EPI, GLU, ACC, FAST_GELU, BM // 2, BN, BK)
    else:
        _mm_tile(X, W, W_2, Y, H, A, order_ptr, start, end, e, pid_n, N, K, top_k,
                 stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_hm, stride_am,
                 SCATTER_IN, SCATTER_OUT, EPI, GLU, ACC, FAST_GELU, BM, BN, BK)


@autotune(_ACT_CONFIGS, key=["rows_key", "N", "GLU"])
@triton.jit
def _act_bwd_kernel(
    DA, H, DH, A, num_rows, rows_key, N, stride_am, stride_hm,
    GLU: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    # program -> BM sorted rows, looping over all N columns
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    mask_m = offs_m < num_rows
    rows_a = offs_m.to(tl.int64)[:, None] * stride_am
    rows_h = offs_m.to(tl.int64)[:, None] * stride_hm
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask = mask_m[:, None] & (offs_n < N)[None, :]
        da = tl.load(DA + rows_a + offs_n[None, :], mask=mask, other=0.0).to(ACC)
        h = tl.load(H + rows_h + offs_n[None, :], mask=mask, other=0.0).to(ACC)
        if GLU:  # H = [h1 | h3], DH = [dh1 | dh3], act = silu(h1) * h3
            h3 = tl.load(H + rows_h + N + offs_n[None, :], mask=mask, other=0.0).to(ACC)
            sig = tl.sigmoid(h)
            silu = h * sig
            act = silu * h3
            tl.store(DH + rows_h + offs_n[None, :], (da * h3 * sig * (1.0 + h * (1.0 - sig))).to(DH.dtype.element_ty),
                     mask=mask)
            tl.store(DH + rows_h + N + offs_n[None, :], (da * silu).to(DH.dtype.element_ty), mask=mask)
        else:
            s = gelu_sigmoid(h)
            act = h * s
            tl.store(DH + rows_h + offs_n[None, :], (da * gelu_grad(h, s, act)).to(DH.dtype.element_ty), mask=mask)
        tl.store(A + rows_a + offs_n[None, :], act.to(A.dtype.element_ty), mask=mask)


@autotune(_XTY_CONFIGS, key=["rows_key", "N", "K", "X_SCATTERED"])
@triton.jit
def _group_xty_kernel(
    X, DY, DW, tokens_ptr, counts_ptr, ends_ptr,
    rows_key, N, K,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
    X_SCATTERED: tl.constexpr, ACC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_K: tl.constexpr,
):
    # program -> (expert e, tile (pid_k, pid_n) of dW[e] [K, N]), expert outermost; within e, GROUP_K row
    # tiles sweep the column tiles together, so the programs running at once read a GROUP_K*BK-wide slab of
    # X[e] and a band of dY[e] that stay in L2 (at K = 14336 a whole X[e] does not); each loops over e's rows
    pid = tl.program_id(0)
    num_pid_k, num_pid_n = tl.cdiv(K, BK), tl.cdiv(N, BN)
    e = pid // (num_pid_k * num_pid_n)
    local = pid % (num_pid_k * num_pid_n)
    first_k = local // (GROUP_K * num_pid_n) * GROUP_K
    group_size = tl.minimum(num_pid_k - first_k, GROUP_K)
    pid_k = first_k + local % (GROUP_K * num_pid_n) % group_size
    pid_n = local % (GROUP_K * num_pid_n) // group_size
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_k, mask_n = offs_k < K, offs_n < N
    end = tl.load(ends_ptr + e)
    start = end - tl.load(counts_ptr + e)
    acc = tl.zeros((BK, BN), dtype=ACC)
    for m0 in range(start, end, BM):
        offs_m = m0 + tl.arange(0, BM)  # [BM] sorted positions
        mask_m = offs_m < end
        if X_SCATTERED:
            x_row = tl.load(tokens_ptr + offs_m, mask=mask_m, other=0)  # [BM] int64 row of x of each position
        else:
            x_row = offs_m.to(tl.int64)
        dy_row = offs_m.to(tl.int64)
        xt = tl.load(X + x_row[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                     mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # [BK, BM]
        dy = tl.load(DY + dy_row[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)  # [BM, BN]
        acc = tl.dot(xt, dy, acc, out_dtype=ACC)
    dw_ptrs = DW + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def _acc_type(x: torch.Tensor):
    """Accumulate in fp32, or fp64 for fp64 operands (the CPU tests of whole models run in double)."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _rows_key(num_rows: int) -> int:
    """The row count as the autotuners see it: rounded up to a power of two. Under expert parallelism the rows
    a rank receives change every step; keyed on the exact count, every new count would be tuned anew."""
    return next_pow2(max(num_rows, 1))


def _launch_mm(x, w, w_2, y, h, a, order, counts, top_k, num_rows, K, N,
               scatter_in, scatter_out, epi, glu, config: triton.Config | None = None):
    """Launches `_scatter_mm_kernel`, autotuned, or with `config` (for benchmarks/sweep_scatter.py)."""
    E = w.shape[0]
    grid = lambda meta: ((cdiv(num_rows, meta["BM"]) + E) * cdiv(N, meta["BN"]),)
    rows_key = _rows_key(num_rows)
    key = (rows_key, N, K, scatter_in, scatter_out, epi.value, glu, x.dtype, w.dtype)
    launch_tuned(
        _scatter_mm_kernel, grid, key,
        # an operand a variant does not touch gets a stand-in of the dtype it would have (x for the activations,
        # w for w_2): no extra specialisation, and no cached device tensor, which would be allocated inside the
        # CUDA graph pool at the first call under train.cuda_graphs and break its accounting
        (x, w, w if w_2 is None else w_2, x if y is None else y, x if h is None else h, x if a is None else a,
         order, counts),
        (num_rows, rows_key, N, K, top_k, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
         0 if y is None else y.stride(0), 0 if h is None else h.stride(0), 0 if a is None else a.stride(0)),
        dict(E=E, E_POW2=next_pow2(E), SCATTER_IN=scatter_in, SCATTER_OUT=scatter_out, EPI=epi.value, GLU=glu,
             ACC=_acc_type(x), FAST_GELU=not INTERPRET and x.dtype in (torch.bfloat16, torch.float16)),
        config, _MM_INTERPRET)


def _scatter_mm(x, w, order, counts, top_k, scattered_in, scattered_out, w_2=None, config=None) -> torch.Tensor:
    num_rows, (_, K, N) = order.numel(), w.shape
    assert scattered_in or x.shape[0] == num_rows, "a grouped input has T*k rows"
    y = x.new_empty(num_rows, N)
    _launch_mm(x, w, w_2, y, None, None, order, counts, top_k, num_rows, K, N,
               scattered_in, scattered_out, EPI_PLAIN, w_2 is not None, config)
    return y


def _act_bwd(da, h, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, N = da.shape
    dh, a = torch.empty_like(h), torch.empty_like(da)
    glu = h.shape[1] == 2 * N
    rows_key = _rows_key(num_rows)
    launch_tuned(_act_bwd_kernel, lambda meta: (cdiv(num_rows, meta["BM"]),), (rows_key, N, glu, da.dtype),
                 (da, h, dh, a), (num_rows, rows_key, N, da.stride(0), h.stride(0)),
                 dict(GLU=glu, ACC=_acc_type(da)), config, _ACT_INTERPRET)
    return dh, a


def _group_xty(x, dy, tokens, counts, ends, x_scattered, config=None) -> torch.Tensor:
    E, K, N, rows_key = counts.numel(), x.shape[1], dy.shape[1], _rows_key(tokens.numel())
    dw = x.new_empty(E, K, N)
    grid = lambda meta: (E * cdiv(K, meta["BK"]) * cdiv(N, meta["BN"]),)
    launch_tuned(
        _group_xty_kernel, grid, (rows_key, N, K, x_scattered, x.dtype, dy.dtype),
        (x, dy, dw, tokens, counts, ends),
        (rows_key, N, K, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
         dw.stride(0), dw.stride(1), dw.stride(2)),
        dict(X_SCATTERED=x_scattered, ACC=_acc_type(x)), config, _XTY_INTERPRET)
    return dw


# ---- the launchers as torch.library custom ops: opaque to torch.compile, with the shapes of their outputs
# (fake implementations), so a compiled block keeps these kernels and their compiled-kernel replay as they are.
# The `_`-prefixed functions above take a fixed triton.Config instead of autotuning (benchmarks/sweep_scatter.py).

@torch.library.custom_op("moetron::scatter_mm", mutates_args=())
def scatter_mm(x: torch.Tensor, w: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, top_k: int,
               scattered_in: bool, scattered_out: bool, w_2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Y[out(p)] = X[in(p)] @ W[e_p] (+ X[in(p), K:] @ W_2[e_p] when w_2 is given).

    x: [T, K] if scattered_in else [T*k, K] (grouped; [T*k, 2K] with w_2); w, w_2: [E, K, N] (any strides,
    so a transposed view serves the input gradient); order [T*k] int64; counts [E] int64. Returns [T*k, N] in
    slot order if scattered_out else in sorted order.
    """
    return _scatter_mm(x, w, order, counts, top_k, scattered_in, scattered_out, w_2)


@scatter_mm.register_fake
def _(x, w, order, counts, top_k, scattered_in, scattered_out, w_2=None):
    return x.new_empty(order.shape[0], w.shape[2])


@torch.library.custom_op("moetron::mlp_in_fwd", mutates_args=())
def mlp_in_fwd(x: torch.Tensor, w1: torch.Tensor, w3: Optional[torch.Tensor], order: torch.Tensor,
               counts: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 1 scattered->grouped with the activation fused: x [T, d] -> h [T*k, f] (or [h1 | h3] [T*k, 2f]
    for SwiGLU, w3 given), a = act(h) [T*k, f], both in sorted order."""
    num_rows, (_, K, N) = order.numel(), w1.shape
    h = x.new_empty(num_rows, 2 * N if w3 is not None else N)
    a = x.new_empty(num_rows, N)
    _launch_mm(x, w1, w3, None, h, a, order, counts, top_k, num_rows, K, N,
               True, False, EPI_ACT_FWD, w3 is not None)
    return h, a


@mlp_in_fwd.register_fake
def _(x, w1, w3, order, counts, top_k):
    M, N = order.shape[0], w1.shape[2]
    return x.new_empty(M, 2 * N if w3 is not None else N), x.new_empty(M, N)


@torch.library.custom_op("moetron::act_bwd", mutates_args=())
def act_bwd(da: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward through the activation, rows in sorted order: da = dL/d(act) [T*k, f], h as from `mlp_in_fwd`
    ([T*k, f], or [T*k, 2f] for SwiGLU) -> dh (shaped like h) and act(h) [T*k, f]."""
    return _act_bwd(da, h)


@act_bwd.register_fake
def _(da, h):
    return torch.empty_like(h), torch.empty_like(da)


@torch.library.custom_op("moetron::group_xty", mutates_args=())
def group_xty(x: torch.Tensor, dy: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor,
              x_scattered: bool) -> torch.Tensor:
    """dW[e] = sum over e's sorted positions p of X[row(p)]^T dY[p] -> [E, K, N], dy [T*k, N] grouped.

    row(p) = tokens[p] (= order[p] // k, int64) when x is scattered, p when grouped;
    ends = cumsum(counts). Empty experts get zeros."""
    return _group_xty(x, dy, tokens, counts, ends, x_scattered)


@group_xty.register_fake
def _(x, dy, tokens, counts, ends, x_scattered):
    return x.new_empty(counts.shape[0], x.shape[1], dy.shape[1])


def mlp_out_bwd(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, order: torch.Tensor, counts: torch.Tensor,
                top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward through layer 2 and the activation, rows in sorted order: dy [T*k, d], w2 [E, f, d], h as from
    `mlp_in_fwd` -> dh (shaped like h) and act(h) [T*k, f]."""
    da = scatter_mm(dy, w2.transpose(1, 2), order, counts, top_k, scattered_in=False, scattered_out=False)
    return act_bwd(da, h)
