"""Where one training step's GPU time goes, by phase: attention, router, MoE experts (dispatch, kernels, combine),
dense MLP, LM head + loss, optimizer, everything else.

    python3 benchmarks/profile_step.py --config configs/moe_xs.yaml --steps 3 train.micro_batch_size=64 \
        data.vocab_divisible_by=51200 moe.backend=scatter

Builds the run as pretrain.py does (the config's train.compile included; one micro-batch per step), runs
--warmup steps, then profiles --steps steps with torch.profiler and sums the kernel time of every operator into
the phase of the code that called it (from the operator's Python stack: the module classes and files around it).
Prints a table (ms per step and share) and writes it as JSON with --json. Runs on the CPU too (operator CPU time
instead of kernel time), for a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.config import load_config  # noqa: E402

# a fragment of the operator's Python stack -> its phase; the first match wins (the innermost code is listed
# first in a stack, so specific files come before the modules around them)
PHASES = [("torch/optim", "optimizer"), ("parallel/grads.py", "gradient sync and clip"),
          ("parallel/cross_entropy.py", "LM head + loss"), ("moe/router.py", "router"),
          ("moe/experts/", "MoE experts"), ("moe/kernels/", "MoE experts"),
          ("moe/dispatch.py", "MoE dispatch + combine"), ("moe/", "MoE other (capacity, statistics)"),
          ("nn.Module: Attention", "attention"), ("nn.Module: MLP", "dense MLP"),
          ("nn.Module: LayerNorm", "layer norms"), ("nn.Module: Embedding", "embedding")]
BACKWARD = "autograd::engine::evaluate_function"


def chain(event) -> list:
    """The event and its enclosing events, innermost first (Python frames and modules among them)."""
    out = []
    while event is not None:
        out.append(event)
        event = event.cpu_parent
    return out


def phase_of(names: list[str]) -> str:
    """The phase of an operator from the names of the frames around it, innermost first."""
    for fragment, phase in PHASES:
        if any(fragment in name for name in names):
            return phase
    return "everything else"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()

    from data.loader import GPTData
    from model.gpt import GPT
    from parallel.factory import build_layers
    from parallel.grads import GradSync
    from parallel.state import ParallelState
    from train.metrics import MetricsLogger
    from train.plan import plan_run
    from train.trainer import Trainer, resolve_device

    cfg = load_config(args.config, args.overrides)
    cfg.train.global_batch_size = cfg.train.micro_batch_size  # one micro-batch per step
    plan = plan_run(cfg, 1)
    device = resolve_device(cfg.train.device)
    ps = ParallelState(device=device)
    data = GPTData(cfg.data, cfg.train.seed, train_samples=(args.warmup + args.steps + 1) * plan.global_batch_size,
                   valid_samples=0)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, cfg.moe, plan.vocab_size, cfg.data.seq_length, build_layers(ps)).to(device)
    if cfg.train.compile:
        model.compile_blocks()
    trainer = Trainer(cfg.train, plan, model, data, ps, MetricsLogger("/tmp", enabled=False), GradSync(model, ps))
    batches = data.train_batches(0, cfg.train.micro_batch_size, 1)
    for _ in range(args.warmup):
        trainer.train_step(batches)
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities, with_modules=True, with_stack=True) as prof:
        for _ in range(args.steps):
            trainer.train_step(batches)
        if cuda:
            torch.cuda.synchronize()
    batches.close()

    totals: dict[str, float] = defaultdict(float)
    events = prof.events()
    # a backward operator runs under autograd's evaluate_function of its node, whose sequence number is that of
    # the forward operator that made the node: it takes that operator's phase
    forward = {e.sequence_nr: phase_of([c.name for c in chain(e)]) for e in events
               if e.sequence_nr >= 0 and not any(c.name.startswith(BACKWARD) for c in chain(e))}

    def phase(event) -> str:
        for c in chain(event):
            if c.name.startswith(BACKWARD):
                return forward.get(c.sequence_nr, "everything else")
        return phase_of([c.name for c in chain(event)])

    for event in events:  # operators (not Python frames); each carries the time of the kernels it launched
        if ".py(" in event.name or event.name.startswith("nn.Module"):
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            totals[phase(event)] += us / 1000 / args.steps
    total = sum(totals.values())
    print(f"{args.config} {' '.join(args.overrides)}: {total:.1f} ms of {'kernel' if cuda else 'CPU op'} time per "
          "step")
    print("| phase | ms per step | share |\n|---|---|---|")
    for phase, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {phase} | {ms:.2f} | {ms / total:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": args.overrides, "device": str(device),
                       "ms_per_step": dict(totals)}, f, indent=1)


if __name__ == "__main__":
    main()
