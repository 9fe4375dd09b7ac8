"""Check and time the blocksparse expert backend on a GPU, in one call.

For each shape: bf16 forward and forward+backward of BlockSparseExperts against fp32 ReferenceExperts
(relative errors of y, dx, dw1, dw2, dgates), TFLOP/s, a dense cuBLAS matmul pair of equal FLOPs as the
ceiling, and a per-kernel breakdown. Then the paper's kernel claim: SDD and DSD on balanced groups
against torch.bmm of equal FLOPs.

A step is bench_moe.py's: the local dispatcher, the experts, the combine (which applies the gates: the gate
gradient `dgates` comes through it). Useful FLOPs: 2·T·k·d·f per GEMM, two GEMMs forward, three times that
forward+backward. Routing: top-k of softmax((z + 0.1·mu) · W_r) with z ~ N(0, I) per token and one shared mu,
which skews the expert loads (max/mean is printed).

    PYTHONUNBUFFERED=1 python benchmarks/bench_blocksparse.py [--shapes S1,S2,S3,S4] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_moe import expert_step, routing_of  # noqa: E402
from moe.config import KernelConfig  # noqa: E402
from moe.dispatch import LocalDispatcher  # noqa: E402
from moe.experts.blocksparse import BlockSparseExperts  # noqa: E402
from moe.experts.reference import ReferenceExperts  # noqa: E402
from moe.kernels import blocksparse as bs  # noqa: E402
from moe.kernels import rows as row_ops  # noqa: E402
from moe.kernels.sort import sort_by_expert  # noqa: E402
from moe.kernels.topology import expert_topology, max_block_rows, padded_destinations, padded_sources  # noqa: E402
from moe.routing import Routing  # noqa: E402

SHAPES = {  # T, d, f, E, k, target fwd+bwd TFLOP/s
    "S1": (32768, 512, 2048, 64, 1, 145),
    "S2": (16384, 1024, 4096, 64, 1, 211),
    "S3": (8192, 4096, 14336, 8, 2, 500),
    "S4": (16384, 2048, 1024, 64, 8, 313),
}
B = 128


def bench(fn, rep_ms=400) -> float:
    """Median milliseconds (CUDA events, L2 flushed between reps)."""
    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def skewed_routing(T: int, d: int, E: int, k: int) -> Routing:
    z, mu = torch.randn(T, d, device="cuda"), torch.randn(d, device="cuda")
    w_r = torch.randn(d, E, device="cuda") / d ** 0.5
    return routing_of((z + 0.1 * mu) @ w_r, k)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def dense_pair_ms(N: int, d: int, f: int) -> tuple[float, float]:
    """(fwd, fwd+bwd) ms of the cuBLAS matmul pair [N, d] @ [d, f] @ [f, d]."""
    xd = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(d, f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(f, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dd = torch.randn(N, d, device="cuda", dtype=torch.bfloat16)
    return bench(lambda: (xd @ w1) @ w2), do_bench(lambda: ((xd @ w1) @ w2).backward(dd), warmup=50, rep=600,
                                                   grad_to_none=[xd, w1, w2], return_mode="median")


def breakdown(model: BlockSparseExperts, routing: Routing, x: torch.Tensor, dout: torch.Tensor) -> dict:
    """Each piece of the step alone on this routing: metadata, permutation, the combine, the six products."""
    (T, k), E, f, d = routing.expert_ids.shape, routing.num_experts, model.ffn_hidden_size, x.shape[1]
    R = max_block_rows(T * k, E, B)

    def metadata():  # the dispatcher's sort, then what BlockSparseExperts.compute derives from it
        s = sort_by_expert(routing.expert_ids, E)
        dest = padded_destinations(s, B)  # padded row of each sorted position
        slot_dest = torch.empty_like(dest).scatter_(0, s.order, dest)  # of each slot
        return (expert_topology(s.counts, f, B, R), dest.view(-1, 1), slot_dest.view(T, k),
                padded_sources(dest, R * B), padded_sources(slot_dest, R * B))
    topo, dest, slot_dest, src, slot_src = metadata()
    t_pad = int(topo.num_block_rows) * B
    xp = torch.zeros(R * B, d, device="cuda", dtype=torch.bfloat16)
    xp[:t_pad].normal_()
    dy = torch.zeros_like(xp)
    dy[:t_pad].normal_()
    w1, w2 = model.w1.detach(), model.w2.detach()
    h, a = bs.sdd(xp, w1, topo, act=bs.ACT_GELU)
    # the combine: experts' output rows (grouped) -> [T, d] with the gates, and back (dy grouped, dgates)
    dispatcher = LocalDispatcher()
    gates = routing.weights.detach().clone().requires_grad_()
    _, handle = dispatcher.dispatch(x, dataclasses.replace(routing, weights=gates))
    y = torch.randn(T * k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def combine():
        return torch.autograd.grad(dispatcher.combine(y, handle), (y, gates), dout)
    dy_grouped = combine()[0]
    products = {
        "SDD+GELU  H=X·W1": lambda: bs.sdd(xp, w1, topo, act=bs.ACT_GELU),
        "DSD       Y=A·W2": lambda: bs.dsd(a, w2, topo),
        "SDDt·GELU' dH": lambda: bs.sdd(dy, w2, topo, trans_w=True, act=bs.ACT_GELU_GRAD, aux=h),
        "DSTD      dW2=Aᵀ·dY": lambda: bs.dstd(a, dy, topo),
        "DSDt      dX=dH·W1ᵀ": lambda: bs.dsd(h, w1, topo, trans_w=True),
        "DDtS      dW1=Xᵀ·dH": lambda: bs.ddts(xp, h, topo),
    }
    others = {
        "metadata (sort, topology, destinations)": metadata,
        "permute (pad x, un-pad y, pad dy, dx)": lambda: (
            row_ops.pad_rows(x, slot_src, k), row_ops.combine_rows(xp, dest), row_ops.pad_rows(dy_grouped, src, 1),
            row_ops.combine_rows(dy, slot_dest)),
        "combine (gates; bwd: dy grouped, dgates)": combine,
    }
    ms = {n: bench(fn, 200) for n, fn in {**others, **products}.items()}
    gemm = 2 * T * k * d * f  # useful FLOPs of one product
    return {"T_pad_over_Tk": t_pad / (T * k), "breakdown_ms": ms,
            "breakdown_tflops": {n: gemm / ms[n] * 1e-9 for n in products}}


def balanced(model: BlockSparseExperts, T: int, k: int) -> dict:
    """The paper's claim: balanced groups of equal FLOPs, SDD and DSD against torch.bmm."""
    E, d, f = model.num_experts, model.hidden_size, model.ffn_hidden_size
    w1, w2 = model.w1.detach(), model.w2.detach()
    n = max(B, round(T * k / E / B) * B)
    tb = expert_topology(torch.full((E,), n, device="cuda"), f, B, E * n // B)
    xb = torch.randn(E * n, d, device="cuda", dtype=torch.bfloat16)
    ab = torch.randn(E * n // B * (f // B), B, B, device="cuda", dtype=torch.bfloat16)
    ms_sdd = bench(lambda: bs.sdd(xb, w1, tb))
    ms_dsd = bench(lambda: bs.dsd(ab, w2, tb))
    ms_bmm1 = bench(lambda: torch.bmm(xb.view(E, n, d), w1))
    ab_dense = torch.randn(E, n, f, device="cuda", dtype=torch.bfloat16)
    ms_bmm2 = bench(lambda: torch.bmm(ab_dense, w2))
    return {"tokens_per_expert": n, "sdd_over_bmm": ms_bmm1 / ms_sdd, "dsd_over_bmm": ms_bmm2 / ms_dsd,
            "bmm_tflops": 2 * E * n * d * f / ms_bmm1 * 1e-9, "sdd_tflops": 2 * E * n * d * f / ms_sdd * 1e-9,
            "dsd_tflops": 2 * E * n * d * f / ms_dsd * 1e-9}


def run_shape(name: str, T, d, f, E, k, target) -> dict:
    torch.manual_seed(0)
    model = BlockSparseExperts(E, d, f, "gelu", 0.02, 0.02 / 2, kernels=KernelConfig(B)).cuda().to(torch.bfloat16)
    step = expert_step(model)
    routing = skewed_routing(T, d, E, k)
    counts = routing.counts.float()
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    flops_fwd = 2 * 2 * T * k * d * f
    out = {"shape": name, "T": T, "d": d, "f": f, "E": E, "k": k, "target": target,
           "load_max_over_mean": (counts.max() / counts.mean()).item()}

    # --- accuracy: bf16 blocksparse against fp32 reference on the same (bf16-valued) inputs
    def fwd_bwd(m, xx, dtype):
        xx = xx.to(dtype).requires_grad_()
        gates = routing.weights.clone().requires_grad_()
        y, _ = expert_step(m)(xx, dataclasses.replace(routing, weights=gates))
        y.backward(dout.to(dtype))
        return [y, xx.grad, gates.grad, m.w1.grad, m.w2.grad]
    ref = ReferenceExperts(E, d, f, "gelu", 0.02, 0.01).cuda()
    ref.load_state_dict({n: p.float() for n, p in model.state_dict().items()})
    want = fwd_bwd(ref, x, torch.float32)
    got = fwd_bwd(model, x, torch.bfloat16)
    out["rel_err"] = {n: rel(g, w) for n, g, w in zip(["y", "dx", "dgates", "dw1", "dw2"], got, want)}
    del ref, want, got
    model.zero_grad(set_to_none=True)

    # --- end to end
    xg = x.clone().requires_grad_()
    params = [xg] + list(model.parameters())

    def fwd():
        return step(xg, routing)[0]

    def fwd_bwd_once():
        fwd().backward(dout)
    out["fwd_ms"] = bench(fwd)
    out["fwd_bwd_ms"] = do_bench(fwd_bwd_once, warmup=50, rep=600, grad_to_none=params, return_mode="median")
    out["fwd_tflops"] = flops_fwd / out["fwd_ms"] * 1e-9
    out["fwd_bwd_tflops"] = 3 * flops_fwd / out["fwd_bwd_ms"] * 1e-9

    # --- dense ceiling: a cuBLAS matmul pair of equal FLOPs, forward and forward+backward
    out["dense_fwd_ms"], out["dense_fwd_bwd_ms"] = dense_pair_ms(T * k, d, f)
    out["dense_fwd_bwd_tflops"] = 3 * flops_fwd / out["dense_fwd_bwd_ms"] * 1e-9

    out.update(breakdown(model, routing, x, dout))
    out["rest_ms"] = out["fwd_bwd_ms"] - sum(out["breakdown_ms"].values())
    out["balanced"] = balanced(model, T, k)
    out["configs"] = {k.fn.__name__: str(getattr(k, "best_config", None))
                      for k in (bs._sdd_kernel, bs._dsd_kernel, bs._dstd_kernel)}
    return out


def report(results: list[dict]) -> str:
    lines = ["| shape | T,d,f,E,k | max/mean load | T_pad/Tk | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
             "| target | dense pair fwd+bwd TFLOP/s | % of dense | bf16 rel err (y, dx, dg, dw1, dw2) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | failed: {r['error']} |")
            continue
        e = r["rel_err"]
        lines.append(
            f"| {r['shape']} | {r['T']},{r['d']},{r['f']},{r['E']},{r['k']} | {r['load_max_over_mean']:.2f} "
            f"| {r['T_pad_over_Tk']:.3f} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.3f} "
            f"| {r['fwd_bwd_tflops']:.0f} | {r['target']} | {r['dense_fwd_bwd_tflops']:.0f} "
            f"| {100 * r['fwd_bwd_tflops'] / r['dense_fwd_bwd_tflops']:.0f}% "
            f"| {e['y']:.1e}, {e['dx']:.1e}, {e['dgates']:.1e}, {e['dw1']:.1e}, {e['dw2']:.1e} |")
    pieces = next((list(r["breakdown_ms"]) for r in results if "error" not in r), [])
    lines += ["", "| shape | " + " | ".join(pieces) + " | rest (autograd, allocation, launches) |",
              "|---|" + "---|" * (len(pieces) + 1)]
    for r in results:
        if "error" in r:
            continue
        cells = [f"{ms:.3f} ms" + (f" ({r['breakdown_tflops'][n]:.0f} TF)" if n in r["breakdown_tflops"] else "")
                 for n, ms in r["breakdown_ms"].items()]
        lines.append(f"| {r['shape']} | " + " | ".join(cells) + f" | {r['rest_ms']:.3f} ms |")
    lines += ["", "| shape | tokens/expert | bmm TFLOP/s | SDD TFLOP/s | SDD/bmm | DSD TFLOP/s | DSD/bmm |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            continue
        b = r["balanced"]
        lines.append(f"| {r['shape']} | {b['tokens_per_expert']} | {b['bmm_tflops']:.0f} | {b['sdd_tflops']:.0f} "
                     f"| {b['sdd_over_bmm']:.2f} | {b['dsd_tflops']:.0f} | {b['dsd_over_bmm']:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="S1,S2,S3,S4")
    p.add_argument("--json", default=None, help="write the raw results here")
    args = p.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    results = []
    for name in args.shapes.split(","):
        t0 = time.time()
        try:
            r = run_shape(name, *SHAPES[name])
        except Exception as exc:  # one shape failing must not cost the others' numbers
            traceback.print_exc()
            r = {"shape": name, "error": f"{type(exc).__name__}: {str(exc)[-500:]}"}
        torch.cuda.empty_cache()
        results.append(r)
        print(f"{name} done in {time.time() - t0:.0f} s: {json.dumps(r)}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
