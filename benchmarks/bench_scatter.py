"""Scatter backend on the GPU: bf16 accuracy against an fp32 reference, speed against a dense cuBLAS pair.

    PYTHONUNBUFFERED=1 python benchmarks/bench_scatter.py [--shapes S1,S2] [--activation swiglu]
                                                         [--no-check] [--json out.json]

Useful FLOPs: 2*T*k*d*f per GEMM, two GEMMs forward (three for SwiGLU), x3 for forward+backward. The dense
ceiling is a cuBLAS pair [T*k, d] @ [d, f] @ [f, d] ([d, 2f] for SwiGLU) with the same FLOPs, in the same run.
Routing: softmax top-k of (z + s*mu) @ W_r with z, mu, W_r random; s starts at 0.1 and grows until
max/mean expert load >= 1.2. A step is bench_moe.py's: the local dispatcher, the experts, the combine (which
applies the gates: the gate gradient `dgates` comes through it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_moe import SHAPES, expert_step, routing_of  # noqa: E402  (SHAPES: name -> (T, d, f, E, k))
from moe.dispatch import LocalDispatcher  # noqa: E402
from moe.experts.reference import ReferenceExperts  # noqa: E402
from moe.experts.scatter import ScatterExperts, _sum_slots, grouped_mm_pays, xty  # noqa: E402
from moe.kernels import scatter as K  # noqa: E402

NOT_GEMM = ("dispatch", "combine", "gather", "sum")  # breakdown entries that get no TFLOP/s


def bench(fn, grad_to_none=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def make_routing(T, d, E, k, dev):
    z, mu, w_r = torch.randn(T, d, device=dev), torch.randn(d, device=dev), torch.randn(d, E, device=dev) / d ** 0.5
    s = 0.1
    while True:
        routing = routing_of((z + s * mu) @ w_r, k)
        counts = routing.counts.float()
        skew = (counts.max() / counts.mean()).item()
        if skew >= 1.2 or s > 5:
            return routing, s, skew
        s *= 1.5


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(T, d, f, E, k, routing, dev, act) -> dict:
    """bf16 scatter vs fp32 ReferenceExperts on the same (bf16-representable) inputs and parameters."""
    ref = ReferenceExperts(E, d, f, act, 0.02, 0.02).to(dev)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    ours = ScatterExperts(E, d, f, act, 0.02, 0.02).to(dev)
    ours.load_state_dict(ref.state_dict())
    ours.bfloat16()
    x = torch.randn(T, d, device=dev).bfloat16()
    dy = torch.randn(T, d, device=dev).bfloat16()
    out = {}
    for name, model, dt in (("ref", ref, torch.float32), ("ours", ours, torch.bfloat16)):
        xx = x.to(dt).requires_grad_()
        w = routing.weights.detach().clone().requires_grad_()
        y, _ = expert_step(model)(xx, dataclasses.replace(routing, weights=w))
        y.backward(dy.to(dt))
        out[name] = {"y": y.detach(), "dx": xx.grad, "dgates": w.grad, "dw1": model.w1.grad, "dw2": model.w2.grad}
        if act == "swiglu":
            out[name]["dw3"] = model.w3.grad
        del y, xx
    res = {key: rel(out["ours"][key], out["ref"][key]) for key in out["ref"]}
    unwritten = any(not torch.isfinite(v).all() for v in out["ours"].values())
    res["ok"] = not unwritten and max(res.values()) < 1e-2
    del ref, ours, out
    torch.cuda.empty_cache()
    return res


def dense_ms(N, d, f, glu, dev) -> tuple[float, float]:
    """(fwd, fwd+bwd) ms of the dense cuBLAS pair [N, d] @ [d, f or 2f] -> [:, :f] @ [f, d]."""
    a = torch.randn(N, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(d, 2 * f if glu else f, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    w2 = (torch.randn(f, d, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    dy = torch.randn(N, d, device=dev, dtype=torch.bfloat16)
    return (bench(lambda: (a @ w1)[:, :f] @ w2),
            bench(lambda: ((a @ w1)[:, :f] @ w2).backward(dy), grad_to_none=[a, w1, w2]))


def run_shape(name, dev, do_check, act) -> dict:
    T, d, f, E, k = SHAPES[name]
    torch.manual_seed(0)
    routing, s, skew = make_routing(T, d, E, k, dev)
    res = {"shape": name, "T": T, "d": d, "f": f, "E": E, "k": k, "activation": act, "router_scale": s,
           "load_max_over_mean": skew}
    glu = act == "swiglu"
    flop_fwd = (3 if glu else 2) * (2 * T * k * d * f)
    if do_check:
        res["err"] = check(T, d, f, E, k, routing, dev, act)
        print(name, "bf16 rel err vs fp32:", res["err"], flush=True)

    ours = ScatterExperts(E, d, f, act, 0.02, 0.02).to(dev).bfloat16()
    step = expert_step(ours)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    gw = routing.weights.detach().clone().requires_grad_()
    r = dataclasses.replace(routing, weights=gw)
    params = [x, gw] + list(ours.parameters())

    def fwd():
        return step(x, r)[0]

    def fwd_bwd():
        fwd().backward(dy)

    fwd_bwd()  # autotune every kernel outside the timed region
    torch.cuda.synchronize()
    t_fwd, t_fb = bench(fwd), bench(fwd_bwd, grad_to_none=params)
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    res["peak_extra_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    for p in params:
        p.grad = None

    td_fwd, td_fb = dense_ms(T * k, d, f, glu, dev)
    res.update(ms_fwd=t_fwd, ms_fwd_bwd=t_fb, tflops_fwd=flop_fwd / t_fwd / 1e9,
               tflops_fwd_bwd=3 * flop_fwd / t_fb / 1e9, dense_tflops_fwd=flop_fwd / td_fwd / 1e9,
               dense_tflops_fwd_bwd=3 * flop_fwd / td_fb / 1e9)

    # per-kernel breakdown: the step's pieces in the order the step runs them
    with torch.no_grad():
        w1, w2 = ours.w1.detach(), ours.w2.detach()
        w3 = ours.w3.detach() if glu else None
        w3t = w3.transpose(1, 2) if glu else None
        dispatcher = LocalDispatcher()
        rows, handle = dispatcher.dispatch(x, r)
        srt, gmm = rows.sort, grouped_mm_pays(dy, d, f)
        order0, tokens = srt.order.clone(), rows.tokens()
        ends = srt.offsets.to(torch.int32) if gmm else srt.offsets  # as the backward converts them
        res["weight_grads_via"] = "torch._grouped_mm" if gmm else "group_xty"
        h, act = K.mlp_in_fwd(x, w1, w3, srt.order, srt.counts, k)
        y = K.scatter_mm(act, w2, srt.order, srt.counts, k, False, False)
        with torch.enable_grad():  # the combine's backward: dy grouped for the experts, and the gate gradient
            y_req = y.detach().requires_grad_()
            combined = dispatcher.combine(y_req, handle)
        dyg = torch.autograd.grad(combined, y_req, dy, retain_graph=True)[0]
        da = K.scatter_mm(dyg, w2.transpose(1, 2), srt.order, srt.counts, k, False, False)
        dh, _ = K.act_bwd(da, h)
        xs = x[tokens] if gmm else x  # as the backward does: x gathered once for dw1 and dw3 (grouped_mm)
        dx_slots = K.scatter_mm(dh, w1.transpose(1, 2), srt.order, srt.counts, k, False, True, w_2=w3t)

        def dw1_dw3():
            dw = [xty(xs, dh[:, :f], tokens, srt.counts, ends, not gmm, gmm)]
            return dw + [xty(xs, dh[:, f:], tokens, srt.counts, ends, not gmm, gmm)] if glu else dw

        steps = {  # GEMM-kernel entries count one GEMM of FLOPs (two for the SwiGLU L1 fwd, dw1+dw3 and dx)
            "dispatch (sort)": lambda: dispatcher.dispatch(x, r),
            "L1 fwd x@w1 +act (h,a)": lambda: K.mlp_in_fwd(x, w1, w3, srt.order, srt.counts, k),
            "L2 fwd a@w2 (grouped->grouped)": lambda: K.scatter_mm(act, w2, srt.order, srt.counts, k, False, False),
            "combine fwd (gates, sum over k)": lambda: dispatcher.combine(y, handle),
            "combine bwd (dy grouped, dgates)": lambda: torch.autograd.grad(combined, (y_req, gw), dy,
                                                                            retain_graph=True),
            "bwd da = dy@w2^T": lambda: K.scatter_mm(dyg, w2.transpose(1, 2), srt.order, srt.counts, k, False,
                                                     False),
            "bwd act' (elementwise)": lambda: K.act_bwd(da, h),
            "bwd dw2 (a^T dy)": lambda: xty(act, dyg, tokens, srt.counts, ends, False, gmm),
            "gather x (grouped_mm route)": (lambda: x[tokens]) if gmm else None,
            "bwd dw1 (x^T dh)": dw1_dw3,
            "bwd dx (dh@w1^T)": lambda: K.scatter_mm(dh, w1.transpose(1, 2), srt.order, srt.counts, k, False, True,
                                                     w_2=w3t),
            "sum over k (bwd)": (lambda: _sum_slots(dx_slots, T, k)) if k > 1 else None,
        }
        res["breakdown_ms"] = {}
        for key, fn in steps.items():
            if fn is not None:
                fn()
                res["breakdown_ms"][key] = bench(fn)
        assert torch.equal(srt.order, order0), "a kernel wrote into the sort indices"
        res["configs"] = {f"{fn.fn.__name__}{key[:8]}": str(cfg) for fn in (K._scatter_mm_kernel, K._group_xty_kernel)
                          for key, cfg in fn.cache.items() if key[0] == K._rows_key(T * k)}
        a2 = torch.randn(T * k, d, device=dev, dtype=torch.bfloat16)
        b2 = torch.randn(d, f, device=dev, dtype=torch.bfloat16)
        res["breakdown_ms"]["dense one GEMM (cuBLAS)"] = bench(lambda: a2 @ b2)
    res["gemm_gflop"] = 2 * T * k * d * f / 1e9
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="S1,S2,S3,S4")
    ap.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    results = []
    for name in args.shapes.split(","):
        t0 = time.time()
        try:
            res = run_shape(name, dev, not args.no_check, args.activation)
        except Exception:  # keep going: one shape's failure must not lose the others' numbers
            traceback.print_exc()
            res = {"shape": name, "error": traceback.format_exc(limit=3)}
        res["wall_s"] = time.time() - t0
        results.append(res)
        print(json.dumps({key: v for key, v in res.items() if key != "configs"}), flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print("\nper-kernel ms (GEMM TFLOP/s = 2*T*k*d*f / time)")
    for r in results:
        for key, ms in r.get("breakdown_ms", {}).items():
            tf = f"{r['gemm_gflop'] / ms:.0f}" if not key.startswith(NOT_GEMM) else "-"
            print(f"  {r['shape']} {key:32s} {ms:8.3f} ms  {tf:>5s} TFLOP/s")
    print("\n| shape | T,d,f,E,k | load max/mean | fwd TF/s | fwd+bwd TF/s | dense fwd / fwd+bwd | % dense (f+b) "
          "| peak extra GiB | max bf16 rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['shape']} | error | | | | | | | |")
            continue
        err = max(v for kk, v in r["err"].items() if kk != "ok") if "err" in r else float("nan")
        print(f"| {r['shape']} | {r['T']},{r['d']},{r['f']},{r['E']},{r['k']} | {r['load_max_over_mean']:.2f} "
              f"| {r['tflops_fwd']:.0f} | {r['tflops_fwd_bwd']:.0f} | {r['dense_tflops_fwd']:.0f} / "
              f"{r['dense_tflops_fwd_bwd']:.0f} | {100 * r['tflops_fwd_bwd'] / r['dense_tflops_fwd_bwd']:.0f}% "
              f"| {r['peak_extra_GiB']:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
