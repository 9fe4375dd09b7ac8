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

The rows go into and out of the padded layout through moe/kernels/rows.py. Each launcher is a torch.library
custom op taking the topology as its sizes and index tensors (opaque to torch.compile, with fake shapes).

Under TRITON_INTERPRET=1 each kernel runs with one fixed configuration; on a GPU the products are autotuned
over configurations chosen for B = 128 (B = 64 and smaller work, with BLOCK_K = B where B < 64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moe.kernels.activations import gelu_grad, gelu_sigmoid
from moe.kernels.launch import autotune, cdiv, launch_tuned
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
    act=ACT_GELU returns (H, GELU(H)); act=ACT_GELU_GRAD reads H from aux and returns acc ⊙ GELU'(H). Blocks
    of unused rows are left unwritten.
    """
    out = _sdd(a, w, *_args(topo), trans_w, act, aux)
    return tuple(out) if act == ACT_GELU else out[0]


@torch.library.custom_op("moetron::bs_sdd", mutates_args=())
def _sdd(a: torch.Tensor, w: torch.Tensor, sizes: list[int], index: list[torch.Tensor], trans_w: bool, act: int,
         aux: Optional[torch.Tensor]) -> list[torch.Tensor]:
    topo = Topology(*sizes, *index)
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
    return [out, aux] if act == ACT_GELU else [out]


@_sdd.register_fake
def _(a, w, sizes, index, trans_w, act, aux):
    B, _, F, R = sizes
    out = a.new_empty(R * F, B, B)
    return [out, torch.empty_like(out)] if act == ACT_GELU else [out]


def dsd(data: torch.Tensor, w: torch.Tensor, topo: Topology, *, trans_w: bool = False) -> torch.Tensor:
    """S · Wcat -> [R·B, N]; rows past the block rows in use are left unwritten.

    w [E, f, N] (Wcat = W2cat), or with trans_w w [E, N, f] (Wcat = W1catᵀ).
    """
    return _dsd(data, w, *_args(topo), trans_w)


@torch.library.custom_op("moetron::bs_dsd", mutates_args=())
def _dsd(data: torch.Tensor, w: torch.Tensor, sizes: list[int], index: list[torch.Tensor],
         trans_w: bool) -> torch.Tensor:
    topo = Topology(*sizes, *index)
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


@_dsd.register_fake
def _(data, w, sizes, index, trans_w):
    return data.new_empty(sizes[0] * sizes[3], w.shape[1] if trans_w else w.shape[2])


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
    return _column_walk(data, d, *_args(topo), "dstd")


def ddts(d: torch.Tensor, data: torch.Tensor, topo: Topology) -> torch.Tensor:
    """DDᵀS: dᵀ · S for d [M, N] (M >= R·B) -> [E, N, f], the layout of w1 (dW1 = Xᵀ · dH).

    Computed as (Sᵀ · d)ᵀ: the same column walk as DSᵀD, stored transposed."""
    return _column_walk(data, d, *_args(topo), "ddts")


def dds(d: torch.Tensor, data: torch.Tensor, topo: Topology) -> torch.Tensor:
    """DDS: d · S for d [N, M] (M >= R·B) -> [N, E·f], computed as (Sᵀ · dᵀ)ᵀ."""
    return _column_walk(data, d, *_args(topo), "dds")


def _walk_shape(d: torch.Tensor, sizes: list[int], kind: str) -> tuple[int, ...]:
    B, E, F, _ = sizes
    f = F * B
    return {"dstd": (E, f, d.shape[1]), "ddts": (E, d.shape[1], f), "dds": (d.shape[0], E * f)}[kind]


@torch.library.custom_op("moetron::bs_column_walk", mutates_args=())
def _column_walk(data: torch.Tensor, d: torch.Tensor, sizes: list[int], index: list[torch.Tensor],
                 kind: str) -> torch.Tensor:
    """The three products that walk the block columns: DSᵀD, DDᵀS and DDS (above)."""
    topo = Topology(*sizes, *index)
    out = d.new_empty(_walk_shape(d, sizes, kind))
    if kind == "dstd":
        return _dstd(data, d, topo, out, d.stride(), out.stride(), d.shape[1])
    if kind == "ddts":
        return _dstd(data, d, topo, out, d.stride(), (out.stride(0), out.stride(2), out.stride(1)), d.shape[1])
    f = topo.blocks_per_row * topo.block_size
    return _dstd(data, d, topo, out, (d.stride(1), d.stride(0)), (f * out.stride(1), out.stride(1), out.stride(0)),
                 d.shape[0])


@_column_walk.register_fake
def _(data, d, sizes, index, kind):
    return d.new_empty(_walk_shape(d, sizes, kind))


def _args(topo: Topology) -> tuple[list[int], list[torch.Tensor]]:
    """A topology as custom-op arguments: its sizes (B, E, F, R) and its index tensors."""
    return list(topo[:4]), list(topo[4:])
