"""Host (CPU) time to enqueue one forward+backward of an expert backend, against the GPU wall time per step.

    PYTHONUNBUFFERED=1 python benchmarks/host_overhead.py [--backends scatter,grouped] [--shapes S1,S2] [--profile]

When the host time per step exceeds the GPU time, the GPU waits on Python and kernel launches, and a timing
taken with CUDA events (bench_moe.py) measures the host. Routing and shapes as in bench_moe.py; --profile
prints the cProfile top entries of 20 steps.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_moe import SHAPES, make_routing  # noqa: E402
from moe.config import MoEConfig  # noqa: E402
from moe.experts import backend_class  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="scatter")
    ap.add_argument("--shapes", default="S1,S2")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    for name in args.shapes.split(","):
        T, d, f, E, k = SHAPES[name]
        x, routing, _ = make_routing(T, d, E, k, dev, torch.bfloat16)
        x.requires_grad_(True)
        dy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
        for backend in args.backends.split(","):
            cfg = MoEConfig(num_experts=E, top_k=k, backend=backend)
            module = backend_class(backend)(cfg, E, d, f, "gelu", 0.02, 0.02).to(dev, torch.bfloat16)

            def step():
                for p in list(module.parameters()) + [x, routing.weights]:
                    p.grad = None
                module(x, routing)[0].backward(dy)

            for _ in range(5):  # compile and autotune outside the measurement
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            host = (time.perf_counter() - t0) / args.steps * 1e3
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / args.steps * 1e3
            print(f"{name} {backend:12s} host enqueue {host:.3f} ms/step | wall {wall:.3f} ms/step", flush=True)
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(20):
                    step()
                prof.disable()
                torch.cuda.synchronize()
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
