"""Rectify-Router study (issue 19, item 5): what IR, FR and IR+FR rescue, and the loss they reach, on one GPU.

    python benchmarks/rectify_study.py --out benchmarks/results            # the grid below, about 25 runs
    python benchmarks/rectify_study.py --smoke --out /tmp/rs               # toy sizes on the CPU, seconds

The small study config of the learning-quality issue: 4 layers, hidden 256, seq 256, 16 experts, 500 steps of
64 x 256 tokens, lr 1e-3 cosine (to --min-lr), the padded backend, on the embedded corpus (configs/tiny.yaml
for data and tokenizer). The grid: capacity factor 0.5 / 1 / 1.25, top-1 / top-2, and the variants none
(capacity only), IR (the paper's: every dropped assignment to the best expert outside its top-k), FR, IR+FR
(--variants adds ir_capped, the fixed-cost one-round IR). Runs pretrain.py in this process, one after another,
with the capacity step wrapped to count, over all training calls of all layers:
    dropped before   top-k assignments the capacity dropped;
    IR rescued       the fraction of those that IR processed (the paper's IR: all with a local expert left);
    dropped after    the fraction of top-k assignments processed by nobody (what the layer reports);
    FR filled        the fraction of the slots the top-k left empty that FR filled.
Final loss: the mean training loss over the last --tail log records. Writes <date>-<device>-rectify-study.json
and .md under --out, with the device, date and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "none": [],
    "IR": ["moe.capacity.rectify_intra=true"],
    "ir_capped": ["moe.capacity.rectify_intra=true", "moe.capacity.rectify_intra_capped=true"],
    "FR": ["moe.capacity.rectify_fill=true"],
    "IR+FR": ["moe.capacity.rectify_intra=true", "moe.capacity.rectify_fill=true"],
}
STUDY = ["model.num_layers=4", "model.hidden_size=256", "model.num_heads=4", "moe.num_experts=16",
         "data.seq_length=256", "train.micro_batch_size=64", "train.global_batch_size=64", "train.steps=500",
         "train.lr=1e-3", "train.warmup_frac=0.02", "train.log_interval=10"]
SMOKE = ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "moe.num_experts=4",
         "data.seq_length=16", "train.micro_batch_size=4", "train.global_batch_size=4", "train.steps=3",
         "train.log_interval=1", "train.device=cpu", "train.compile=false"]


class Counter:
    """Wraps moe.layer.apply_capacity and sums its decisions on the device (no host sync per call)."""

    def __init__(self):
        import torch

        from moe import layer
        from moe.capacity import capacity

        self.layer, self.original = layer, layer.apply_capacity
        self.sums = torch.zeros(5, dtype=torch.float64)  # assignments, dropped before, after, FR filled, vacant

        def counted(routing, cfg, *args, **kwargs):
            out = self.original(routing, cfg, *args, **kwargs)
            if torch.is_grad_enabled():  # training calls only
                with torch.no_grad():
                    (T, k), E = routing.expert_ids.shape, routing.num_experts
                    kept = out.routing.kept if out.routing.kept is not None else torch.ones_like(routing.expert_ids,
                                                                                                  dtype=torch.bool)
                    topk_kept = kept[:, :k].sum()
                    C = capacity(cfg, T, k, routing.counts)
                    filled = kept[:, k + 1].sum() if kept.shape[1] == k + 2 else topk_kept.new_zeros(())
                    row = torch.stack([topk_kept.new_tensor(T * k), T * k - topk_kept, out.num_dropped, filled,
                                       E * C - topk_kept]).to(self.sums)
                    self.sums = self.sums.to(row.device) + row
            return out

        layer.apply_capacity = counted

    def take(self) -> dict:
        a, before, after, filled, vacant = self.sums.tolist()
        self.sums.zero_()
        return {"dropped_before": before / a, "ir_rescued": (before - after) / before if before else None,
                "dropped_after": after / a, "fr_filled": filled / vacant if vacant else None}

    def restore(self):
        self.layer.apply_capacity = self.original


def run_one(cf: float, k: int, variant: str, args, counter: Counter) -> dict:
    import pretrain

    name = f"cf{cf}_k{k}_{variant}"
    run_dir = Path(args.run_root) / name
    overrides = [*(SMOKE if args.smoke else STUDY), "moe.backend=padded", f"moe.top_k={k}",
                 f"moe.capacity.factor={cf}", *VARIANTS[variant], f"train.min_lr={args.min_lr}",
                 "train.eval_interval=0", "checkpoint.save=false", f"logging.run_dir={run_dir}",
                 "logging.overwrite=true", *args.set]
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), *overrides]
    print("$ pretrain.py", " ".join(argv), flush=True)
    rc = pretrain.main(argv)
    row = {"cf": cf, "k": k, "variant": variant, "overrides": " ".join(overrides)}
    if rc:
        return row | {"error": f"pretrain.py exited {rc}"}
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tail = recs[-args.tail:]
    counts = counter.take()
    if "IR" not in variant.upper():
        counts["ir_rescued"] = None
    if "FR" not in variant:
        counts["fr_filled"] = None
    return row | counts | {"final_loss": sum(r["loss"] for r in tail) / len(tail), "steps": recs[-1].get(
        "step"), "tokens_per_s": recs[-1].get("tokens_per_s")}


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def write(rows: list[dict], args, device: str) -> Path:
    now = datetime.datetime.now(datetime.timezone.utc)
    stem = f"{now:%Y-%m-%d}-{device.replace(' ', '-')}-rectify-study" + ("-smoke" if args.smoke else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "benchmarks/rectify_study.py " + " ".join(sys.argv[1:])
    meta = {"device": device, "date": now.isoformat(timespec="seconds"), "command": command,
            "config": "configs/tiny.yaml + " + " ".join(SMOKE if args.smoke else STUDY), "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    lines = [f"# Rectify-Router study{' (smoke)' if args.smoke else ''}", "",
             f"Device: {device}. Date: {meta['date']}. Command: `{command}`.", "",
             f"Config: {meta['config']}, moe.backend=padded, train.min_lr={args.min_lr}. Counts over all training "
             "calls of all MoE layers; final loss: mean training loss of the last "
             f"{args.tail} log records.", "",
             "| cf | k | variant | dropped before | IR rescued | dropped after | FR filled | final loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cf']} | {r['k']} | {r['variant']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['cf']} | {r['k']} | {r['variant']} | {fmt(r['dropped_before'])} | "
                     f"{fmt(r['ir_rescued'])} | {fmt(r['dropped_after'])} | {fmt(r['fr_filled'])} | "
                     f"{fmt(r['final_loss'], '.4f')} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return out / f"{stem}.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factors", default="0.5,1,1.25")
    p.add_argument("--top-k", default="1,2")
    p.add_argument("--variants", default="none,IR,FR,IR+FR", help=f"of {','.join(VARIANTS)}")
    p.add_argument("--min-lr", type=float, default=1e-4, help="the cosine floor")
    p.add_argument("--tail", type=int, default=5, help="log records averaged for the final loss")
    p.add_argument("--set", nargs="*", default=[], help="more overrides for every run, e.g. train.compile=false")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (a check that the script runs)")
    p.add_argument("--run-root", default="/tmp/rectify_study")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args(argv)
    import torch

    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants {bad}: use some of {list(VARIANTS)}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    counter = Counter()
    rows = []
    try:
        for cf in (float(c) for c in args.factors.split(",")):
            for k in (int(k) for k in args.top_k.split(",")):
                for variant in variants:
                    rows.append(run_one(cf, k, variant, args, counter))
                    path = write(rows, args, device)  # after every run: a job cut short keeps what it measured
    finally:
        counter.restore()
    print(path.read_text())
    return int(any("error" in r for r in rows))


if __name__ == "__main__":
    sys.exit(main())
