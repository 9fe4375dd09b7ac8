"""Triton block-sparse products for the dropless MoE (MegaBlocks §5.1, docs/algorithms.md §1.6–1.7).

S is a block-sparse [T_pad, E·f] matrix with the block-diagonal `Topology` (moe/kernels/topology.py),
stored as data [nnz, B, B]. The expert weights keep the project layout and are read as the column (or row)
blocks of the concatenated matrices by index math, never copied:
    W1cat [d, E·f]:  element (k, e·f + n) = w[e, k, n]   for w [E, d, f]   (w1, w3)
    W2cat [E·f, d]:  element (e·f + k, n) = w[e, k, n]   for w [E, f, d]   (w2)
A block column c belongs to expert c // F at offset (c % F)·B inside it (F = f / B).

Three kernels cover the seven products (letters: output, left, right; ᵀ a transposed operand):
    _sdd_kernel   SDD  H  = S ⊙ (X · W1cat)      SDDᵀ dA = S ⊙ (dY · W2catᵀ)    (1-D grid over nonzero blocks)
    _dsd_kernel   DSD  Y  = A · W2cat            DSDᵀ dX = dH · W1catᵀ          (walks block rows)
    _dstd_kernel  DSᵀD dW2 = Aᵀ · dY             DDᵀS dW1 = Xᵀ · dH = (dHᵀ · X)ᵀ, DDS D · S = (Sᵀ · Dᵀ)ᵀ
                                                 (walks block columns through the transpose indices)
Dense operands are masked, so d and T need not be multiples of anything; f must be a multiple of B.
Every kernel accumulates in fp32. Grids are sized from the static bound R on block rows; programs past
the rows in use return at once. Dense-output tiles of an empty block column are written as zeros.

The padded permutation (rows into the padded layout, the gated un-permute and the gate gradient) is three
small memory-bound kernels at the end of this file.

Under TRITON_INTERPRET=1 each kernel runs with one fixed configuration; on a GPU the products are autotuned
over configurations chosen for B = 128 (B = 64 and smaller work, with BLOCK_K = B where B < 64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels.activations import gelu_grad, gelu_sigmoid
from moe.kernels.launch import INTERPRET, autotune, cdiv, launch, launch_tuned, next_pow2
from moe.kernels.topology import Topology

ACT_NONE, ACT_GELU, ACT_GELU_GRAD = 0, 1, 2


def _configs(space: list[dict]) -> list[triton.Config]:
    return [triton.Config({k: v for k, v in c.items() if k not in ("warps", "stages")}, num_warps=c["warps"],
                          num_stages=c["stages"]) for c in space]


def _prune(configs, named_args, **kwargs):
    """BLOCK_K must divide the block size B (the K walk steps through whole blocks): blocks smaller than
    BLOCK_K take BLOCK_K = B. NB must divide F."""
    B, F = kwargs.get("BLOCK", named_args.get("BLOCK")), named_args["F"]
    kept = {}
    for c in configs:
        if F % c.kwargs.get("NB", 1) == 0:
            meta = {**c.kwargs, "BLOCK_K": min(B, c.kwargs["BLOCK_K"])}
            kept[(tuple(sorted(meta.items())), c.num_warps, c.num_stages)] = triton.Config(
                meta, num_warps=c.num_warps, num_stages=c.num_stages)
    return list(kept.values())


def _interpret(block: int, **meta) -> triton.Config:
    """The interpreter's configuration for blocks of `block` rows."""
    return triton.Config({**meta, "BLOCK_K": min(32, block), "GROUP_M": 2}, num_warps=4, num_stages=1)


@triton.jit
def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (m, n) tile, GROUP_M rows at a time so neighbouring programs share L2 operands."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


# NB blocks of one block row per program (a B x NB·B tile): NB=2 halves the reads of the dense operand.
_SDD_SPACE = [dict(NB=2, BLOCK_K=64, GROUP_M=8, warps=8, stages=3),
              dict(NB=2, BLOCK_K=64, GROUP_M=8, warps=8, stages=4),
              dict(NB=1, BLOCK_K=64, GROUP_M=8, warps=8, stages=4)]


@autotune(_configs(_SDD_SPACE), key=["K", "F", "stride_bn", "ACT"], prune=_prune)
@triton.jit
def _sdd_kernel(a_ptr, b_ptr, out_ptr, aux_ptr, row_idx_ptr, col_idx_ptr, num_rows_ptr,
                K, F, stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                BLOCK: tl.constexpr, NB: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                ACT: tl.constexpr):
    """out[blk] = a[rows of blk] · Wcat[:, cols of blk], for the nonzero blocks only.

    a [M, K] dense; b read as Wcat [K, E·f] through (stride_be, stride_bk, stride_bn); out [nnz, B, B].
    A program computes NB neighbouring blocks blk .. blk+NB−1 of one block row, which in the MoE topology are
    neighbouring columns of one expert (F % NB == 0).
    ACT_GELU: out = H and aux = GELU(H).  ACT_GELU_GRAD: aux holds H, out = acc ⊙ GELU'(H).
    """
    pid = tl.program_id(0)
    num_rows = tl.load(num_rows_ptr)
    if pid >= num_rows * (F // NB):
        return
    m, n = _grouped(pid, num_rows, F // NB, GROUP_M)
    blk = m * F + n * NB
    row = tl.load(row_idx_ptr + blk)
    col = tl.load(col_idx_ptr + blk)
    offs_b = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, NB * BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (row * BLOCK + offs_b).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + (col // F).to(tl.int64) * stride_be + offs_k[:, None] * stride_bk
              + ((col % F) * BLOCK + offs_n)[None, :] * stride_bn)
    acc = tl.zeros((BLOCK, NB * BLOCK), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    # column j of the tile is element (i, j % B) of block blk + j // B
    offs_out = (blk.to(tl.int64) * BLOCK * BLOCK + (offs_n // BLOCK * BLOCK * BLOCK + offs_n % BLOCK)[None, :]
                + offs_b[:, None] * BLOCK)
    if ACT == 1:  # GELU, tanh approximation; keep H for the backward pass
        tl.store(aux_ptr + offs_out, (acc * gelu_sigmoid(acc)).to(aux_ptr.dtype.element_ty))
    if ACT == 2:  # dH = dA ⊙ GELU'(H)
        h = tl.load(aux_ptr + offs_out).to(tl.float32)
        s = gelu_sigmoid(h)
        acc = acc * gelu_grad(h, s, h * s)
    tl.store(out_ptr + offs_out, acc.to(out_ptr.dtype.element_ty))


# The index load in the K walk takes pipeline stages of its own (Triton 3.6 keeps num_stages − 2 buffers
# here), hence the deeper num_stages than for a plain matmul.
_DENSE_SPACE = [dict(BLOCK_N=256, BLOCK_K=64, GROUP_M=8, warps=8, stages=5),
                dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=8, stages=5),
                dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=4, stages=6)]


@autotune(_configs(_DENSE_SPACE), key=["N", "F", "stride_bk", "BLOCK"], prune=_prune)
@triton.jit
def _dsd_kernel(data_ptr, b_ptr, out_ptr, row_off_ptr, col_idx_ptr, num_rows_ptr,
                N, F, stride_be, stride_bk, stride_bn, stride_om, stride_on,
                BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[block row m, n tile] = Σ over the blocks of row m of data[blk] · Wcat[rows of col(blk), n tile].

    b read as Wcat [E·f, N] through (stride_be, stride_bk, stride_bn); out [M, N]. The K walk is flat:
    step s covers block row_offsets[m] + s·BLOCK_K // B at offset s·BLOCK_K % B.
    """
    pid = tl.program_id(0)
    num_rows = tl.load(num_rows_ptr)
    num_n = tl.cdiv(N, BLOCK_N)
    if pid >= num_rows * num_n:
        return
    m, pn = _grouped(pid, num_rows, num_n, GROUP_M)
    start = tl.load(row_off_ptr + m)
    end = tl.load(row_off_ptr + m + 1)
    offs_b = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    a_ptrs = data_ptr + offs_b[:, None] * BLOCK + offs_k[None, :]  # [B, BLOCK_K] of block 0
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # [BLOCK_K, BLOCK_N] of expert 0
    acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
    for s in range(0, (end - start) * (BLOCK // BLOCK_K)):
        blk = start + s // (BLOCK // BLOCK_K)
        k0 = (s % (BLOCK // BLOCK_K)) * BLOCK_K
        col = tl.load(col_idx_ptr + blk)
        a = tl.load(a_ptrs + (blk.to(tl.int64) * BLOCK * BLOCK + k0))
        b = tl.load(b_ptrs + ((col // F).to(tl.int64) * stride_be + ((col % F) * BLOCK + k0) * stride_bk),
                    mask=mask_n[None, :], other=0.0)
        acc += tl.dot(a, b)
    out_ptrs = out_ptr + (m * BLOCK + offs_b).to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


@autotune(_configs(_DENSE_SPACE), key=["N", "F", "stride_on", "BLOCK"], prune=_prune)
@triton.jit
def _dstd_kernel(data_ptr, d_ptr, out_ptr, off_t_ptr, blk_t_ptr, col_t_ptr,
                 N, F, num_cols, stride_dm, stride_dn, stride_oe, stride_or, stride_on,
                 BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[block column c, n tile] = Σ over the blocks of column c of data[blk]ᵀ · D[rows of blk, n tile].

    The column is walked through the transpose indices (offsets_t, block_offsets_t, column_indices_t), the
    blocks read with swapped strides. D [M, N] through (stride_dm, stride_dn). Row c·B + i of the [E·f, N]
    result goes to out + (c // F)·stride_oe + ((c % F)·B + i)·stride_or, so the weight layouts (and a
    transposed store) come from the strides. An empty column stores zeros.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    c, pn = _grouped(pid, num_cols, num_n, GROUP_M)
    start = tl.load(off_t_ptr + c)
    end = tl.load(off_t_ptr + c + 1)
    offs_b = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    a_ptrs = data_ptr + offs_k[None, :] * BLOCK + offs_b[:, None]  # [B, BLOCK_K]: block 0 transposed
    d_ptrs = d_ptr + offs_k[:, None] * stride_dm + offs_n[None, :] * stride_dn  # [BLOCK_K, BLOCK_N] of row 0
    acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
    for s in range(0, (end - start) * (BLOCK // BLOCK_K)):
        q = start + s // (BLOCK // BLOCK_K)
        k0 = (s % (BLOCK // BLOCK_K)) * BLOCK_K
        blk = tl.load(blk_t_ptr + q)
        row = tl.load(col_t_ptr + q)
        a = tl.load(a_ptrs + (blk.to(tl.int64) * BLOCK * BLOCK + k0 * BLOCK))
        d = tl.load(d_ptrs + (row * BLOCK + k0).to(tl.int64) * stride_dm, mask=mask_n[None, :], other=0.0)
        acc += tl.dot(a, d)
    out_ptrs = (out_ptr + (c // F).to(tl.int64) * stride_oe + ((c % F) * BLOCK + offs_b)[:, None] * stride_or
                + offs_n[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


def _nnz(topo: Topology) -> int:
    return topo.max_block_rows * topo.blocks_per_row


def sdd(a: torch.Tensor, w: torch.Tensor, topo: Topology, *, trans_w: bool = False, act: int = ACT_NONE,
        aux: torch.Tensor | None = None) -> torch.Tensor:
    """S ⊙ (a · Wcat) -> data [R·F, B, B].

    a [M, K] with M >= R·B. w [E, K, f] (Wcat = W1cat), or with trans_w w [E, f, K] (Wcat = W2catᵀ).
    act=ACT_GELU also writes GELU(H) into aux (allocated here when None); act=ACT_GELU_GRAD reads H from
    aux and returns acc ⊙ GELU'(H). Blocks of unused rows are left unwritten.
    """
    B, F = topo.block_size, topo.blocks_per_row
    K = a.shape[1]
    out = a.new_empty(_nnz(topo), B, B)
    if act == ACT_GELU and aux is None:
        aux = torch.empty_like(out)
    sbe, sbk, sbn = (w.stride(0), w.stride(2), w.stride(1)) if trans_w else w.stride()

    def grid(meta):
        return (_nnz(topo) // meta["NB"],)
    launch_tuned(_sdd_kernel, grid, (K, F, sbn, act, a.dtype, w.dtype),
                 (a, w, out, out if aux is None else aux, topo.row_indices, topo.column_indices, topo.num_block_rows),
                 (K, F, a.stride(0), a.stride(1), sbe, sbk, sbn), dict(BLOCK=B, ACT=act),
                 interpret=_interpret(B, NB=2 if F % 2 == 0 else 1))
    return (out, aux) if act == ACT_GELU else out


def dsd(data: torch.Tensor, w: torch.Tensor, topo: Topology, *, trans_w: bool = False) -> torch.Tensor:
    """S · Wcat -> [R·B, N]; rows past the block rows in use are left unwritten.

    w [E, f, N] (Wcat = W2cat), or with trans_w w [E, N, f] (Wcat = W1catᵀ).
    """
    B = topo.block_size
    N = w.shape[1] if trans_w else w.shape[2]
    out = data.new_empty(topo.max_block_rows * B, N)
    sbe, sbk, sbn = (w.stride(0), w.stride(2), w.stride(1)) if trans_w else w.stride()

    def grid(meta):
        return (topo.max_block_rows * cdiv(N, meta["BLOCK_N"]),)
    F = topo.blocks_per_row
    launch_tuned(_dsd_kernel, grid, (N, F, sbk, B, data.dtype, w.dtype),
                 (data, w, out, topo.row_offsets, topo.column_indices, topo.num_block_rows),
                 (N, F, sbe, sbk, sbn, out.stride(0), out.stride(1)), dict(BLOCK=B),
                 interpret=_interpret(B, BLOCK_N=32))
    return out


def _dstd(data: torch.Tensor, d: torch.Tensor, topo: Topology, out: torch.Tensor, d_strides, out_strides, N):
    def grid(meta):
        return (topo.num_block_cols * cdiv(N, meta["BLOCK_N"]),)
    B, F = topo.block_size, topo.blocks_per_row
    launch_tuned(_dstd_kernel, grid, (N, F, out_strides[2], B, data.dtype, d.dtype),
                 (data, d, out, topo.offsets_t, topo.block_offsets_t, topo.column_indices_t),
                 (N, F, topo.num_block_cols, *d_strides, *out_strides), dict(BLOCK=B),
                 interpret=_interpret(B, BLOCK_N=32))
    return out


def dstd(data: torch.Tensor, d: torch.Tensor, topo: Topology) -> torch.Tensor:
    """DSᵀD: Sᵀ · d for d [M, N] (M >= R·B) -> [E, f, N], the layout of w2 (dW2 = Aᵀ · dY)."""
    E, f, N = topo.num_experts, topo.blocks_per_row * topo.block_size, d.shape[1]
    out = d.new_empty(E, f, N)
    return _dstd(data, d, topo, out, d.stride(), out.stride(), N)


def ddts(d: torch.Tensor, data: torch.Tensor, topo: Topology) -> torch.Tensor:
    """DDᵀS: dᵀ · S for d [M, N] (M >= R·B) -> [E, N, f], the layout of w1 (dW1 = Xᵀ · dH).

    Computed as (Sᵀ · d)ᵀ: the same column walk as DSᵀD, stored transposed."""
    E, f, N = topo.num_experts, topo.blocks_per_row * topo.block_size, d.shape[1]
    out = d.new_empty(E, N, f)
    return _dstd(data, d, topo, out, d.stride(), (out.stride(0), out.stride(2), out.stride(1)), N)


def dds(d: torch.Tensor, data: torch.Tensor, topo: Topology) -> torch.Tensor:
    """DDS: d · S for d [N, M] (M >= R·B) -> [N, E·f], computed as (Sᵀ · dᵀ)ᵀ."""
    N = d.shape[0]
    out = d.new_empty(N, topo.num_block_cols * topo.block_size)
    f = topo.blocks_per_row * topo.block_size
    return _dstd(data, d, topo, out, (d.stride(1), d.stride(0)), (f * out.stride(1), out.stride(1),
                                                                    out.stride(0)), N)


# ---- the padded permutation: rows in and out of the padded layout, gates fused (memory-bound, one pass each)


@triton.jit
def _pad_rows_kernel(x_ptr, src_ptr, scale_ptr, out_ptr, D, k, stride_x, stride_o,
                     HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[p] = scale[src[p]] · x[src[p] // k] for a real row (src[p] >= 0), zeros for a padding row."""
    p = tl.program_id(0)
    s = tl.load(src_ptr + p)
    read_d = tl.where(s >= 0, D, 0)  # a padding row reads nothing (row 0, masked off) and stores zeros
    s = tl.maximum(s, 0)
    x_row = x_ptr + (s // k).to(tl.int64) * stride_x
    out_row = out_ptr + p.to(tl.int64) * stride_o
    if HAS_SCALE:
        scale = tl.load(scale_ptr + s).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(x_row + offs, mask=offs < read_d, other=0.0)
        if HAS_SCALE:
            v = v.to(tl.float32) * scale
        tl.store(out_row + offs, v.to(out_ptr.dtype.element_ty), mask=offs < D)


@triton.jit
def _combine_rows_kernel(y_ptr, dest_ptr, w_ptr, out_ptr, D, k, stride_y, stride_o,
                         HAS_W: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = Σ_j w[t, j] · y[dest[t, j]] (w = 1 without HAS_W), accumulated in fp32."""
    t = tl.program_id(0)
    offs_j = tl.arange(0, KP)
    mask_j = offs_j < k
    rows = tl.load(dest_ptr + t * k + offs_j, mask=mask_j, other=0).to(tl.int64)
    if HAS_W:
        w = tl.load(w_ptr + t * k + offs_j, mask=mask_j, other=0.0).to(tl.float32)
    else:
        w = mask_j.to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        tile = tl.load(y_ptr + rows[:, None] * stride_y + offs[None, :],
                       mask=mask_j[:, None] & (offs < D)[None, :], other=0.0)  # [KP, BLOCK_D]
        acc = tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
        tl.store(out_ptr + t.to(tl.int64) * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < D)


@triton.jit
def _row_dots_kernel(y_ptr, dest_ptr, g_ptr, out_ptr, D, k, stride_y, stride_g,
                     KP: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, j] = ⟨y[dest[t, j]], g[t]⟩ in fp32 (the gate gradient)."""
    t = tl.program_id(0)
    offs_j = tl.arange(0, KP)
    mask_j = offs_j < k
    rows = tl.load(dest_ptr + t * k + offs_j, mask=mask_j, other=0).to(tl.int64)
    acc = tl.zeros((KP,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        tile = tl.load(y_ptr + rows[:, None] * stride_y + offs[None, :],
                       mask=mask_j[:, None] & (offs < D)[None, :], other=0.0)
        g = tl.load(g_ptr + t.to(tl.int64) * stride_g + offs, mask=offs < D, other=0.0)
        acc += tl.sum(tile.to(tl.float32) * g.to(tl.float32)[None, :], axis=1)
    tl.store(out_ptr + t * k + offs_j, acc, mask=mask_j)


_ROW_OPTIONS = (("num_warps", 4),)


def _row_meta(D: int, k: int = 1) -> dict:
    return dict(KP=max(2, next_pow2(k)), BLOCK_D=min(next_pow2(D), 64 if INTERPRET else 1024))


def pad_rows(x: torch.Tensor, src: torch.Tensor, k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, d] -> [len(src), d]: row p = scale[src[p]] · x[src[p] // k], or zeros where src[p] < 0.

    src [rows] int32 (`padded_sources`); scale [T·k] (the gates in slot order) or None."""
    x = x.contiguous()
    out = x.new_empty(src.numel(), x.shape[1])
    meta = _row_meta(x.shape[1])
    launch(_pad_rows_kernel, (src.numel(),), (x, src, x if scale is None else scale, out),
           (x.shape[1], k, x.stride(0), out.stride(0)), dict(HAS_SCALE=scale is not None, BLOCK_D=meta["BLOCK_D"]),
           _ROW_OPTIONS)
    return out


def combine_rows(y: torch.Tensor, dest_TK: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = Σ_j weights[t, j] · y[dest[t, j]] -> [T, d] (a plain sum without weights)."""
    T, k = dest_TK.shape
    y = y.contiguous()
    out = y.new_empty(T, y.shape[1])
    if T:
        launch(_combine_rows_kernel, (T,), (y, dest_TK, y if weights is None else weights, out),
               (y.shape[1], k, y.stride(0), out.stride(0)), dict(HAS_W=weights is not None, **_row_meta(y.shape[1], k)),
               _ROW_OPTIONS)
    return out


def row_dots(y: torch.Tensor, dest_TK: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[t, j] = ⟨y[dest[t, j]], g[t]⟩ -> [T, k] fp32."""
    T, k = dest_TK.shape
    y, g = y.contiguous(), g.contiguous()
    out = torch.empty(T, k, dtype=torch.float32, device=y.device)
    if T:
        launch(_row_dots_kernel, (T,), (y, dest_TK, g, out), (y.shape[1], k, y.stride(0), g.stride(0)),
               _row_meta(y.shape[1], k), _ROW_OPTIONS)
    return out
