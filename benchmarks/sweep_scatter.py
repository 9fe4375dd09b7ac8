"""Tile-config sweep of the scatter backend's kernels on the GPU: every kernel of the expert MLP, each config
timed alone at bench_moe's shapes, with the dense cuBLAS GEMM of equal FLOPs and torch._grouped_mm's weight
gradients (dw1 with the gather of x that route needs) as references. It tells which configs the autotune lists in
moe/kernels/scatter.py should hold.

    PYTHONUNBUFFERED=1 python benchmarks/sweep_scatter.py [--shapes S1,S2,S3,S4] [--json out.json]

A config is (BM, BN, BK, num_warps, num_stages); for the XᵀdY kernel BM is the reduction step over rows,
BK x BN the dW tile, and a sixth number GROUP_K (row tiles of dW[e] that sweep its column tiles together).
GEMM TFLOP/s = 2*T*k*d*f / time. Routing as in bench_moe.py (same seed and skew).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_moe import SHAPES, make_routing  # noqa: E402
from moe.kernels import scatter as K  # noqa: E402
from moe.kernels.sort import sort_by_expert  # noqa: E402

MM_SWEEP = [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5),
            (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 4),
            (128, 64, 64, 4, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (64, 128, 128, 4, 3)]
XTY_SWEEP = [(64, 256, 128, 8, 5, 8), (64, 256, 128, 8, 5, 4), (64, 256, 128, 8, 5, 16), (32, 256, 128, 8, 6, 8),
             (64, 128, 128, 8, 3, 8), (64, 128, 128, 8, 5, 8), (64, 128, 128, 8, 5, 16), (64, 128, 64, 4, 4, 8),
             (64, 256, 128, 8, 6, 8), (32, 256, 128, 8, 7, 8), (64, 128, 256, 8, 5, 8), (128, 128, 128, 8, 5, 8)]


ACT_SWEEP = [(16, 256, 4, 2), (32, 256, 8, 2), (8, 512, 4, 2), (32, 128, 4, 3), (16, 512, 8, 2), (64, 128, 8, 2),
             (4, 1024, 4, 2), (16, 128, 4, 2)]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def mm_config(c):
    bm, bn, bk, w, s = c
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)


def xty_config(c):
    bm, bn, bk, w, s, group = c
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_K": group}, num_warps=w, num_stages=s)


def act_config(c):
    bm, bn, w, s = c
    return triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)


def run_shape(name: str, only: str) -> dict:
    T, d, f, E, k = SHAPES[name]
    dev, bf = torch.device("cuda"), torch.bfloat16
    x, routing, skew = make_routing(T, d, E, k, dev, bf)
    srt = sort_by_expert(routing.expert_ids, E)
    order, counts, ends, n, tokens = srt.order, srt.counts, srt.offsets, T * k, srt.order // k
    w1 = torch.randn(E, d, f, device=dev, dtype=bf) * 0.02
    w2 = torch.randn(E, f, d, device=dev, dtype=bf) * 0.02
    dy = torch.randn(n, d, device=dev, dtype=bf)  # grouped, as the combine's backward hands it to the experts
    h, a = K.mlp_in_fwd(x, w1, None, order, counts, k)
    y, y2, da = x.new_empty(n, d), x.new_empty(n, d), torch.empty_like(h)
    dh = K.act_bwd(h, h)[0]  # an operand of dh's shape for the dx and dw1 kernels (values don't matter)
    mm = {  # kernel: launch(config)
        "L1 fwd x@w1 +act": lambda c: K._launch_mm(x, w1, None, None, h, a, order, counts, k, n, d, f,
                                                   True, False, K.EPI_ACT_FWD, False, c),
        "L2 fwd a@w2 (grouped)": lambda c: K._launch_mm(a, w2, None, y, None, None, order, counts, k, n, f, d,
                                                        False, False, K.EPI_PLAIN, False, c),
        "bwd da dy@w2^T": lambda c: K._launch_mm(dy, w2.transpose(1, 2), None, da, None, None, order, counts,
                                                 k, n, d, f, False, False, K.EPI_PLAIN, False, c),
        "bwd dx dh@w1^T": lambda c: K._launch_mm(dh, w1.transpose(1, 2), None, y2, None, None, order,
                                                 counts, k, n, f, d, False, True, K.EPI_PLAIN, False, c),
    }
    xty = {
        "bwd dw2 a^T dy": lambda c: K.group_xty(a, dy, tokens, counts, ends, False, c),
        "bwd dw1 x^T dh": lambda c: K.group_xty(x, dh, tokens, counts, ends, True, c),
    }
    gemm_gflop = 2 * n * d * f / 1e9
    res = {"shape": name, "T": T, "d": d, "f": f, "E": E, "k": k, "load_max_over_mean": skew, "kernels": {}}
    act = {"bwd act' (elementwise)": lambda c: K.act_bwd(da, h, c)}
    for kernels, sweep, make in ((mm, MM_SWEEP, mm_config), (xty, XTY_SWEEP, xty_config), (act, ACT_SWEEP, act_config)):
        for label, launch in kernels.items():
            if not any(part in label for part in only.split(",")):
                continue
            times = {}
            for c in sweep:
                run = functools.partial(launch, make(c))
                try:
                    run()
                    times[str(c)] = bench(run)
                except Exception as err:  # out of shared memory or registers: skip the config
                    times[str(c)] = f"{type(err).__name__}"
            ok = {c: t for c, t in times.items() if isinstance(t, float)}
            best = min(ok, key=ok.get)
            res["kernels"][label] = {"ms": times, "best": best, "best_ms": ok[best],
                                     "best_tflops": gemm_gflop / ok[best]}
            top = sorted(ok, key=ok.get)[:3]
            print(f"{name} {label:24s} " + "  ".join(f"{c} {ok[c]:.3f} ms ({gemm_gflop / ok[c]:.0f})" for c in top),
                  flush=True)
    # references: cuBLAS dense GEMM of equal FLOPs; torch._grouped_mm weight gradient on grouped operands
    a2, b2 = torch.randn(n, d, device=dev, dtype=bf), torch.randn(d, f, device=dev, dtype=bf)
    res["dense_gemm_ms"] = bench(lambda: a2 @ b2)
    offs = ends.to(torch.int32)
    try:  # dw1 with the gather of the scattered operand, as moe/experts/scatter.py's xty route does it
        res["grouped_mm_dw1_ms"] = bench(lambda: torch._grouped_mm(x[tokens].t(), dh, offs=offs))
        res["grouped_mm_dw2_ms"] = bench(lambda: torch._grouped_mm(a.t(), dy, offs=offs))
    except (RuntimeError, AttributeError) as err:
        print(f"{name} torch._grouped_mm weight gradient: {err}", flush=True)
    flat = routing.expert_ids.reshape(-1)
    res["sort_ms"] = {
        "sort_by_expert": bench(lambda: sort_by_expert(routing.expert_ids, E)),
        "torch.sort int64 stable": bench(lambda: torch.sort(flat, stable=True)),
        "torch.sort int32 stable": bench(lambda: torch.sort(flat.to(torch.int32), stable=True)),
        "torch.sort int16 stable": bench(lambda: torch.sort(flat.to(torch.int16), stable=True)),
        "counts scatter_add": bench(lambda: torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(
            0, flat, torch.ones_like(flat))),
    }
    print(f"{name} dense GEMM {res['dense_gemm_ms']:.3f} ms ({gemm_gflop / res['dense_gemm_ms']:.0f}); "
          f"grouped_mm dw1 (x gathered) "
          f"{res.get('grouped_mm_dw1_ms', float('nan')):.3f} dw2 {res.get('grouped_mm_dw2_ms', float('nan')):.3f}; "
          f"sort {json.dumps({kk: round(v, 4) for kk, v in res['sort_ms'].items()})}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="S1,S2,S3,S4")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default="", help="sweep only the kernels whose label contains one of these "
                    "comma-separated strings")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    results = [run_shape(name, args.only) for name in args.shapes.split(",")]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
