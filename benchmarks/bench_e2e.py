"""End-to-end training throughput of several configs in one job, e.g. MoE-XS against Transformer-XS.

    python benchmarks/bench_e2e.py --configs transformer_xs,moe_xs --steps 300 --micro-batch 64 \
        --set moe.backend=grouped --out benchmarks/results

Runs `pretrain.py` once per config (same steps, batch and overrides), skips the first log interval (warm-up,
compilation), and reports steady-state tokens/s, step time, TFLOP/s, MFU, peak memory and the final loss, with
the ratio of step times against the first config. Defaults: the paper's vocabulary (--vocab 51200, as
data.vocab_divisible_by on the embedded corpus), compiled blocks on a GPU (--no-compile for eager), and on a GPU
the baseline of benchmarks/minimal_gpt.py with the first config's sizes, timed in the same job
(--no-baseline to skip it). Writes <date>-<device>-e2e.json and .md under --out, again after every run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.pretrain_runs import pretrain_command, run_pretrain  # noqa: E402


def run_one(spec: str, args) -> dict:
    """spec: a config name, optionally with its own overrides: `moe_xs@moe.backend=scatter@train.compile=false`."""
    name, *own = spec.split("@")
    run_dir = Path(args.run_root) / spec.replace("@", "_").replace("=", "-")
    cmd = pretrain_command(ROOT / f"configs/{name}.yaml", [
        f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.global_batch or args.micro_batch}", f"train.log_interval={args.log_interval}",
        "train.eval_interval=0", "checkpoint.save=false", f"train.compile={str(args.compile).lower()}",
        f"data.vocab_divisible_by={args.vocab}", *args.set, *own], run_dir)
    recs, error = run_pretrain(cmd, run_dir)
    if error:
        return {"config": spec, "command": " ".join(cmd[1:]), "error": error}
    steady = recs[1:] or recs
    med = lambda k: statistics.median(r[k] for r in steady if r.get(k) is not None) if any(
        r.get(k) is not None for r in steady) else None
    return {"config": spec, "command": " ".join(cmd[1:]), "tokens_per_s": med("tokens_per_s"),
            "step_time_s": med("step_time_s"), "tflops": med("tflops"), "mfu": med("mfu"),
            "peak_mem_gib": max((r.get("mem_gib") or 0) for r in recs), "first_loss": recs[0]["loss"],
            "final_loss": recs[-1]["loss"]}


def run_baseline(spec: str, args) -> dict:
    """benchmarks/minimal_gpt.py with the sizes of config `spec` (its name before any @)."""
    cmd = [sys.executable, str(ROOT / "benchmarks/minimal_gpt.py"), "--config",
           str(ROOT / f"configs/{spec.split('@')[0]}.yaml"), "--vocab", str(args.vocab), "--micro-batch",
           str(args.micro_batch), "--steps", str(args.steps), "--log-interval", str(args.log_interval)]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-3000:], flush=True)
        return {"config": "minimal GPT", "command": " ".join(cmd[1:]), "error": "minimal_gpt.py failed"}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "command": " ".join(cmd[1:]), "tflops": None, "mfu": None, "first_loss": row["final_loss"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="transformer_xs,moe_xs", help="comma-separated specs (see run_one)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=0, help="0: one micro-batch per step")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train.compile for every run (default: on a GPU)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="time benchmarks/minimal_gpt.py too (default: on a GPU)")
    p.add_argument("--vocab", type=int, default=51200, help="data.vocab_divisible_by (the padded vocabulary)")
    p.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for every run")
    p.add_argument("--run-root", default="/tmp/moetron-e2e")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()

    import torch
    cuda = torch.cuda.is_available()
    args.compile = cuda if args.compile is None else args.compile
    args.baseline = cuda if args.baseline is None else args.baseline
    device = torch.cuda.get_device_name() if cuda else "cpu"
    specs = args.configs.split(",")
    runs = [(run_one, spec) for spec in specs] + ([(run_baseline, specs[0])] if args.baseline else [])
    rows = []
    for run, spec in runs:  # the files are rewritten after every run: a job stopped by a time limit keeps what ran
        rows.append(run(spec, args))
        write_results(rows, device, args)


def write_results(rows: list[dict], device: str, args) -> None:
    """Print the table of `rows` (failed runs last) and write it with the JSON under --out."""
    done = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    lines = [f"# End-to-end throughput, {device}, {datetime.date.today()}", "",
             f"steps {args.steps}, micro batch {args.micro_batch}, compile {args.compile}, vocabulary {args.vocab}, "
             f"overrides `{' '.join(args.set)}`; medians over log intervals after the first.", "",
             "| config | tokens/s | step s | step time vs first | TFLOP/s | MFU | peak GiB | loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in done:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        tflops = f"{r['tflops']:.1f}" if r["tflops"] is not None else "-"
        lines.append(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | "
                     f"{r['step_time_s'] / done[0]['step_time_s']:.2f} | {tflops} | {mfu} | "
                     f"{r['peak_mem_gib']:.1f} | {r['first_loss']:.2f} -> {r['final_loss']:.2f} |")
    lines += [f"| {r['config']} | failed | | | | | | |" for r in failed]
    table = "\n".join(lines)
    print(table, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today()}-{device.replace(' ', '_')}-e2e"
    (out / f"{stem}.json").write_text(json.dumps({"device": device, "rows": done + failed, "args": vars(args)},
                                                 indent=1))
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
