"""The non-MoE pieces of a Transformer-XS training step on one GPU, each forward+backward, to choose what to
optimise next.

    python benchmarks/bench_step_pieces.py [--reps 20] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/bench_step_pieces.py --check-only --chunk 8 --vocab 300 --blocks 64  # CPU

1. LM head + loss: parallel/cross_entropy.py `linear_cross_entropy` at each of --ce-chunks rows per chunk.
2. Its GEMM lower bound: only the three GEMMs per --chunk rows (logits, dx, dw), no softmax.
3. Its elementwise pieces on one [--chunk, --vocab] bf16 logits chunk: `_row_stats`, `_grad` (torch.compile'd
   as the module does), and the two with the log-sum-exp between them; GB/s from the bytes of logits read and
   written (row_stats 1x, grad 2x).
4. The CUDA path's kernel (parallel/cross_entropy.py `loss_and_grad_rows`): one Triton program per row, an
   online max / sum of exp over the row in blocks, then a second pass over the same row (mostly from L2) that
   writes (softmax - onehot) * scale in place over the logits; checked against the torch pair, swept over
   --blocks x --warps (GB/s from 2x the logits: read once from DRAM, written once).
5. Attention: causal scaled_dot_product_attention on [batch, heads, seq, head_dim] under the flash, cuDNN and
   memory-efficient backends; cuDNN checked against flash.

Times: torch.cuda.Event over --reps calls after 3 warm-up calls, the mean in ms. The tokens of a step are
batch x seq; TFLOP/s from 6 N d V for the head (three GEMMs) and 3.5 x 2 B H S^2 D for causal attention.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from parallel.cross_entropy import _grad, _row_stats, linear_cross_entropy, loss_and_grad_rows  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def torch_pair(row_stats, grad, logits, targets, scale):
    """What linear_cross_entropy does per chunk between its GEMMs: per-row loss, gradient."""
    m, s, t = row_stats(logits, targets)
    lse = m + torch.log(s)
    return lse - t, grad(logits, targets, lse, scale)


def time_ms(fn, reps):
    """Mean ms of fn() over `reps` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def row(piece, variant, ms, flops=None, nbytes=None, note=""):
    r = {"piece": piece, "variant": variant, "ms": ms, "note": note}
    if ms is not None and flops:
        r["tflops"] = flops / ms / 1e9
    if ms is not None and nbytes:
        r["gbps"] = nbytes / ms / 1e6
    return r


def check_fused(rows, V, blocks, dev, row_stats, grad):
    """Max abs errors of the kernel's gradient (scale 1) and loss against the torch pair, per BLOCK, on bf16
    logits and on the same logits in fp32 (no rounding of the gradient: the math alone)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = (3 * torch.randn(rows, V, device=dev, generator=gen)).to(torch.bfloat16)
    targets = torch.randint(0, V, (rows,), device=dev, generator=gen)
    targets[0], targets[-1] = V - 1, 0  # the last column: in the last, partial block when BLOCK does not divide V
    targets[1] = -1  # no target in this vocabulary slice (vocabulary-parallel)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        lg = logits.to(dtype)
        loss_ref, g_ref = torch_pair(row_stats, grad, lg, targets, 1.0)
        for block in blocks:
            g = lg.clone()
            loss = loss_and_grad_rows(g, targets, 1.0, block)
            key = f"{str(dtype)[6:]} BLOCK {block}"
            out[key] = {"grad_max_abs_err": (g.float() - g_ref.float()).abs().max().item(),
                        "loss_max_abs_err": (loss - loss_ref).abs().max().item()}
            print(f"check [{rows}, {V}] {key}: gradient max abs err {out[key]['grad_max_abs_err']:.3g}, "
                  f"loss max abs err {out[key]['loss_max_abs_err']:.3g} (loss ~{loss_ref.mean().item():.2f})")
    return out


def bench_head(a, dev, row_stats, grad):
    N, d, V, c = a.batch * a.seq, a.hidden, a.vocab, a.chunk
    x = torch.randn(N, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, d, device=dev) / d ** 0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev)
    rows, flops = [], 6 * N * d * V

    def head(chunk):
        x.grad = w.grad = None
        linear_cross_entropy(x, w, targets, torch.bfloat16, chunk_size=chunk).backward()
    for chunk in a.ce_chunks:
        rows.append(row("1 LM head + loss", f"linear_cross_entropy chunk {chunk}",
                        time_ms(lambda chunk=chunk: head(chunk), a.reps), flops, note=f"N={N} d={d} V={V}"))

    xd, wd = x.detach(), w.detach()
    dx, lg, g = torch.empty_like(xd), *(torch.empty(c, V, device=dev, dtype=torch.bfloat16) for _ in range(2))

    def gemms():  # g: a stand-in for the gradient of the logits
        dw = torch.zeros(V, d, device=dev, dtype=torch.float32)
        for s in range(0, N, c):
            xc = xd[s:s + c]
            n = xc.shape[0]
            torch.mm(xc, wd.t(), out=lg[:n])
            torch.mm(g[:n], wd, out=dx[s:s + c])
            dw = torch.addmm(dw, g[:n].t(), xc, out_dtype=torch.float32)
    rows.append(row("2 GEMM bound", f"3 GEMMs per chunk {c}", time_ms(gemms, a.reps), flops))

    logits, t = (3 * torch.randn(c, V, device=dev)).to(torch.bfloat16), targets[:c]
    nb, per_step = logits.numel() * logits.element_size(), f"x{-(-N // c)} chunks per step"
    m, s, _ = row_stats(logits, t)
    lse = m + torch.log(s)
    for name, fn, k in [("_row_stats", lambda: row_stats(logits, t), 1),
                        ("_grad", lambda: grad(logits, t, lse, 1.0 / N), 2),
                        ("row_stats + lse + grad", lambda: torch_pair(row_stats, grad, logits, t, 1.0 / N), 3)]:
        ms = time_ms(fn, a.reps)
        rows.append(row("3 elementwise, torch.compile", f"{name} [{c}, {V}]", ms, nbytes=k * nb,
                        note=f"{per_step}: {ms * -(-N // c):.2f} ms"))

    # the kernel overwrites `logits` with gradients on every call: the same work whatever the values
    sweep = []
    for block in a.blocks:
        for warps in a.warps:
            ms = time_ms(lambda block=block, warps=warps: loss_and_grad_rows(logits, t, 1.0 / N, block, warps), a.reps)
            sweep.append({"block": block, "num_warps": warps, "ms": ms, "gbps": 2 * nb / ms / 1e6})
    best = min(sweep, key=lambda r: r["ms"])
    rows.append(row("4 one kernel (library)", f"fused row kernel [{c}, {V}] BLOCK {best['block']} warps "
                    f"{best['num_warps']}", best["ms"], nbytes=2 * nb,
                    note=f"{per_step}: {best['ms'] * -(-N // c):.2f} ms"))
    return rows, sweep


def sdpa_step(q, k, v, dout, backend):
    def step():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad
    return step


def bench_attention(a, dev):
    B, H, S, D = a.batch, a.heads, a.seq, a.head_dim
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    flops, rows, outs = 3.5 * 2 * B * H * S * S * D, [], {}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        step = sdpa_step(q, k, v, dout, getattr(SDPBackend, name))
        try:
            outs[name] = step()
            rows.append(row("5 attention fwd+bwd", name, time_ms(step, a.reps), flops, note=f"[{B}, {H}, {S}, {D}]"))
        except Exception as e:  # a backend that this build or this GPU lacks
            rows.append(row("5 attention fwd+bwd", name, None, note="unavailable: " + (
                str(e).strip().splitlines() or [type(e).__name__])[0]))
    diffs = {}
    if "FLASH_ATTENTION" in outs and "CUDNN_ATTENTION" in outs:
        diffs = {n: (a_.float() - b_.float()).abs().max().item() for n, a_, b_ in
                 zip(("out", "dq", "dk", "dv"), outs["CUDNN_ATTENTION"], outs["FLASH_ATTENTION"])}
        print("cuDNN vs flash max abs diff: " + ", ".join(f"{n} {x:.3g}" for n, x in diffs.items()))
    return rows, diffs


def main():
    ints = lambda s: [int(x) for x in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in [("batch", 64), ("seq", 1024), ("hidden", 512), ("vocab", 51200), ("heads", 8),
                          ("head-dim", 64), ("chunk", 8192), ("reps", 20)]:
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--ce-chunks", type=ints, default=[4096, 8192, 16384], help="chunk sizes of piece 1")
    p.add_argument("--blocks", type=ints, default=[1024, 2048, 4096], help="BLOCKs of the kernel")
    p.add_argument("--warps", type=ints, default=[4, 8, 16], help="num_warps of the kernel")
    p.add_argument("--check-only", action="store_true", help="only check the kernel on a [--chunk, --vocab] "
                   "chunk (on the CPU under TRITON_INTERPRET=1)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not INTERPRET
    if not cuda and not (a.check_only and INTERPRET):
        sys.exit("bench_step_pieces.py: no CUDA device (the timings need one; on the CPU only "
                 "TRITON_INTERPRET=1 ... --check-only runs, e.g. --chunk 8 --vocab 300 --blocks 64)")
    dev = "cuda" if cuda else "cpu"
    # as the module does: compiled on CUDA, static shapes
    row_stats, grad = (torch.compile(f, dynamic=False) if cuda else f for f in (_row_stats, _grad))
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "args": vars(a),
              "check": check_fused(a.chunk, a.vocab, a.blocks, dev, row_stats, grad)}
    if not a.check_only:
        rows, result["kernel_sweep"] = bench_head(a, dev, row_stats, grad)
        attn_rows, result["cudnn_vs_flash_max_abs_diff"] = bench_attention(a, dev)
        result["rows"] = rows + attn_rows
        print(f"\n{result['device']}, torch {torch.__version__}, triton {triton.__version__}, bf16\n")
        print("| piece | variant | ms | throughput | note |\n|---|---|---|---|---|")
        for r in result["rows"]:
            thr = (f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s" if "gbps" in r
                   else "")
            ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
            print(f"| {r['piece']} | {r['variant']} | {ms} | {thr} | {r['note']} |")
        print("\n| kernel BLOCK | num_warps | ms | GB/s |\n|---|---|---|---|")
        for r in sorted(result["kernel_sweep"], key=lambda r: (r["block"], r["num_warps"])):
            print(f"| {r['block']} | {r['num_warps']} | {r['ms']:.3f} | {r['gbps']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
