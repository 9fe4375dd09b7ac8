"""Row gathers and gated combines by index: the memory-bound passes around the expert GEMMs, one pass each.

    pad_rows(x, src, k, scale)     out[p] = scale[src[p]] * x[src[p] // k], zeros where src[p] < 0
    combine_rows(y, dest, w)       out[t] = sum_j w[t, j] * y[dest[t, j]]          (fp32 accumulation)
    row_dots(y, dest, g)           out[t, j] = <y[dest[t, j]], g[t]>                (fp32)

The dispatcher's gated combine (moe/dispatch.py) is combine_rows forward and pad_rows + row_dots backward with
dest = the grouped position of each slot; the blocksparse backend pads and un-pads its rows with the first two.
Each launcher is a torch.library custom op (opaque to torch.compile, with a fake implementation).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moe.kernels.launch import INTERPRET, launch, next_pow2


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


@torch.library.custom_op("moetron::pad_rows", mutates_args=())
def pad_rows(x: torch.Tensor, src: torch.Tensor, k: int, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, d] -> [len(src), d]: row p = scale[src[p]] · x[src[p] // k], or zeros where src[p] < 0.

    src [rows] int32 (`padded_sources`); scale [T·k] (the gates in slot order) or None."""
    x = x.contiguous()
    out = x.new_empty(src.numel(), x.shape[1])
    meta = _row_meta(x.shape[1])
    launch(_pad_rows_kernel, (src.numel(),), (x, src, x if scale is None else scale, out),
           (x.shape[1], k, x.stride(0), out.stride(0)), dict(HAS_SCALE=scale is not None, BLOCK_D=meta["BLOCK_D"]),
           _ROW_OPTIONS)
    return out


@torch.library.custom_op("moetron::combine_rows", mutates_args=())
def combine_rows(y: torch.Tensor, dest_TK: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = Σ_j weights[t, j] · y[dest[t, j]] -> [T, d] (a plain sum without weights)."""
    T, k = dest_TK.shape
    y = y.contiguous()
    out = y.new_empty(T, y.shape[1])
    if T:
        launch(_combine_rows_kernel, (T,), (y, dest_TK, y if weights is None else weights, out),
               (y.shape[1], k, y.stride(0), out.stride(0)), dict(HAS_W=weights is not None, **_row_meta(y.shape[1], k)),
               _ROW_OPTIONS)
    return out


@torch.library.custom_op("moetron::row_dots", mutates_args=())
def row_dots(y: torch.Tensor, dest_TK: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[t, j] = ⟨y[dest[t, j]], g[t]⟩ -> [T, k] fp32."""
    T, k = dest_TK.shape
    y, g = y.contiguous(), g.contiguous()
    out = torch.empty(T, k, dtype=torch.float32, device=y.device)
    if T:
        launch(_row_dots_kernel, (T,), (y, dest_TK, g, out), (y.shape[1], k, y.stride(0), g.stride(0)),
               _row_meta(y.shape[1], k), _ROW_OPTIONS)
    return out


@pad_rows.register_fake
def _(x, src, k, scale=None):
    return x.new_empty(src.shape[0], x.shape[1])


@combine_rows.register_fake
def _(y, dest_TK, weights=None):
    return y.new_empty(dest_TK.shape[0], y.shape[1])


@row_dots.register_fake
def _(y, dest_TK, g):
    return torch.empty(dest_TK.shape, dtype=torch.float32, device=y.device)
