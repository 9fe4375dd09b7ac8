"""Host (CPU) time against GPU time of one forward+backward of an expert backend, and where each goes.

    PYTHONUNBUFFERED=1 python benchmarks/host_overhead.py [--backends scatter,grouped] [--shapes S1,S2]
        [--graph] [--kernels] [--profile]

Per backend and shape it prints:
- host: CPU time to enqueue one step (forward and backward apart), measured while the GPU is kept busy, so that
  no call waits on it;
- wall: time per step of back-to-back eager steps (the larger of host and GPU time, as bench_moe.py sees it);
- with --graph, gpu: time per step replaying the step captured in a CUDA graph (no host work at all: the GPU
  time alone), with the dense pair of matmuls of equal FLOPs (bench_moe.py's ceiling) captured the same way;
- with --kernels, every GPU kernel of one step in launch order with its duration (torch.profiler);
- with --timeline N, N back-to-back eager steps under torch.profiler: per step its period (start of its first
  kernel to the next step's), the kernels' busy time and the idle time between them, and each kernel's spread
  (min / median / max over the steps): it tells whether a slow step waited on the host or ran slower kernels;
- with --drift N, N back-to-back steps each of the dense pair, the backend and its CUDA-graph replay, after 1 s
  idle, as medians of every 10 steps: whether all three slow down at the GPU's power cap (the power-cap study in
  benchmarks/results/README.md);
- with --profile, the cProfile top entries of 20 steps.
Routing, shapes and backend specs (`padded:cf=0`) as in bench_moe.py. A step is bench_moe.py's (capacity step
for padded, dispatch, experts, combine): grads set to None, forward, backward.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_moe import SHAPES, Timer, build_step, dense_pair, make_routing, moe_config, parse_backend  # noqa: E402

BUSY_CYCLES = 2_000_000_000  # ~1 s of torch.cuda._sleep: the GPU stays busy while the host enqueues
HOST_STEPS = 20  # few enough that the launch queue (~1000 kernels) never fills and blocks the host


def host_ms(fn, steps: int) -> tuple[float, float]:
    """Median CPU ms of the two phases fn yields at, over `steps` calls, with the GPU kept busy."""
    fwd, bwd = [], []
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)
    for _ in range(steps):
        t0 = time.perf_counter()
        phases = fn()
        next(phases)
        t1 = time.perf_counter()
        next(phases, None)
        t2 = time.perf_counter()
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(fwd), statistics.median(bwd)


def wall_ms(step, steps: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def captured(step):
    """`step` captured in a CUDA graph (warmed up first, so autotuning happens before capture): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def graph_ms(step, steps: int) -> float:
    """ms per replay of `step` captured in a CUDA graph."""
    replay = captured(step)
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def kernel_events(step, steps: int = 1) -> list:
    """torch.profiler's events of every GPU kernel of `steps` back-to-back steps, in start order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)


def kernel_list(step) -> list[tuple[str, float]]:
    """(name, device ms) of every GPU kernel of one step, in launch order."""
    return [(e.name, e.time_range.elapsed_us() / 1e3) for e in kernel_events(step)]


def drift(label: str, fn, steps: int) -> None:
    """Prints the median ms of every 10 of `steps` back-to-back calls of fn, timed apart by CUDA events, after
    1 s of idle GPU: whether the GPU slows under sustained load (power capping), whatever runs."""
    timer = Timer(torch.device("cuda"), steps, warmup=0, idle_s=1.0)
    timer(fn)
    ms = timer.times
    print(f"    drift {label:14s} ms per 10 steps: " + " ".join(f"{statistics.median(ms[i:i + 10]):.3f}"
                                                           for i in range(0, steps, 10)), flush=True)


def timeline(step, steps: int, per_step: int) -> None:
    """Prints per-step period, busy and idle ms of `steps` back-to-back steps of `per_step` kernels each, then
    every kernel's min / median / max ms over the steps."""
    events = kernel_events(step, steps)
    if len(events) != steps * per_step:
        print(f"    timeline: {len(events)} kernels for {steps} steps of {per_step}: steps differ, skipped")
        return
    runs = [events[i * per_step:(i + 1) * per_step] for i in range(steps)]
    rows = []
    for i, run in enumerate(runs[:-1]):
        period = (runs[i + 1][0].time_range.start - run[0].time_range.start) / 1e3
        busy = sum(e.time_range.elapsed_us() for e in run) / 1e3
        rows.append((period, busy))
    print("    step period / busy / idle ms: " + "  ".join(f"{p:.3f}/{b:.3f}/{p - b:.3f}" for p, b in rows))
    for j in range(per_step):
        ms = sorted(run[j].time_range.elapsed_us() / 1e3 for run in runs)
        print(f"    kernel {j:2d} min {ms[0]:.3f} median {ms[len(ms) // 2]:.3f} max {ms[-1]:.3f}  "
              f"{runs[0][j].name[:80]}")


def backend_step(spec: str, shape: tuple, x, routing, dy):
    """(label, phases, step) of one backend spec on (x, routing): `phases` a generator yielding between the
    forward and the backward, `step` the whole step."""
    T, d, f, E, k = shape
    label, backend, overrides = parse_backend(spec)
    run, params = build_step(moe_config(E, k, backend, overrides), d, f, x.device, torch.bfloat16)
    params = params + [x, routing.weights]

    def phases():
        for p in params:
            p.grad = None
        y = run(x, routing)[0]
        yield
        y.backward(dy)

    def step():
        for _ in phases():
            pass

    return label, phases, step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="scatter")
    ap.add_argument("--shapes", default="S1,S2")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--graph", action="store_true", help="also time the step replayed from a CUDA graph")
    ap.add_argument("--kernels", action="store_true", help="list the kernels of one step with their durations")
    ap.add_argument("--timeline", type=int, default=0, metavar="N",
                    help="profile N back-to-back eager steps: per-step idle time and per-kernel spread")
    ap.add_argument("--drift", type=int, default=0, metavar="N",
                    help="time N back-to-back steps each of the dense pair, the backend and its CUDA-graph replay")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for name in args.shapes.split(","):
        T, d, f, E, k = SHAPES[name]
        tflop = 3 * 2 * 2 * T * k * d * f / 1e12  # fwd+bwd useful TFLOP per step
        x, routing, _ = make_routing(T, d, E, k, dev, torch.bfloat16)
        x.requires_grad_(True)
        dy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
        if args.graph:
            ms = graph_ms(dense_pair(T * k, d, f, dev, torch.bfloat16)[1], args.steps)
            print(f"{name} dense        gpu (graph) {ms:.3f} ms/step = {tflop / ms * 1e3:.0f} TFLOP/s", flush=True)
        for spec in args.backends.split(","):
            backend, phases, step = backend_step(spec, SHAPES[name], x, routing, dy)
            for _ in range(5):  # compile and autotune outside the measurement
                step()
            fwd, bwd = host_ms(phases, HOST_STEPS)
            wall = wall_ms(step, args.steps)
            line = (f"{name} {backend:12s} host {fwd + bwd:.3f} ms/step (fwd {fwd:.3f}, bwd {bwd:.3f}) | "
                    f"wall {wall:.3f} ms = {tflop / wall * 1e3:.0f} TFLOP/s")
            if args.graph:
                ms = graph_ms(step, args.steps)
                line += f" | gpu (graph) {ms:.3f} ms = {tflop / ms * 1e3:.0f} TFLOP/s"
            print(line, flush=True)
            if args.drift:
                drift("dense pair", dense_pair(T * k, d, f, dev, torch.bfloat16)[1], args.drift)
                drift(f"{backend} eager", step, args.drift)
                drift(f"{backend} graph", captured(step), args.drift)
            if args.kernels or args.timeline:
                kernels = kernel_list(step)
            if args.kernels:
                for kname, ms in kernels:
                    print(f"    {ms:8.3f} ms  {kname[:110]}")
                print(f"    {sum(ms for _, ms in kernels):8.3f} ms  sum of {len(kernels)} kernels", flush=True)
            if args.timeline:
                timeline(step, args.timeline, len(kernels))
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(20):
                    step()
                prof.disable()
                torch.cuda.synchronize()
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
