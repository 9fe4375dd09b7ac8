"""Expert load from the first step: the paper recipe's plain top-1 against the Sinkhorn-balanced pick.

    python benchmarks/router_balance.py                      # GPU: moe_xs and moe_small, 100 steps each, old and new
    python benchmarks/router_balance.py --steps 500 --configs moe_small   # the loss at step 500
    python benchmarks/router_balance.py --smoke              # CPU: toy sizes, a few steps

For each config and each variant (`old`: moe.router.sinkhorn_iters=0, the plain top-1 of the paper, though with
the router in fp32 under autocast; `new`: the config as it is) it trains from initialisation on the embedded
corpus with the config's recipe (lr, warmup and cosine of its train.steps, aux-loss weight), a smaller global
batch (--global-batch, default 64 sequences of 1024 tokens, micro-batches of 16) so that the four runs should fit
in about four minutes of one H200 (an estimate from the FLOPs, not measured), eager (--compile to compile). At every
step it reads max/mean assignments per expert of each MoE layer (moe/stats.py) and the LM loss; it prints the
worst layer's max/mean per step, and writes <date>-<device>-router-balance.{md,json} under --out with the
device, the date, the command, the worst max/mean of each step and the loss at the last step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.loader import GPTData  # noqa: E402
from model.gpt import GPT  # noqa: E402
from parallel.factory import build_layers  # noqa: E402
from parallel.grads import GradSync  # noqa: E402
from parallel.state import init_parallel, shutdown_parallel  # noqa: E402
from train.config import load_config  # noqa: E402
from train.plan import plan_run  # noqa: E402
from train.trainer import Trainer, resolve_device  # noqa: E402

VARIANTS = {"old": ["moe.router.sinkhorn_iters=0"], "new": []}
SMOKE = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=2", "moe.ffn_hidden_size=32",
         "data.seq_length=64", "moe.backend=grouped"]


class _NoLog:
    def log(self, record) -> None:
        pass


def run_one(config: str, variant: str, args) -> dict:
    overrides = [f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.global_batch}",
                 f"train.compile={str(args.compile).lower()}", "train.eval_interval=0",
                 *(SMOKE if args.smoke else []), *args.set, *VARIANTS[variant]]
    cfg = load_config(str(ROOT / f"configs/{config}.yaml"), overrides, 1)
    plan = plan_run(cfg, 1)
    ps = init_parallel(cfg.parallel, resolve_device(cfg.train.device))
    t = cfg.train
    data = GPTData(cfg.data, t.seed, train_samples=args.steps * t.global_batch_size, valid_samples=0)
    torch.manual_seed(t.seed)
    model = GPT(cfg.model, cfg.moe, plan.vocab_size, cfg.data.seq_length, build_layers(ps)).to(ps.device)
    if t.compile:
        model.compile_blocks()
    # t.steps stays the config's: the lr follows the recipe's warmup and cosine; only args.steps are run
    trainer = Trainer(t, plan, model, data, ps, _NoLog(), GradSync(model, ps, cfg.parallel.bucket_mb))
    batches = data.train_batches(0, t.micro_batch_size, plan.accumulation)
    model.train()
    L = model.moe_stats.num_layers
    worst, per_layer, losses = [], [], []
    start = time.perf_counter()
    try:
        for step in range(1, args.steps + 1):
            out = trainer.train_step(batches)
            m = model.moe_stats.reduce_and_reset()  # this step's counts only (read every step)
            loads = [round(m[f"moe/{i}/max_over_mean"], 3) for i in range(L)]
            worst.append(max(loads))
            per_layer.append(loads)
            losses.append(float(out["lm_loss"]))
            if step <= 5 or step % args.print_every == 0 or step == args.steps:
                print(f"{config} {variant} step {step}: lm {losses[-1]:.4f} worst max/mean {worst[-1]:.2f} "
                      f"(layer {loads.index(worst[-1])}) [{time.perf_counter() - start:.0f}s]", flush=True)
    finally:
        batches.close()
        shutdown_parallel()
        del trainer, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next run builds its own model
    return {"config": config, "variant": variant, "overrides": overrides, "steps": args.steps,
            "worst_max_over_mean": worst, "max_over_mean_per_layer": per_layer, "lm_loss": losses,
            "worst_over_run": max(worst), "steps_over_3": sum(w > 3 for w in worst),
            "final_lm_loss": losses[-1], "mean_lm_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": time.perf_counter() - start}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Router balance from step 1 ({meta['device']}, {meta['date']})", "",
             f"Command: `{meta['command']}`", "",
             "Worst MoE layer's max/mean assignments per expert (64 experts, top-1) at each step; `old` is "
             "moe.router.sinkhorn_iters=0 (the paper's plain top-1), `new` the config as it is.", "",
             "| config | variant | step 1 | step 10 | step 20 | step 50 | max over the run (step) | steps > 3 | "
             "LM loss last step | mean LM loss last 10 | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        w = r["worst_max_over_mean"]
        at = {s: f"{w[s - 1]:.2f}" if s <= len(w) else "-" for s in (1, 10, 20, 50)}
        peak = max(range(len(w)), key=w.__getitem__)
        lines.append(f"| {r['config']} | {r['variant']} | {at[1]} | {at[10]} | {at[20]} | {at[50]} | "
                     f"{w[peak]:.2f} ({peak + 1}) | {r['steps_over_3']} / {len(w)} | {r['final_lm_loss']:.4f} | "
                     f"{r['mean_lm_loss_last_10']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="moe_xs,moe_small")
    p.add_argument("--variants", default="old,new", help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (2 layers, hidden 64, sequence 64)")
    p.add_argument("--set", nargs="*", default=[], help="extra dotted.key=value overrides for every run")
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()
    if args.smoke:
        args.steps, args.global_batch, args.micro_batch = min(args.steps, 4), 4, 2
        args.set = ["train.device=cpu", *args.set]
    device = "cpu" if args.smoke or not torch.cuda.is_available() else torch.cuda.get_device_name()
    meta = {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__}
    results = [run_one(c, v, args) for c in args.configs.split(",") for v in args.variants.split(",")]
    text = markdown(results, meta)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date'][:10]}-{device.replace(' ', '-')}-router-balance{'-smoke' if args.smoke else ''}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    print(f"wrote {out / stem}.md and .json")


if __name__ == "__main__":
    main()
