"""Figures of training runs: validation loss against tokens and against wall time (mean and spread over seeds),
tokens per expert as a heatmap, and the fraction of assignments dropped by the expert capacity.

    python scripts/plot_runs.py runs/quality/* --out figures/quality
    python scripts/plot_runs.py runs/a runs/b --out figures --label "top{moe.top_k} cf {moe.capacity.factor}"

Each RUN_DIR is a logging.run_dir: config.yaml (the resolved config) and metrics.jsonl (train/metrics.py).
Runs whose configs differ only in train.seed (and in where and how they write: logging.*, checkpoint.*,
data.cache_dir, data.prefetch) form one variant; every other difference makes another variant. A variant is named
by --label, a pattern of dotted config keys in braces, or else by its first run's directory name without a seed
suffix (`-s1`, `_seed2`, `.seed-3`): top2-cf1-s1 and top2-cf1-s2 make `top2-cf1`. Writes under --out:
    val_loss_tokens.png  validation loss against tokens seen (step x train.global_batch_size x data.seq_length):
                         per variant the mean over seeds as a line, the lowest to highest seed as a band
    val_loss_time.png    the same against wall time (elapsed_s of the run: from its first step, validation included;
                         the mean over seeds)
    experts_<name>.png   per MoE variant, the tokens routed to each expert (as the router chose them, before any
                         capacity drop: moe/stats.py) as a heatmap: x the step (each log interval a column), y the
                         experts of each MoE layer, stacked layer by layer; the colour is the expert's share of its
                         layer's assignments in that interval, white at 1/E (balanced). From
                         the variant's first seed (the lowest train.seed): seeds route differently, a mean would blur
    dropped.png          per capacity-factor variant (moe.backend=padded, moe.capacity.factor > 0) or any variant
                         that dropped assignments: the dropped fraction, mean over MoE layers, against the step
                         (mean over seeds, band lowest to highest)
and prints the summary of each variant (final validation loss: mean, std and range over seeds).
The series behind every figure come from functions that return them (val_curve, expert_shares, dropped_curve).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.metrics import MetricsError, read_metrics  # noqa: E402

# config keys that do not make a run another variant: the seed, and where and how the run writes
NOT_VARIANT = {"train": ("seed",), "logging": None, "checkpoint": None, "data": ("cache_dir", "prefetch")}
SEED_SUFFIX = re.compile(r"[-_.](?:s|seed)[-_=]?\d+$")


class RunError(ValueError):
    """A run directory that cannot be used: the message names it and the fix (one line)."""


@dataclass
class Run:
    path: Path
    config: dict
    records: list[dict]

    @property
    def seed(self) -> int:
        return self.config["train"]["seed"]

    @property
    def tokens_per_step(self) -> int:  # train/plan.py, RunPlan.tokens_per_step
        return self.config["train"]["global_batch_size"] * self.config["data"]["seq_length"]

    def moe_layers(self) -> list[int]:
        """The MoE layer indices that log tokens_per_expert (moe/stats.py: moe/<layer>/tokens_per_expert)."""
        found = {int(k.split("/")[1]) for r in self.records for k in r if k.endswith("/tokens_per_expert")}
        return sorted(found)


@dataclass
class Variant:
    name: str
    runs: list[Run]  # by seed

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a directory; give run directories (logging.run_dir), such as runs/tiny")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: no config.yaml; not a run directory of pretrain.py (it writes config.yaml and "
                       "metrics.jsonl into logging.run_dir)") from None
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f"{path / 'config.yaml'}: cannot be read ({str(e).splitlines()[0]})") from None
    sections = ("train", "data", "moe")
    if not isinstance(config, dict) or not all(isinstance(config.get(s), dict) for s in sections):
        raise RunError(f"{path / 'config.yaml'}: not a resolved moetron config (needs sections {sections})")
    try:
        records = read_metrics(path / "metrics.jsonl")
    except MetricsError as e:
        raise RunError(str(e)) from None
    return Run(path, config, records)


def variant_key(config: dict) -> str:
    """The config without the keys of NOT_VARIANT, as a canonical string: equal for seeds of one variant."""
    kept = {}
    for section, values in config.items():
        drop = NOT_VARIANT.get(section, ())
        if drop is None:
            continue
        kept[section] = {k: v for k, v in values.items() if k not in drop} if isinstance(values, dict) else values
    return json.dumps(kept, sort_keys=True, default=str)


def label_of(run: Run, pattern: str | None) -> str:
    """--label with each {dotted.key} replaced by the run's config value, or the directory name without its
    seed suffix."""
    if pattern is None:
        return SEED_SUFFIX.sub("", run.path.name) or run.path.name

    def value(match: re.Match) -> str:
        node = run.config
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise RunError(f"--label: {{{match.group(1)}}} is not a key of {run.path / 'config.yaml'}; use "
                               "dotted keys of the config, such as {moe.top_k}")
            node = node[part]
        return str(node)
    return re.sub(r"\{([^{}]+)\}", value, pattern)


def group_runs(runs: list[Run], label: str | None = None) -> list[Variant]:
    """Variants in the order their first run was given, each with its runs sorted by seed. Two runs of one
    variant with the same seed are an error (a rerun would count twice); different variants that would get the
    same name are told apart by ' (2)', ' (3)'."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(variant_key(run.config), []).append(run)
    variants, names = [], set()
    for members in groups.values():
        members.sort(key=lambda r: r.seed)
        for a, b in zip(members, members[1:]):
            if a.seed == b.seed:
                raise RunError(f"{a.path} and {b.path} are the same variant with the same train.seed={a.seed}; "
                               "drop one, or give them different seeds")
        name, n = label_of(members[0], label), 2
        while name in names:
            name, n = f"{label_of(members[0], label)} ({n})", n + 1
        names.add(name)
        variants.append(Variant(name, members))
    return variants


def _band(values: np.ndarray) -> dict:
    """Over seeds (axis 0): mean, sample std (0 for one seed), min and max."""
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])
    return {"mean": values.mean(axis=0), "std": std, "min": values.min(axis=0), "max": values.max(axis=0)}


def val_curve(variant: Variant) -> dict | None:
    """The validation loss over seeds at the steps where every seed validated: step, tokens, elapsed_s (the mean
    over seeds), the loss of each run [runs, steps] (`per_run`, in variant.runs' order) and its mean, std, min and
    max over runs (numpy arrays); None when no step has it in every run."""
    per_run = [{r["step"]: (r["val_loss"], r.get("elapsed_s", math.nan)) for r in run.records
                if r.get("val_loss") is not None} for run in variant.runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    if not steps:
        return None
    loss = np.array([[p[s][0] for s in steps] for p in per_run], dtype=float)
    elapsed = np.array([[p[s][1] for s in steps] for p in per_run], dtype=float)
    return {"step": np.array(steps), "tokens": np.array(steps) * variant.runs[0].tokens_per_step,
            "elapsed_s": elapsed.mean(axis=0), "per_run": loss, **_band(loss)}


def expert_shares(run: Run) -> tuple[np.ndarray, list[int], np.ndarray] | None:
    """(steps [T], MoE layers [L], shares [L, E, T]): each log interval's assignments per expert over the layer's
    assignments of that interval. None for a dense run."""
    layers = run.moe_layers()
    if not layers:
        return None
    rows = [r for r in run.records if all(f"moe/{i}/tokens_per_expert" in r for i in layers)]
    counts = np.array([[r[f"moe/{i}/tokens_per_expert"] for r in rows] for i in layers], dtype=float)  # [L, T, E]
    total = counts.sum(axis=2, keepdims=True)
    shares = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    return np.array([r["step"] for r in rows]), layers, shares.transpose(0, 2, 1)


def drops(variant: Variant) -> bool:
    """Whether the variant has a capacity that can drop (padded, factor > 0) or dropped any assignment."""
    moe = variant.runs[0].config["moe"]
    capacity = moe.get("num_experts") and moe.get("backend") == "padded" and moe.get("capacity", {}).get("factor")
    return bool(capacity) or any(v for run in variant.runs for r in run.records for k, v in r.items()
                                 if k.endswith("/dropped_frac"))


def dropped_curve(variant: Variant) -> dict | None:
    """The dropped fraction, mean over MoE layers (each layer routes the same number of assignments, so this is
    the fraction of all), at the steps every seed logged: step, tokens, and its mean, std, min and max over
    seeds. None for a variant without MoE layers."""
    per_run = []
    for run in variant.runs:
        keys = [f"moe/{i}/dropped_frac" for i in run.moe_layers()]
        per_run.append({r["step"]: float(np.mean([r[k] for k in keys])) for r in run.records
                        if keys and all(r.get(k) is not None for k in keys)})
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    if not steps:
        return None
    frac = np.array([[p[s] for s in steps] for p in per_run])
    return {"step": np.array(steps), "tokens": np.array(steps) * variant.runs[0].tokens_per_step, **_band(frac)}


def summary(variant: Variant) -> dict:
    """The variant's row of a results table: the final validation loss (the last step every seed validated) as
    mean, std, min and max over seeds; its tokens; the wall time and steady tokens/s (log intervals after the
    first, median per run), mean over seeds; the mean dropped fraction where it drops."""
    curve = val_curve(variant)
    final = {k: float(curve[k][-1]) for k in ("mean", "std", "min", "max")} if curve else None
    speed = [statistics.median([r.get("tokens_per_s") or math.nan for r in (run.records[1:] or run.records)])
             for run in variant.runs]
    dropped = dropped_curve(variant) if drops(variant) else None
    return {"variant": variant.name, "seeds": variant.seeds, "runs": [str(r.path) for r in variant.runs],
            "final_val_loss": final, "final_step": int(curve["step"][-1]) if curve else None,
            "tokens": int(curve["tokens"][-1]) if curve else None,
            "wall_s": statistics.mean(run.records[-1].get("elapsed_s", math.nan) for run in variant.runs),
            "tokens_per_s": statistics.mean(speed),
            "dropped_frac": float(dropped["mean"].mean()) if dropped else None}


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per variant."""
    lines = ["| variant | seeds | final val loss (mean ± std) | min - max | tokens | wall s | tokens/s | dropped |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["final_val_loss"]
        loss = f"{f['mean']:.4f} ± {f['std']:.4f}" if f else "no validation"
        spread = f"{f['min']:.4f} - {f['max']:.4f}" if f else "-"
        tokens = f"{r['tokens']:,}" if r["tokens"] else "-"
        dropped = f"{r['dropped_frac']:.2%}" if r["dropped_frac"] is not None else "-"
        lines.append(f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {loss} | {spread} | {tokens} | "
                     f"{r['wall_s']:.1f} | {r['tokens_per_s']:,.0f} | {dropped} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ drawing

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _legend_name(variant: Variant) -> str:
    n = len(variant.runs)
    return f"{variant.name} ({n} seed{'s' if n > 1 else ''})"


def plot_bands(curves: list[tuple[Variant, dict]], x: str, path: Path, xlabel: str, ylabel: str, title: str,
               percent: bool = False) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110, layout="constrained")
    for variant, c in curves:
        line, = ax.plot(c[x], c["mean"], marker="o", markersize=2.5, linewidth=1.5, label=_legend_name(variant))
        if len(variant.runs) > 1:
            ax.fill_between(c[x], c["min"], c["max"], color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if percent:
        ax.yaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_experts(variant: Variant, path: Path) -> Path | None:
    data = expert_shares(variant.runs[0])
    if data is None:
        return None
    steps, layers, shares = data
    num_experts = shares.shape[1]
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm
    grid = shares.reshape(len(layers) * num_experts, len(steps))  # rows: layer 0's experts, then layer 1's, ...
    x = np.concatenate([[0], steps])  # each record covers the steps since the previous one
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.09 * grid.shape[0] + 0.3 * len(layers)), dpi=110,
                           layout="constrained")
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1 / num_experts, vmax=max(float(grid.max()), 2 / num_experts))
    mesh = ax.pcolormesh(x, np.arange(grid.shape[0] + 1), grid, cmap="RdBu_r", norm=norm)
    for i in range(1, len(layers)):
        ax.axhline(i * num_experts, color="black", linewidth=0.8)
    ax.set_yticks([(i + 0.5) * num_experts for i in range(len(layers))], [f"MoE layer {n}" for n in layers])
    ax.invert_yaxis()  # layer 0 on top, expert 0 at the top of each layer
    ax.set(xlabel="step", title=f"{variant.name}: tokens per expert (seed {variant.runs[0].seed}), "
                                f"{num_experts} experts per layer")
    fig.colorbar(mesh, ax=ax, label=f"share of the layer\n(white: 1/{num_experts})")
    fig.savefig(path)
    plt.close(fig)
    return path


def file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "variant"


def plot_all(variants: list[Variant], out: str | Path) -> list[Path]:
    """Every figure of the module docstring that the runs have data for; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    val = [(v, c) for v in variants if (c := val_curve(v)) is not None]
    for v in variants:
        if all(v is not w for w, _ in val):
            print(f"plot_runs: {v.name} has no validation loss at a step all its seeds share (train.eval_interval "
                  "> 0 logs one); left out of the loss figures", file=sys.stderr)
    if val:
        written.append(plot_bands(val, "tokens", out / "val_loss_tokens.png", "tokens seen", "validation loss",
                                  "Validation loss against tokens (mean over seeds, band: min to max)"))
        written.append(plot_bands(val, "elapsed_s", out / "val_loss_time.png", "wall time (s, from the first step)",
                                  "validation loss", "Validation loss against wall time (mean over seeds)"))
    for v in variants:
        path = plot_experts(v, out / f"experts_{file_name(v.name)}.png")
        if path is not None:
            written.append(path)
    dropped = [(v, c) for v in variants if drops(v) and (c := dropped_curve(v)) is not None]
    if dropped:
        written.append(plot_bands(dropped, "step", out / "dropped.png", "step", "assignments dropped",
                                  "Dropped by the expert capacity (mean over layers and seeds)", percent=True))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (logging.run_dir)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--label", help="variant names from the config, e.g. 'top{moe.top_k} cf{moe.capacity.factor}' "
                   "(default: the run directory's name without its seed suffix)")
    args = p.parse_args(argv)
    try:
        variants = group_runs([load_run(d) for d in args.run_dirs], args.label)
    except RunError as e:
        print(f"plot_runs: {e}", file=sys.stderr)
        return 2
    for path in plot_all(variants, args.out):
        print(path)
    print(summary_table([summary(v) for v in variants]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
