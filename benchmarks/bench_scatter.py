"""Scatter backend on the GPU: bf16 accuracy against an fp32 reference, speed against a dense cuBLAS pair.

    PYTHONUNBUFFERED=1 python benchmarks/bench_scatter.py [--shapes S1,S2] [--activation swiglu]
                                                         [--no-check] [--json out.json]

Useful FLOPs: 2*T*k*d*f per GEMM, two GEMMs forward (three for SwiGLU), x3 for forward+backward. The dense
ceiling is a cuBLAS pair [T*k, d] @ [d, f] @ [f, d] ([d, 2f] for SwiGLU) with the same FLOPs, in the same run.
Routing: softmax top-k of (z + s*mu) @ W_r with z, mu, W_r random; s starts at 0.1 and grows until
max/mean expert load >= 1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe.config import MoEConfig  # noqa: E402
from moe.experts.reference import ReferenceExperts  # noqa: E402
from moe.experts.scatter import ScatterExperts, _sum_slots, grouped_mm_pays, xty  # noqa: E402
from moe.kernels import scatter as K  # noqa: E402
from moe.permute import sort_by_expert  # noqa: E402
from moe.routing import Routing  # noqa: E402
from benchmarks.bench_moe import SHAPES  # noqa: E402  (name: (T, d, f, E, k))



def bench(fn, grad_to_none=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def make_routing(T, d, E, k, dev):
    z, mu, w_r = torch.randn(T, d, device=dev), torch.randn(d, device=dev), torch.randn(d, E, device=dev) / d ** 0.5
    s = 0.1
    while True:
        probs = torch.softmax((z + s * mu) @ w_r, -1)
        weights, ids = probs.topk(k, -1)
        counts = torch.bincount(ids.flatten(), minlength=E).float()
        skew = (counts.max() / counts.mean()).item()
        if skew >= 1.2 or s > 5:
            return Routing(ids, weights, probs, z.new_zeros(()), z.new_zeros(()), E), s, skew
        s *= 1.5


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(T, d, f, E, k, routing, dev, act) -> dict:
    """bf16 scatter vs fp32 ReferenceExperts on the same (bf16-representable) inputs and parameters."""
    cfg = MoEConfig(num_experts=E, top_k=k, backend="scatter")
    ref = ReferenceExperts(cfg, E, d, f, act, 0.02, 0.02).to(dev)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    ours = ScatterExperts(cfg, E, d, f, act, 0.02, 0.02).to(dev)
    ours.load_state_dict(ref.state_dict())
    ours.bfloat16()
    x = torch.randn(T, d, device=dev).bfloat16()
    dy = torch.randn(T, d, device=dev).bfloat16()
    out = {}
    for name, model, dt in (("ref", ref, torch.float32), ("ours", ours, torch.bfloat16)):
        xx = x.to(dt).requires_grad_()
        w = routing.weights.detach().clone().requires_grad_()
        r = Routing(routing.expert_ids, w, routing.probs, routing.aux_loss, routing.z_loss, E)
        y, _ = model(xx, r)
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

    cfg = MoEConfig(num_experts=E, top_k=k, backend="scatter")
    ours = ScatterExperts(cfg, E, d, f, act, 0.02, 0.02).to(dev).bfloat16()
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    gw = routing.weights.detach().clone().requires_grad_()
    r = Routing(routing.expert_ids, gw, routing.probs, routing.aux_loss, routing.z_loss, E)
    params = [x, gw] + list(ours.parameters())

    def fwd():
        return ours(x, r)[0]

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

    # dense cuBLAS pair with the same FLOPs
    a = torch.randn(T * k, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(d, 2 * f if glu else f, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    w2 = (torch.randn(f, d, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    dyd = torch.randn(T * k, d, device=dev, dtype=torch.bfloat16)
    td_fwd = bench(lambda: (a @ w1)[:, :f] @ w2)
    td_fb = bench(lambda: ((a @ w1)[:, :f] @ w2).backward(dyd), grad_to_none=[a, w1, w2])
    del a, w1, w2, dyd
    res.update(ms_fwd=t_fwd, ms_fwd_bwd=t_fb, tflops_fwd=flop_fwd / t_fwd / 1e9,
               tflops_fwd_bwd=3 * flop_fwd / t_fb / 1e9, dense_tflops_fwd=flop_fwd / td_fwd / 1e9,
               dense_tflops_fwd_bwd=3 * flop_fwd / td_fb / 1e9)

    # per-kernel breakdown
    with torch.no_grad():
        w1, w2 = ours.w1.detach(), ours.w2.detach()
        w3 = ours.w3.detach() if glu else None
        w3t = w3.transpose(1, 2) if glu else None
        srt = sort_by_expert(routing.expert_ids, E)
        order0, tokens, gmm = srt.order.clone(), srt.order // k, grouped_mm_pays(dy, d, f)
        res["weight_grads_via"] = "torch._grouped_mm" if gmm else "group_xty"
        g = routing.weights.reshape(-1).float().contiguous()
        h, act = K.mlp_in_fwd(x, w1, w3, srt.order, srt.counts, k)
        y = K.scatter_mm(act, w2, srt.order, srt.counts, k, False, True, gates=g)
        dys = dy[tokens] if gmm else dy  # as the backward does: dout gathered once for dA and dW2 (grouped_mm)
        da = K.scatter_mm(dys, w2.transpose(1, 2), srt.order, srt.counts, k, not gmm, False)
        dh, _, _ = K.act_bwd(da, h, g, srt.order)
        steps = {  # GEMM-kernel entries count one GEMM of FLOPs (two for the SwiGLU L1 fwd, dw1+dw3 and dx)
            "sort": lambda: sort_by_expert(routing.expert_ids, E),
            "L1 fwd x@w1 +act (h,a)": lambda: K.mlp_in_fwd(x, w1, w3, srt.order, srt.counts, k),
            "L2 fwd a@w2 *gate": lambda: K.scatter_mm(act, w2, srt.order, srt.counts, k, False, True, gates=g),
            "sum over k (fwd)": (lambda: _sum_slots(y, T, k)) if k > 1 else None,
            "gather dout (grouped_mm route)": (lambda: dy[tokens]) if gmm else None,
            "bwd da = dout@w2^T": lambda: K.scatter_mm(dys, w2.transpose(1, 2), srt.order, srt.counts, k, not gmm,
                                                       False),
            "bwd act' dgates (elementwise)": lambda: K.act_bwd(da, h, g, srt.order),
            "bwd dw2 ((g a)^T dout)": lambda: xty(act, dys, tokens, srt.counts, srt.offsets, False, not gmm, gmm),
            "bwd dw1 (x^T dh)": lambda: xty(x, dh[:, :f], tokens, srt.counts, srt.offsets, True, False, gmm),
            "bwd dx (dh@w1^T)": lambda: K.scatter_mm(dh, w1.transpose(1, 2), srt.order, srt.counts, k, False, True,
                                                     w_2=w3t),
            "sum over k (bwd)": (lambda: _sum_slots(y, T, k)) if k > 1 else None,
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
            tf = f"{r['gemm_gflop'] / ms:.0f}" if not key.startswith(("sort", "sum")) else "-"
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
