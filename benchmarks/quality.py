"""The learning-quality study (issue 16): a grid of routing variants x seeds, trained one after another in one job,
summarised and drawn.

    python benchmarks/quality.py                                   # every variant, seeds 1,2, on a GPU
    python benchmarks/quality.py --variants top1-dropless,top1-cf1 --seeds 1,2,3 --steps 1000
    python benchmarks/quality.py --smoke                           # CPU, toy size, under 2 minutes
    python benchmarks/quality.py --base configs/moe_xs.yaml --variants dense,top1-dropless --seeds 1 \
        --steps 954 --set train.global_batch_size=512 moe.backend=scatter    # MoE-XS and its twin, 500M tokens

The base is configs/quality.yaml (4 layers, hidden 256, 16 experts, sequences of 256, 500 steps of 64 x 256
tokens, lr 1e-3 cosine), or --base; each variant is a few dotted overrides of it (VARIANTS). Every variant x
seed runs pretrain.py in a process of its own (benchmarks/pretrain_runs.py) into <run-root>/<variant>-s<seed>,
logging 100 times and validating 20 times per run. Data: the held-out English corpus (corpus/english/, built by
`scripts/prepare_corpus.py --corpus english`: trains on its train split, validates on its valid split) when it is
there, else the embedded Shakespeare (validation cut by data.split); --corpus chooses. Then writes the summary
(final validation loss, mean ± std and range over seeds, tokens, wall time, tokens/s, dropped fraction) as
<date>-<device>-quality.{md,json} under --out, and the figures of scripts/plot_runs.py under --figures.
train.seed also picks the validation samples (Megatron's GPTDataset shuffles each split with it), so the spread
over seeds holds that of the validation sample too; variants of one seed are validated on the same samples.

--smoke: the same grid at toy size on the CPU (2 layers, hidden 32, 4 experts, 4 x 32 tokens, 20 steps; the
reference backend for the dropless variants), by default two variants x seeds 1,2: a check that the whole chain
runs, not a result. --skip-done reuses a run directory that holds a finished run of the same config (to split
the grid over several jobs). --dry-run prints the commands and checks every config, and trains nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.pretrain_runs import pretrain_command, run_pretrain  # noqa: E402
from errors import ConfigError  # noqa: E402
from scripts import plot_runs  # noqa: E402
from train.config import load_config  # noqa: E402
from train.metrics import MetricsError, read_metrics  # noqa: E402

BASE = ROOT / "configs/quality.yaml"
SPARSEMIXER = ["moe.router.type=sparsemixer", "moe.router.jitter_eps=0.1"]  # its mask width (moe/config.py)
CAPACITY_1 = ["moe.backend=padded", "moe.capacity.factor=1"]
# name -> overrides of the base (top-1 dropless); the dropless variants keep the base's moe.backend
VARIANTS = {
    "dense": ["moe.num_experts=0"],
    "top1-dropless": ["moe.top_k=1"],
    "top1-dropless-renorm": ["moe.top_k=1", "moe.router.renormalize=true"],  # gate 1, no router gradient
    "top1-dropless-st": ["moe.top_k=1", "moe.router.renormalize=true", "moe.router.straight_through=true"],
    "top1-dropless-sinkhorn": ["moe.top_k=1", "moe.router.sinkhorn_iters=3", "moe.router.sinkhorn_sharpness=3"],
    "top1-cf1": ["moe.top_k=1", *CAPACITY_1],
    "top1-sparsemixer": ["moe.top_k=1", *SPARSEMIXER],
    "top2-dropless": ["moe.top_k=2"],
    "top2-cf1": ["moe.top_k=2", *CAPACITY_1],
    "top2-cf1-rectify": ["moe.top_k=2", *CAPACITY_1, "moe.capacity.rectify_intra=true",
                         "moe.capacity.rectify_fill=true"],
    "top2-sparsemixer": ["moe.top_k=2", *SPARSEMIXER],
}
SMOKE = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "moe.num_experts=4",
         "moe.backend=reference", "data.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=4",
         "train.eval_batches=2", "train.device=cpu"]
SMOKE_VARIANTS, SMOKE_STEPS = "top1-dropless,top1-cf1", 20
ENGLISH = "corpus/english/english"
CORPORA = {
    "english": [f"data.paths=[{ENGLISH}_train_text_document]", f"data.valid_paths=[{ENGLISH}_valid_text_document]",
                "data.tokenizer=corpus/english/tokenizer.model"],
    "shakespeare": [],  # the base config's
}


@dataclass
class Job:
    variant: str
    seed: int
    run_dir: Path
    overrides: list[str]
    base: Path = BASE

    @property
    def command(self) -> list[str]:
        return pretrain_command(self.base, self.overrides, self.run_dir)


def corpus_of(choice: str) -> str:
    if choice == "auto":
        return "english" if (ROOT / f"{ENGLISH}_valid_text_document.bin").exists() else "shakespeare"
    return choice


def intervals(steps: int) -> list[str]:
    """100 log intervals and 20 validations per run; validation runs at log steps, so its interval is a multiple
    of the log interval (train/trainer.py)."""
    log = max(1, steps // 100)
    return [f"train.log_interval={log}", f"train.eval_interval={log * max(1, steps // (20 * log))}"]


def build_grid(args) -> list[Job]:
    """Every chosen variant x seed, in that order (all seeds of a variant together)."""
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ConfigError("--variants", f"names {unknown or 'nothing'}; choose from {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise ConfigError("--seeds", f"is {args.seeds!r}; give integers such as 1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds", f"is {args.seeds!r}; give distinct integers such as 1,2")
    steps = args.steps
    common = [*(SMOKE if args.smoke else []), *CORPORA[corpus_of(args.corpus)]]
    return [Job(name, seed, Path(args.run_root) / f"{name}-s{seed}",
                [*common, *VARIANTS[name], f"train.seed={seed}", f"train.steps={steps}", *intervals(steps), *args.set],
                Path(args.base).resolve())
            for name in names for seed in seeds]


def finished(job: Job) -> bool:
    """Whether job.run_dir holds a finished run of job's config (--skip-done)."""
    try:
        saved = yaml.safe_load((job.run_dir / "config.yaml").read_text())
        records = read_metrics(job.run_dir / "metrics.jsonl")
    except (OSError, yaml.YAMLError, MetricsError):
        return False
    want = load_config(job.base, [*job.overrides, f"logging.run_dir={job.run_dir.resolve()}",
                              "logging.overwrite=true"]).to_dict()
    return saved == want and records[-1]["step"] == want["train"]["steps"]


def device_name(smoke: bool) -> str:
    if smoke:
        return "cpu"
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_results(args, jobs: list[Job], failed: list[dict], device: str, wall_s: float, command: str) -> Path:
    """The summary table and JSON under --out, the figures under --figures; returns the markdown file."""
    stem = f"{datetime.date.today()}-{device.replace(' ', '_')}-quality{'-smoke' if args.smoke else ''}"
    out = Path(args.out)
    figures = Path(args.figures or out / f"{stem}-figures")
    done = [j for j in jobs if all(f["run_dir"] != str(j.run_dir) for f in failed)]
    variants = plot_runs.group_runs([plot_runs.load_run(j.run_dir) for j in done]) if done else []
    rows = [plot_runs.summary(v) for v in variants]
    written = plot_runs.plot_all(variants, figures) if variants else []
    corpus = corpus_of(args.corpus)
    lines = [f"# Learning-quality study{' (CPU smoke run, toy size: not a result)' if args.smoke else ''}, "
             f"{device}, {datetime.date.today()}", "",
             f"`python benchmarks/quality.py {command}`; base `configs/quality.yaml`"
             f"{' at smoke sizes' if args.smoke else ''}, corpus {corpus}, {args.steps} steps, extra overrides "
             f"`{' '.join(args.set) or 'none'}`. "
             f"Final validation loss at the last step every seed validated: mean ± sample std over seeds, and the "
             f"lowest and highest seed. Wall time: from the first step to the last, validation included (mean "
             f"over seeds); tokens/s: median of the log intervals after the first. Whole job {wall_s:.0f} s.", "",
             plot_runs.summary_table(rows), ""]
    lines += [f"- {f['variant']} seed {f['seed']}: failed, {f['error']}" for f in failed]
    lines += ["", "Variants (overrides of configs/quality.yaml):", ""]
    lines += [f"- {name}: `{' '.join(VARIANTS[name])}`" for name in dict.fromkeys(j.variant for j in jobs)]
    lines += ["", "Figures: " + ", ".join(f"`{p}`" for p in written)]
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(
        {"device": device, "date": str(datetime.date.today()), "corpus": corpus, "wall_s": wall_s,
         "args": vars(args), "rows": rows, "failed": failed,
         "runs": [{"variant": j.variant, "seed": j.seed, "run_dir": str(j.run_dir), "overrides": j.overrides}
                  for j in jobs], "figures": [str(p) for p in written]}, indent=1))
    (out / f"{stem}.md").write_text(table)
    print(table)
    return out / f"{stem}.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all; --smoke: "
                   f"{SMOKE_VARIANTS})")
    p.add_argument("--seeds", default="1,2", help="train.seed values, comma-separated")
    p.add_argument("--steps", type=int, default=0, help=f"train.steps (default: the base config's; --smoke: "
                   f"{SMOKE_STEPS})")
    p.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for every run")
    p.add_argument("--base", default=str(BASE), help="the config the variants override, e.g. configs/moe_xs.yaml "
                   "for the paper's sizes ('dense' is then its dense twin)")
    p.add_argument("--corpus", choices=("auto", *CORPORA), default="auto",
                   help="auto: english when corpus/english/ is built, else shakespeare (--smoke: shakespeare)")
    p.add_argument("--smoke", action="store_true", help="toy size on the CPU (see above)")
    p.add_argument("--skip-done", action="store_true", help="reuse run directories that hold a finished run of the "
                   "same config")
    p.add_argument("--dry-run", action="store_true", help="print the commands and check the configs; train nothing")
    p.add_argument("--run-root", default=str(ROOT / "runs/quality"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="folder for the summary .md and .json")
    p.add_argument("--figures", help="folder for the PNGs (default: <out>/<summary name>-figures)")
    args = p.parse_args(argv)
    if args.smoke:
        args.variants = args.variants or SMOKE_VARIANTS
        args.steps = args.steps or SMOKE_STEPS
        args.corpus = "shakespeare" if args.corpus == "auto" else args.corpus
    args.variants = args.variants or ",".join(VARIANTS)
    args.steps = args.steps or load_config(args.base).train.steps
    return args


def main(argv=None, run=run_pretrain) -> int:
    """`run(command, run_dir) -> (records, error)`: run_pretrain, or a stand-in in tests."""
    args = parse_args(argv)
    try:
        jobs = build_grid(args)
        for job in jobs:  # every config is checked before the first run starts
            load_config(job.base, job.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.dry_run:
        for job in jobs:
            print(" ".join(job.command[1:]))
        return 0
    device, started, failed = device_name(args.smoke), time.perf_counter(), []
    for n, job in enumerate(jobs, 1):
        print(f"quality: run {n}/{len(jobs)}: {job.variant} seed {job.seed}", flush=True)
        if args.skip_done and finished(job):
            print(f"quality: {job.run_dir} holds this run finished; reused", flush=True)
            continue
        _, error = run(job.command, job.run_dir)
        if error:
            failed.append({"variant": job.variant, "seed": job.seed, "run_dir": str(job.run_dir), "error": error})
    try:
        write_results(args, jobs, failed, device, time.perf_counter() - started,
                      " ".join(sys.argv[1:] if argv is None else argv))
    except plot_runs.RunError as e:
        print(f"quality: {e}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
