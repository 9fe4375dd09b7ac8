"""Where one training step's GPU time goes, by phase: attention, the blocks' GEMMs, MoE kernels (experts,
dispatch, combine), routing, layer norms and fused elementwise work, LM head + loss, optimizer, gradient clip.

    python3 benchmarks/profile_step.py --config configs/moe_xs.yaml --steps 3 train.micro_batch_size=64 \
        data.vocab_divisible_by=51200 moe.backend=scatter

Builds the run as pretrain.py does (the config's train.compile included; one micro-batch per step), runs
--warmup steps, then profiles --steps steps with torch.profiler and sums the kernel time of every operator into
its phase (from names alone, see phase_of: works in eager and compiled runs alike).
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

# Phases from names only (the profiler's Python frames are missing on some GPU builds, and compiled blocks have
# none): the record_function labels the model sets outside the compiled blocks, the autograd node of a backward
# operator (mapped to its forward operator by sequence number), then the operator's own kind.
LM_LOSS = "lm_loss"  # model/gpt.py's label around the fused LM head + cross-entropy
BACKWARD = "autograd::engine::evaluate_function"
ROUTING = "router and routing bookkeeping"
ROUTING_OPS = ("moetron::sinkhorn_rounds",)  # the router's own custom ops (the other moetron:: ops are the MoE's)
KINDS = [(("attention", "flash", "sdpa", "fmha"), "attention"),
         (("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::linear"),
          "GEMMs in the blocks (projections, router, dense MLP, grouped experts)"),
         (("layer_norm",), "layer norms"), (("topk", "softmax", "sort", "bincount", "histc", "scatter_add"), ROUTING),
         (("embedding",), "embedding"), (("triton_",), "fused elementwise in the compiled blocks")]


def chain(event) -> list:
    """The event and its enclosing events, innermost first."""
    out = []
    while event is not None:
        out.append(event)
        event = event.cpu_parent
    return out


def phase_of(own: str, context: list[str]) -> str:
    """`own`: the operator's name; `context`: the names around it and, for a backward operator, around its
    forward operator."""
    if any(n.startswith("Optimizer.step") for n in context):
        return "optimizer"
    if own.startswith(("aten::_foreach_norm", "aten::_foreach_mul")):
        return "gradient clip"
    if LM_LOSS in context:
        return "LM head + loss"
    if any(n.startswith(ROUTING_OPS) for n in context):
        return ROUTING
    if any(n.startswith("moetron::") for n in context):
        return "MoE kernels (experts, dispatch, combine)"
    for fragments, phase in KINDS:
        if any(f in own.lower() for f in fragments):
            return phase
    return "everything else"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--top", type=int, default=0, help="also print the N operators and kernels of most device time")
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
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.train_step(batches)
        if cuda:
            torch.cuda.synchronize()
    batches.close()

    totals: dict[str, float] = defaultdict(float)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU  # operators and labels
              and not (".py(" in e.name or e.name.startswith(("nn.Module", "<built-in")))]
    # a backward operator runs under autograd's evaluate_function of its node, whose sequence number is that of
    # the forward operator that made the node: it sees the labels around that operator too
    forward = {e.sequence_nr: [c.name for c in chain(e)] for e in events
               if e.sequence_nr >= 0 and not any(c.name.startswith(BACKWARD) for c in chain(e))}

    def phase(event) -> str:
        names = [c.name for c in chain(event)]
        node = next((c for c in chain(event) if c.name.startswith(BACKWARD)), None)
        return phase_of(event.name, names + (forward.get(node.sequence_nr, []) if node is not None else []))

    for event in events:  # each operator carries the time of the kernels it launched itself
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            totals[phase(event)] += us / 1000 / args.steps
    total = sum(totals.values())
    print(f"{args.config} {' '.join(args.overrides)}: {total:.1f} ms of {'kernel' if cuda else 'CPU op'} time per "
          "step")
    print("| phase | ms per step | share |\n|---|---|---|")
    for phase, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {phase} | {ms:.2f} | {ms / total:.1%} |")
    if args.top:
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=args.top, max_name_column_width=90))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": args.overrides, "device": str(device),
                       "ms_per_step": dict(totals)}, f, indent=1)


if __name__ == "__main__":
    main()
