"""Expert-backend benchmark: forward and forward+backward of the experts behind a fixed routing, against a dense
pair of matmuls of equal FLOPs (the ceiling) and the naive per-expert loop (the `reference` backend).

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_moe.py --backends padded:cf=0,padded:cf=1,grouped --shapes S1,S3
    python benchmarks/bench_moe.py --dry-run          # tiny shape, CPU allowed: a smoke test

A backend is `name[:key=value...]`, the keys being dotted moe.* config keys (`capacity.factor`) or short forms:
`cf` and the flat keys of earlier versions (`drop_policy`, `rectify_intra`, `block_size`, ...), e.g.
`padded:cf=1:drop_policy=probability`. A timed step is what the MoE layer runs after its router (moe/layer.py)
on one rank: the capacity step (padded backend), the local dispatcher, the experts, the combine (gates).
Activation GELU, bf16 activations and weights (fp32 in --dry-run on CPU).
Useful FLOPs: 2*T*k*d*f per GEMM, two GEMMs, x3 for forward+backward. Routing: a fixed-seed random router
on inputs z + 0.1*mu (z ~ N(0, I) per token, mu one fixed N(0, I) vector): softmax top-k with realistic skew;
its max/mean expert load is printed. Timings: median over --reps of CUDA-event intervals after --warmup.
Power: an H100 at its power cap lowers its clocks after a short while of dense load (the power-cap study in
benchmarks/results/README.md), so a timing depends on what ran just before it. Every timing therefore starts
from the same state: --idle seconds with the GPU idle (clocks back up), then --warmup and --reps ("burst": a
layer between others in a training step); with --load S the function first runs for S seconds ("sustained":
the power-capped steady state). Dense and backends alike.
Error: relative L2 error of the output and of the input gradient against the naive loop (padded with a
finite capacity drops assignments, so its error is large by design; its dropped fraction is listed).
Writes <out>/<date>-<device>[-<tag>].json and .md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe.config import CapacityConfig, MoEConfig  # noqa: E402
from moe.dispatch import LocalDispatcher  # noqa: E402
from moe.experts import build_experts  # noqa: E402
from moe.experts.reference import ReferenceExperts  # noqa: E402
from moe.layer import run_experts  # noqa: E402
from moe.positions import count_per_expert  # noqa: E402
from moe.routing import Routing  # noqa: E402

SHAPES = {  # name: (T, d, f, E, k)
    "S1": (32768, 512, 2048, 64, 1),
    "S2": (16384, 1024, 4096, 64, 1),
    "S3": (8192, 4096, 14336, 8, 2),
    "S4": (16384, 2048, 1024, 64, 8),
    "tiny": (256, 64, 128, 8, 2),
}
ALIASES = {"cf": "capacity.factor", **MoEConfig.RENAMED}  # short key of a backend spec -> its moe.* key


def config_field(cfg: MoEConfig, key: str):
    """(section, name) of a dotted moe.* key in cfg, e.g. 'capacity.factor' -> (cfg.capacity, 'factor'); None
    if no such leaf key."""
    *path, leaf = key.split(".")
    section = cfg
    for part in path:
        section = getattr(section, part, None)
    if not dataclasses.is_dataclass(section) or leaf not in {f.name for f in dataclasses.fields(section)}:
        return None
    return None if dataclasses.is_dataclass(getattr(section, leaf)) else (section, leaf)


def parse_backend(spec: str) -> tuple[str, str, dict]:
    """'padded:cf=1' -> (label 'padded(cf=1)', 'padded', {'capacity.factor': 1.0})."""
    name, *opts = spec.split(":")
    overrides = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        key = ALIASES.get(key, key)
        found = config_field(MoEConfig(), key)
        if found is None:
            raise SystemExit(f"--backends {spec}: {key!r} is not an moe.* config key")
        kind = type(getattr(*found))
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    label = name + (f"({','.join(opts)})" if opts else "")
    return label, name, overrides


def moe_config(E: int, k: int, backend: str, overrides: dict) -> MoEConfig:
    """The validated moe config of a backend and its spec's overrides (dotted keys, from parse_backend)."""
    cfg = MoEConfig(num_experts=E, top_k=k, backend=backend)
    for key, value in overrides.items():
        setattr(*config_field(cfg, key), value)
    cfg.validate()
    return cfg


def routing_of(logits: torch.Tensor, k: int) -> Routing:
    """The softmax top-k Routing of router logits [T, E], losses zero (the benchmarks time what follows it)."""
    probs = logits.softmax(-1)
    weights, ids = probs.topk(k, -1)
    zero = logits.new_zeros(())
    return Routing(ids, weights, probs, logits, count_per_expert(ids, probs.shape[1]), zero, zero)


def make_routing(T: int, d: int, E: int, k: int, device, dtype, seed: int = 0):
    """x [T, d] = z + 0.1*mu and a fixed random router's softmax top-k routing over it (gates requiring grad)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g)
    x = torch.randn(T, d, generator=g) + 0.1 * mu
    w_router = torch.randn(E, d, generator=g) / math.sqrt(d)
    routing = routing_of((x @ w_router.t()).to(device), k)
    routing.weights.requires_grad_(True)
    counts = routing.counts.float()
    return x.to(device, dtype), routing, (counts.max() / counts.mean()).item()


def expert_step(experts, capacity: CapacityConfig | None = None, renormalize: bool = False):
    """run(x, routing) -> (y [T, d], assignments dropped []): what moe/layer.py runs after its router, on one
    rank: the capacity step when `capacity` is given (the padded backend's), the local dispatcher, the
    experts, the combine (gates applied)."""
    dispatcher = LocalDispatcher()

    def run(x: torch.Tensor, routing: Routing):
        return run_experts(dispatcher, experts, x, routing, capacity, renormalize)

    return run


def build_step(cfg: MoEConfig, d: int, f: int, device, dtype, weights: dict | None = None):
    """(expert_step of cfg.backend's GELU experts [d -> f -> d] on device, their parameters); `weights` a state
    dict to load."""
    module = build_experts(cfg, d, f, "gelu", 0.02, 0.02).to(device, dtype)
    if weights is not None:
        module.load_state_dict(weights)
    capacity = cfg.capacity if cfg.backend == "padded" else None  # as moe/layer.py decides
    return expert_step(module, capacity, cfg.router.renormalize), list(module.parameters())


class Timer:
    def __init__(self, device: torch.device, reps: int, warmup: int, idle_s: float = 0.0, load_s: float = 0.0):
        self.cuda, self.reps, self.warmup, self.device = device.type == "cuda", reps, warmup, device
        self.idle_s, self.load_s = (idle_s, load_s) if self.cuda else (0.0, 0.0)
        self.times: list[float] = []  # ms of each rep of the last call, in order

    def __call__(self, fn) -> float:
        """Median milliseconds of fn() after idle_s idle and load_s of fn(); self.times gets every rep's."""
        if self.idle_s:
            torch.cuda.synchronize()
            time.sleep(self.idle_s)
        t_end = time.perf_counter() + self.load_s
        while time.perf_counter() < t_end:
            fn()
            torch.cuda.synchronize()  # the host must not run ahead of the load
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            self.times = times
            return statistics.median(times)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        self.times = [s.elapsed_time(e) for s, e in events]
        return statistics.median(self.times)

    def peak_gib(self, fn) -> float | None:
        """Peak memory allocated by fn() above what was allocated before, GiB."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def bench_experts(run, params, x, routing, dy, timer):
    """Timings and outputs of one expert step `run` (see expert_step) on (x, routing); `params` its weights."""
    x = x.detach().requires_grad_(True)

    def fwd():
        return run(x, routing)

    def fwd_bwd():
        for p in params + [x, routing.weights]:
            p.grad = None
        y, dropped = run(x, routing)
        y.backward(dy)
        return y, dropped

    t_fwd = timer(fwd)
    t_fb = timer(fwd_bwd)
    peak = timer.peak_gib(fwd_bwd)
    y, dropped = fwd_bwd()
    return t_fwd, t_fb, peak, y.detach(), x.grad.detach(), dropped.item()


def dense_pair(N, d, f, device, dtype):
    """The ceiling: gelu(X [N, d] @ W1 [d, f]) @ W2 [f, d] with the same GEMM FLOPs as the experts, as
    (forward, forward+backward) callables."""
    g = torch.Generator(device="cpu").manual_seed(1)
    X = torch.randn(N, d, generator=g).to(device, dtype).requires_grad_(True)
    W1 = (torch.randn(d, f, generator=g) * 0.02).to(device, dtype).requires_grad_(True)
    W2 = (torch.randn(f, d, generator=g) * 0.02).to(device, dtype).requires_grad_(True)
    dY = torch.randn(N, d, generator=g).to(device, dtype)

    def fwd():
        return F.gelu(X @ W1, approximate="tanh") @ W2

    def fwd_bwd():
        for p in (X, W1, W2):
            p.grad = None
        fwd().backward(dY)

    return fwd, fwd_bwd


def bench_dense(N, d, f, device, dtype, timer):
    fwd, fwd_bwd = dense_pair(N, d, f, device, dtype)
    return timer(fwd), timer(fwd_bwd), timer.peak_gib(fwd_bwd)


def run_shape(name, shape, backends, device, dtype, timer, naive: bool):
    T, d, f, E, k = shape
    flops_fwd = 2 * T * k * d * f * 2
    x, routing, skew = make_routing(T, d, E, k, device, dtype)
    print(f"\n== {name}: T={T} d={d} f={f} E={E} k={k}  load max/mean {skew:.2f}  "
          f"useful GFLOP fwd {flops_fwd / 1e9:.1f}", flush=True)
    dy = torch.randn(T, d, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    rows = []

    def record(label, t_fwd, t_fb, peak, err_y=None, err_dx=None, dropped=None):
        fb_min, fb_max = min(timer.times), max(timer.times)  # of the fwd+bwd reps (timed last)
        row = {"shape": name, "T": T, "d": d, "f": f, "E": E, "k": k, "load_max_over_mean": round(skew, 3),
               "backend": label, "fwd_ms": t_fwd, "fwd_bwd_ms": t_fb,
               "fwd_bwd_ms_min": fb_min, "fwd_bwd_ms_max": fb_max,
               "fwd_tflops": flops_fwd / t_fwd / 1e9, "fwd_bwd_tflops": 3 * flops_fwd / t_fb / 1e9,
               "peak_mem_gib": peak, "err_y": err_y, "err_dx": err_dx,
               "dropped_frac": None if dropped is None else dropped / (T * k)}
        if rows and rows[0]["backend"] == "dense":
            row["fwd_pct_dense"] = 100 * rows[0]["fwd_ms"] / t_fwd
            row["fwd_bwd_pct_dense"] = 100 * rows[0]["fwd_bwd_ms"] / t_fb
        rows.append(row)
        pct = f"{row.get('fwd_bwd_pct_dense', 100):5.1f}%"
        print(f"  {label:28s} fwd {t_fwd:8.3f} ms {row['fwd_tflops']:7.1f} TF/s | fwd+bwd {t_fb:8.3f} ms "
              f"{row['fwd_bwd_tflops']:7.1f} TF/s [{fb_min:.3f}-{fb_max:.3f} ms] {pct} of dense | "
              f"peak {peak if peak is None else round(peak, 2)}"
              f" GiB | err y {err_y if err_y is None else f'{err_y:.2e}'} dx "
              f"{err_dx if err_dx is None else f'{err_dx:.2e}'} | dropped {row['dropped_frac']}", flush=True)

    record("dense", *bench_dense(T * k, d, f, device, dtype, timer))
    torch.manual_seed(0)
    weights = ReferenceExperts(E, d, f, "gelu", 0.02, 0.02 / math.sqrt(2)).state_dict()
    weights = {key: v.to(device, dtype) for key, v in weights.items()}

    def build(backend, overrides):
        return build_step(moe_config(E, k, backend, overrides), d, f, device, dtype, weights)

    ref = build("reference", {})
    t_fwd, t_fb, peak, y_ref, dx_ref, _ = bench_experts(*ref, x, routing, dy, timer if naive else Timer(device, 1, 0))
    if naive:
        record("naive loop", t_fwd, t_fb, peak, 0.0, 0.0, 0)
    del ref
    for label, backend, overrides in backends:
        try:
            step = build(backend, overrides)
            t_fwd, t_fb, peak, y, dx, dropped = bench_experts(*step, x, routing, dy, timer)
        except (RuntimeError, NotImplementedError) as err:  # a backend failing must not lose the others
            print(f"  {label:28s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append({"shape": name, "backend": label, "error": str(err)[:300]})
            continue
        record(label, t_fwd, t_fb, peak, rel_err(y, y_ref), rel_err(dx, dx_ref), dropped)
        del step, y, dx
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def write(rows, out_dir: str, device_name: str, args) -> str:
    os.makedirs(out_dir, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = os.path.join(out_dir, f"{date}-{re.sub(r'[^A-Za-z0-9._-]+', '-', device_name).strip('-')}"
                        + (f"-{args.tag}" if args.tag else ""))
    meta = {"device": device_name, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "torch": torch.__version__, "dtype": args.dtype, "reps": args.reps, "warmup": args.warmup,
            "idle_s": args.idle, "load_s": args.load,
            "activation": "gelu", "flops": "2*T*k*d*f per GEMM, 2 GEMMs; x3 for fwd+bwd"}
    with open(stem + ".json", "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)
    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    lines = [f"# bench_moe: {device_name}, {meta['date_utc'][:16]} UTC, torch {torch.__version__}, {args.dtype}",
             "", f"Command: `{' '.join(sys.argv)}`. {meta['flops']}. Median of {args.reps} reps, each timing after "
             f"{args.idle} s idle and {args.load} s of load.", "",
             "| shape | load max/mean | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | % dense "
             "(fwd+bwd) | peak GiB | rel err y | rel err dx | dropped |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | - | {r['backend']} | failed: {r['error'][:80]} |")
            continue
        cells = [r["shape"], fmt(r["load_max_over_mean"], ".2f"), r["backend"], fmt(r["fwd_ms"], ".3f"),
                 fmt(r["fwd_tflops"]), fmt(r["fwd_bwd_ms"], ".3f"), fmt(r["fwd_bwd_tflops"]),
                 fmt(r.get("fwd_bwd_pct_dense")), fmt(r["peak_mem_gib"], ".2f"), fmt(r["err_y"], ".1e"),
                 fmt(r["err_dx"], ".1e"), fmt(r["dropped_frac"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return stem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="padded:cf=0,padded:cf=1,grouped")
    ap.add_argument("--shapes", default="S1,S2,S3,S4")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--idle", type=float, default=1.0, help="seconds of idle GPU before each timing (see Power)")
    ap.add_argument("--load", type=float, default=0.0, help="seconds of the timed function before its timing: "
                    "the sustained, power-capped speed")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--no-naive", action="store_true", help="skip timing the naive loop (still the error baseline)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shape, 2 reps: a smoke test (CPU fine)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.shapes, args.reps, args.warmup = "tiny", 2, 1
        if args.device == "cpu":
            args.dtype = "float32"
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = [parse_backend(s) for s in args.backends.split(",") if s]
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; use some of {sorted(SHAPES)}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{args.dtype}"
    print(f"device {device_name}, torch {torch.__version__}, {args.dtype}, backends "
          f"{[b[0] for b in backends]}", flush=True)
    timer = Timer(device, args.reps, args.warmup, args.idle, args.load)
    rows = []
    for name in args.shapes.split(","):
        rows += run_shape(name, SHAPES[name], backends, device, dtype, timer, not args.no_naive)
    print(f"\nwrote {write(rows, args.out, device_name, args)}.json/.md")
    return rows


if __name__ == "__main__":
    main()
