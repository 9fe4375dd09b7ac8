"""Sinkhorn-Knopp rounds in the log domain as one kernel launch per round (moe/router.py's `sinkhorn` on CUDA).

    a = lk + c[None, :] + r[:, None]          lk = scale * logits [T, E] fp32, potentials c [E], r [T]
    round:  c_e = log(T / E) - logsumexp_t(lk_te + r_t)        (columns sum to T / E)
            r_t =            - logsumexp_e(lk_te + c_e)        (rows sum to 1)

The same iteration as rewriting the matrix each round (the torch loop in moe/router.py), held as its two
potentials: r depends on c alone, so a round needs one pass over lk. Each program owns a band of rows; given c it
computes its rows' r and its band's part of the next round's column sums, written as a partial [P, E]; the next
launch first reduces the P partials to c. The [T, E] input is read once per round and the result written once.

The column sums need no running maximum after the first round: with c from round i, the terms
exp(lk_te + c_e + r_t) are the row-normalised assignment (each <= 1), and the next c is
c_e + log(T / E) - log(sum_t of them). Every column of it sums to at least 1 / E (before the row step each column
sums to T / E and no row sums to more than T), so the sum neither overflows nor underflows in fp32, and the row's
exp serves both sums: one exp per entry. Only the first launch, on lk itself, keeps a running (max, sum of exp)
per column. A launcher registered as a torch.library custom op (opaque to torch.compile).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels.launch import INTERPRET, cdiv, launch, next_pow2

MAX_EXPERTS = 1024  # the widest rows tested on the GPU (tests/test_cuda_kernels.py); wider ones take the torch loop


@triton.jit
def _column_lse_of_logits(logits_ptr, scale_ptr, max_out_ptr, sum_out_ptr, T, E, rows_per_prog,
                          EP: tl.constexpr, BT: tl.constexpr):
    """Launch 0: this band's running (max, sum of exp) per column of lk, for round 1's c."""
    pid = tl.program_id(0)
    cols = tl.arange(0, EP)
    cmask = cols < E
    scale = tl.load(scale_ptr)
    run_m = tl.full((EP,), float("-inf"), dtype=tl.float32)
    run_s = tl.zeros((EP,), dtype=tl.float32)
    for t0 in range(0, rows_per_prog, BT):  # the last band may run past T: masked (its first tile has a row)
        rows = pid * rows_per_prog + t0 + tl.arange(0, BT)
        mask = (rows < T)[:, None] & cmask[None, :]
        y = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], mask=mask,
                    other=float("-inf")) * scale
        new_m = tl.maximum(run_m, tl.max(y, axis=0))
        new_m = tl.where(cmask, new_m, 0.0)  # padding columns: keep every exp finite
        run_s = run_s * tl.exp(run_m - new_m) + tl.sum(tl.exp(y - new_m[None, :]), axis=0)
        run_m = new_m
    tl.store(max_out_ptr + pid * EP + cols, run_m)
    tl.store(sum_out_ptr + pid * EP + cols, run_s)


@triton.jit
def _sinkhorn_round(logits_ptr, scale_ptr, max_in_ptr, sum_in_ptr, c_in_ptr, sum_out_ptr, c_out_ptr, out_ptr,
                    T, E, P, rows_per_prog,
                    FROM_LSE: tl.constexpr, LAST: tl.constexpr, EP: tl.constexpr, BT: tl.constexpr):
    """One round for rows [pid * rows_per_prog, (pid + 1) * rows_per_prog). c from the previous launch's P
    partials: FROM_LSE, launch 0's (max, sum of exp) of lk; else the previous round's column sums and c_in.
    LAST: write a = lk + c + r; else this band's column sums of exp(a) (and program 0 writes c for the next)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, EP)
    cmask = cols < E
    scale = tl.load(scale_ptr)
    log_t_over_e = tl.log((tl.zeros((EP,), dtype=tl.float32) + T) / E)  # T, E may be specialised to constants
    if FROM_LSE:  # c_e = log(T/E) - logsumexp over the P partials (m_p, s_p): log sum_p s_p exp(m_p - M) + M
        big_m = tl.full((EP,), float("-inf"), dtype=tl.float32)
        big_s = tl.zeros((EP,), dtype=tl.float32)
        for p0 in range(0, P, BT):
            ps = p0 + tl.arange(0, BT)
            pmask = (ps < P)[:, None] & cmask[None, :]
            m = tl.load(max_in_ptr + ps[:, None] * EP + cols[None, :], mask=pmask, other=float("-inf"))
            s = tl.load(sum_in_ptr + ps[:, None] * EP + cols[None, :], mask=pmask, other=0.0)
            new_m = tl.maximum(big_m, tl.max(m, axis=0))
            new_m = tl.where(cmask, new_m, 0.0)
            big_s = big_s * tl.exp(big_m - new_m) + tl.sum(s * tl.exp(m - new_m[None, :]), axis=0)
            big_m = new_m
        c = log_t_over_e - big_m - tl.log(tl.where(cmask, big_s, 1.0))
    else:  # c_e = c_in_e + log(T/E) - log(sum of the column's row-normalised assignment)
        total = tl.zeros((EP,), dtype=tl.float32)
        for p0 in range(0, P, BT):
            ps = p0 + tl.arange(0, BT)
            pmask = (ps < P)[:, None] & cmask[None, :]
            total += tl.sum(tl.load(sum_in_ptr + ps[:, None] * EP + cols[None, :], mask=pmask, other=0.0), axis=0)
        c = tl.load(c_in_ptr + cols, mask=cmask, other=0.0) + log_t_over_e - tl.log(tl.where(cmask, total, 1.0))
    c = tl.where(cmask, c, 0.0)
    col_s = tl.zeros((EP,), dtype=tl.float32)
    for t0 in range(0, rows_per_prog, BT):  # the last band may run past T: masked (its first tile has a row)
        rows = pid * rows_per_prog + t0 + tl.arange(0, BT)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
        z = tl.load(logits_ptr + offs, mask=mask, other=0.0) * scale + c[None, :]  # [BT, EP]: lk + c
        z = tl.where(cmask[None, :], z, float("-inf"))
        zm = tl.max(z, axis=1)
        ez = tl.exp(z - zm[:, None])
        row_s = tl.sum(ez, axis=1)
        if LAST:  # r_t = -logsumexp_e(lk + c): a = z + r
            tl.store(out_ptr + offs, z - (zm + tl.log(row_s))[:, None], mask=mask)
        else:  # exp(a) = ez / row_s, summed over this band's real rows
            col_s += tl.sum(tl.where(rmask[:, None], ez / row_s[:, None], 0.0), axis=0)
    if not LAST:
        tl.store(sum_out_ptr + pid * EP + cols, col_s)
        if pid == 0:
            tl.store(c_out_ptr + cols, c)


def _shape(T: int, E: int, bands: int, tile: int) -> tuple[int, int, int, int]:
    """(EP, BT, rows per program, programs): tiles of about `tile` fp32 values, about `bands` bands, each at least
    one tile."""
    EP = max(2, next_pow2(E))
    BT = max(1, min(128, tile // EP))
    rows = BT * max(1, cdiv(T, BT * bands))
    return EP, BT, rows, cdiv(T, rows)


# (bands, tile, warps): two programs of 8 warps per SM of an H200, the fastest of benchmarks/bench_sinkhorn.py's
# sweep at MoE-XS's and MoE-Small's sizes (benchmarks/results/, README); small tiles and few programs under the
# interpreter, whose cost grows with the number of programs
DEFAULT = (4, 1024, 4) if INTERPRET else (256, 8192, 8)


def rounds(logits: torch.Tensor, scale: torch.Tensor, iters: int, shape: tuple[int, int, int] = DEFAULT):
    """The launches of `sinkhorn_rounds` with an explicit (bands, tile, warps) (benchmarks/bench_sinkhorn.py
    sweeps them)."""
    T, E = logits.shape
    out = torch.empty_like(logits)
    if T == 0:
        return out
    bands, tile, warps = shape
    EP, BT, rows, P = _shape(T, E, bands, tile)
    maxes, sums = (torch.empty(P, EP, dtype=torch.float32, device=logits.device) for _ in range(2))
    partials = torch.empty(2, P, EP, dtype=torch.float32, device=logits.device)  # column sums, per round parity
    cs = torch.empty(2, EP, dtype=torch.float32, device=logits.device)  # c, per round parity
    launch(_column_lse_of_logits, (P,), (logits, scale, maxes, sums), (T, E, rows), dict(EP=EP, BT=BT),
           (("num_warps", warps),))
    for i in range(1, iters + 1):  # launch i is round i
        src, dst = (i + 1) % 2, i % 2
        sum_in = sums if i == 1 else partials[src]  # round 1 reduces launch 0's (max, sum of exp)
        launch(_sinkhorn_round, (P,), (logits, scale, maxes, sum_in, cs[src], partials[dst], cs[dst], out),
               (T, E, P, rows), dict(FROM_LSE=i == 1, LAST=i == iters, EP=EP, BT=BT), (("num_warps", warps),))
    return out


@torch.library.custom_op("moetron::sinkhorn_rounds", mutates_args=())
def sinkhorn_rounds(logits: torch.Tensor, scale: torch.Tensor, iters: int) -> torch.Tensor:
    """`iters` >= 1 Sinkhorn rounds (columns then rows) on lk = scale * logits: logits [T, E] fp32, scale a
    1-element fp32 tensor (read on the device, no host sync) -> the balanced log-assignment [T, E] fp32."""
    if iters < 1:
        raise ValueError(f"sinkhorn_rounds needs iters >= 1, got {iters}")
    if logits.shape[1] > MAX_EXPERTS:
        raise ValueError(f"sinkhorn_rounds handles at most {MAX_EXPERTS} experts, got {logits.shape[1]}")
    return rounds(logits.contiguous(), scale, iters)


@sinkhorn_rounds.register_fake
def _(logits, scale, iters):
    return torch.empty_like(logits)
