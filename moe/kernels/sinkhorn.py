"""Sinkhorn-Knopp rounds in the log domain as one kernel launch per round (moe/router.py's `sinkhorn` on CUDA).

    a = lk + c[None, :] + r[:, None]          lk = scale * logits [T, E] fp32, potentials c [E], r [T]
    round:  c_e = log(T / E) - logsumexp_t(lk_te + r_t)        (columns sum to T / E)
            r_t =            - logsumexp_e(lk_te + c_e)        (rows sum to 1)

The same iteration as rewriting the matrix each round (the torch loop in moe/router.py), held as its two
potentials: r depends on c alone, so a round needs one pass over lk. Each program owns a band of rows; given c it
computes its rows' r and the column log-sum-exp of its band (a running max and sum per column), written as a
partial [P, E]; the next launch first reduces the P partials to c. The [T, E] input is read once per round and
the result written once, against several passes per round of the compiled torch loop (measured in
benchmarks/results/, README). A launcher registered as a torch.library custom op (opaque to torch.compile).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels.launch import INTERPRET, cdiv, launch, next_pow2

MAX_EXPERTS = 1024  # the widest rows tested on the GPU (tests/test_cuda_kernels.py); wider ones take the torch loop


@triton.jit
def _sinkhorn_round(logits_ptr, scale_ptr, max_in_ptr, sum_in_ptr, max_out_ptr, sum_out_ptr, out_ptr,
                    T, E, P, rows_per_prog,
                    HAS_C: tl.constexpr, LAST: tl.constexpr, EP: tl.constexpr, BT: tl.constexpr):
    """One round for rows [pid * rows_per_prog, (pid + 1) * rows_per_prog). HAS_C: reduce the previous launch's
    partials to c (else c = r = 0: the first launch only takes the column statistics of lk). LAST: write
    a = lk + c + r; else this band's column partials (running max, sum of exp) of lk + r."""
    pid = tl.program_id(0)
    cols = tl.arange(0, EP)
    cmask = cols < E
    scale = tl.load(scale_ptr)
    c = tl.zeros((EP,), dtype=tl.float32)
    if HAS_C:  # c_e = log(T/E) - logsumexp over the P partials (m_p, s_p): log sum_p s_p exp(m_p - M) + M
        big_m = tl.full((EP,), float("-inf"), dtype=tl.float32)
        big_s = tl.zeros((EP,), dtype=tl.float32)
        for p0 in range(0, P, BT):
            ps = p0 + tl.arange(0, BT)
            pmask = (ps < P)[:, None] & cmask[None, :]
            m = tl.load(max_in_ptr + ps[:, None] * EP + cols[None, :], mask=pmask, other=float("-inf"))
            s = tl.load(sum_in_ptr + ps[:, None] * EP + cols[None, :], mask=pmask, other=0.0)
            new_m = tl.maximum(big_m, tl.max(m, axis=0))
            new_m = tl.where(cmask, new_m, 0.0)  # padding columns: keep every exp finite
            big_s = big_s * tl.exp(big_m - new_m) + tl.sum(s * tl.exp(m - new_m[None, :]), axis=0)
            big_m = new_m
        t_over_e = (tl.zeros((EP,), dtype=tl.float32) + T) / E  # T, E may be specialised to constants
        c = tl.log(t_over_e) - big_m - tl.log(tl.where(cmask, big_s, 1.0))
    run_m = tl.full((EP,), float("-inf"), dtype=tl.float32)
    run_s = tl.zeros((EP,), dtype=tl.float32)
    for t0 in range(0, rows_per_prog, BT):  # the last band may run past T: masked (its first tile has a row)
        rows = pid * rows_per_prog + t0 + tl.arange(0, BT)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
        lk = tl.load(logits_ptr + offs, mask=mask, other=0.0) * scale  # [BT, EP]
        if HAS_C:  # r_t = -logsumexp_e(lk + c) over the real columns
            z = tl.where(cmask[None, :], lk + c[None, :], float("-inf"))
            zm = tl.max(z, axis=1)
            r = -(zm + tl.log(tl.sum(tl.exp(z - zm[:, None]), axis=1)))
        else:
            r = tl.zeros((BT,), dtype=tl.float32)
        if LAST:
            tl.store(out_ptr + offs, lk + c[None, :] + r[:, None], mask=mask)
        else:  # this band's column statistics of lk + r, folded into the running (max, sum of exp)
            y = tl.where(rmask[:, None], lk + r[:, None], float("-inf"))
            new_m = tl.maximum(run_m, tl.max(y, axis=0))
            run_s = run_s * tl.exp(run_m - new_m) + tl.sum(tl.exp(y - new_m[None, :]), axis=0)
            run_m = new_m
    if not LAST:
        tl.store(max_out_ptr + pid * EP + cols, run_m)
        tl.store(sum_out_ptr + pid * EP + cols, run_s)


def _shape(T: int, E: int) -> tuple[int, int, int, int]:
    """(EP, BT, rows per program, programs): tiles of about 8K fp32 values; about 128 bands (one wave of an
    H100/H200), each at least one tile; small tiles and few programs under the interpreter."""
    EP = max(2, next_pow2(E))
    BT = max(1, min(16 if INTERPRET else 128, (1024 if INTERPRET else 8192) // EP))
    rows = BT * max(1, cdiv(T, BT * (4 if INTERPRET else 128)))
    return EP, BT, rows, cdiv(T, rows)


@torch.library.custom_op("moetron::sinkhorn_rounds", mutates_args=())
def sinkhorn_rounds(logits: torch.Tensor, scale: torch.Tensor, iters: int) -> torch.Tensor:
    """`iters` >= 1 Sinkhorn rounds (columns then rows) on lk = scale * logits: logits [T, E] fp32, scale a
    1-element fp32 tensor (read on the device, no host sync) -> the balanced log-assignment [T, E] fp32."""
    if iters < 1:
        raise ValueError(f"sinkhorn_rounds needs iters >= 1, got {iters}")
    T, E = logits.shape
    if E > MAX_EXPERTS:
        raise ValueError(f"sinkhorn_rounds handles at most {MAX_EXPERTS} experts, got {E}")
    logits = logits.contiguous()
    out = torch.empty_like(logits)
    if T == 0:
        return out
    EP, BT, rows, P = _shape(T, E)
    maxes = torch.empty(2, P, EP, dtype=torch.float32, device=logits.device)
    sums = torch.empty_like(maxes)
    for i in range(iters + 1):  # launch 0 takes lk's column statistics; launch i >= 1 is round i
        src, dst = (i + 1) % 2, i % 2
        launch(_sinkhorn_round, (P,), (logits, scale, maxes[src], sums[src], maxes[dst], sums[dst], out),
               (T, E, P, rows), dict(HAS_C=i > 0, LAST=i == iters, EP=EP, BT=BT), (("num_warps", 4),))
    return out


@sinkhorn_rounds.register_fake
def _(logits, scale, iters):
    return torch.empty_like(logits)
