"""The Sinkhorn pick of moe/router.py alone on one GPU: moe/kernels/sinkhorn.py's launches swept over their shape
(bands x tile x warps) against the compiled torch loop, each checked against the loop and timed eager and as a
CUDA graph replay (a graph removes the host's launch time, as train.cuda_graphs does).

    python benchmarks/bench_sinkhorn.py [--tokens 65536,32768] [--experts 64] [--iters 30] [--json out.json]

--tokens: router rows per call (MoE-XS at micro-batch 64 x 1024 is 65536; MoE-Small at micro-batch 32, 32768).
Times: torch.cuda.Event over --reps calls after 3 warm-up calls, the mean in ms; GB/s from the [T, E] fp32 input
read once per round and the result written once.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_step_pieces import time_ms  # noqa: E402
from benchmarks.host_overhead import captured  # noqa: E402
from moe.kernels import sinkhorn as kernel  # noqa: E402
from moe.router import sinkhorn  # noqa: E402


def bench_tokens(T: int, a) -> list[dict]:
    torch.manual_seed(0)
    logits = torch.randn(T, a.experts, device="cuda") * 0.5
    # the scale moe/router.py's sinkhorn takes: the sharpness over the tokens' spread around each expert's mean
    scale = (a.sharpness / (logits - logits.mean(0, keepdim=True)).std()).reshape(1)
    ref = sinkhorn(logits, a.iters, a.sharpness, kernel=False)
    loop = torch.compile(lambda x: sinkhorn(x, a.iters, a.sharpness, kernel=False), dynamic=False)
    nbytes = 2 * T * a.experts * 4 * a.iters
    variants = [("compiled torch loop", None, lambda: loop(logits))]
    variants += [(f"kernel {s}", s, lambda s=s: kernel.rounds(logits, scale, a.iters, s))
                 for s in itertools.product(a.bands, a.tiles, a.warps)]
    rows = []
    for name, shape, fn in variants:
        err = (fn() - ref).abs().max().item()
        row = {"tokens": T, "experts": a.experts, "iters": a.iters, "variant": name, "shape": shape,
               "default": shape == kernel.DEFAULT, "max_abs_err": err,
               "eager_ms": time_ms(fn, a.reps), "graph_ms": time_ms(captured(fn), a.reps)}
        row["graph_gbps"] = nbytes / row["graph_ms"] / 1e6
        rows.append(row)
        print(f"{T} {name}: eager {row['eager_ms']:.3f} ms, graph {row['graph_ms']:.3f} ms "
              f"({row['graph_gbps']:.0f} GB/s), err {err:.2e}", flush=True)
    return rows


def main():
    ints = lambda s: [int(x) for x in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=ints, default=[65536, 32768])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--sharpness", type=float, default=12.0)
    p.add_argument("--bands", type=ints, default=[128, 256, 512])
    p.add_argument("--tiles", type=ints, default=[2048, 4096, 8192])
    p.add_argument("--warps", type=ints, default=[4, 8, 16])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sinkhorn.py: no CUDA device")
    rows = [r for T in a.tokens for r in bench_tokens(T, a)]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}\n")
    print("| tokens | variant (bands, tile, warps) | eager ms | graph ms | graph GB/s | max abs err |")
    print("|---|---|---|---|---|---|")
    for T in a.tokens:
        mine = [r for r in rows if r["tokens"] == T]
        best = sorted((r for r in mine if r["shape"]), key=lambda r: r["graph_ms"])[:5]
        for r in [r for r in mine if not r["shape"] or r["default"]] + best:
            tag = " (default)" if r["default"] else ""
            print(f"| {T} | {r['variant']}{tag} | {r['eager_ms']:.3f} | {r['graph_ms']:.3f} | "
                  f"{r['graph_gbps']:.0f} | {r['max_abs_err']:.1e} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
