"""One metrics record per log interval, the same values in every sink: a console line, metrics.jsonl, and
optionally wandb and TensorBoard. Only rank 0 writes.

The record (Trainer.record): scalars by name (`loss`, `lr`, `moe/<layer>/tokens_max`, ...; None where a value does
not apply, such as MFU on a CPU) and, per MoE layer, `moe/<layer>/tokens_per_expert`: the [E] assignments per
expert summed over the interval (moe/stats.py). Each sink writes it as:
    console        the main scalars, the highest max/mean load of any layer, the mean dropped fraction
    metrics.jsonl  the record as it is, the per-expert counts as lists of ints
    wandb          the scalars (None left out); each per-expert list as a wandb.Histogram with one bin per expert
                   (edges e - 0.5, e + 0.5) holding its count: wandb draws a histogram logged over steps as a
                   heatmap, so each layer's panel is its load heatmap (step x expert) without a custom chart, and
                   the history keeps the exact counts (a per-expert scalar would give L x E line charts, a Table
                   per step an artifact per step); the resolved config as the run's config
    TensorBoard    the scalars; each list as a histogram with one bucket per expert (add_histogram_raw: the exact
                   counts, shown over steps in the Histograms and Distributions tabs); the config as text
A resumed run continues after its checkpoint's step in every sink: metrics.jsonl drops the later records,
TensorBoard hides the later events (purge_step), and wandb continues the same run: its id and the last step
sent to it are kept in <run_dir>/wandb.json, and steps wandb already holds are not sent again (a wandb run's
history only grows; its rewind is a private preview).

wandb runs offline when there is no API key (or when going online fails), with a short init timeout, so a run
never hangs on the network.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import yaml

CONSOLE_KEYS = [("step", "{:d}"), ("loss", "{:.4f}"), ("lm_loss", "{:.4f}"), ("aux_loss", "{:.4f}"),
                ("z_loss", "{:.3f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:,.0f}"),
                ("tflops", "{:.1f}"), ("mfu", "{:.1%}"), ("mem_gib", "{:.2f}"),
                ("val_loss", "{:.4f}")]
WANDB_STATE = "wandb.json"  # {"id": the wandb run id, "step": the last step sent to it}


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, wandb: bool = False, wandb_project: str = "moetron",
                 tensorboard: bool = False, config: dict | None = None):
        """Nothing is opened until `start`; `config` is the resolved config (wandb's config, TensorBoard text)."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.want_wandb, self.want_tb, self.project, self.config = wandb, tensorboard, wandb_project, config
        self.wandb = self.tb = None
        self.wandb_step = 0  # the last step the wandb run holds
        self.started = False

    def start(self, step: int = 0) -> None:
        """Open the sinks for a run that continues after `step` (0: from the start). Records of later steps that
        an earlier run in this run_dir logged (this run logs them again) are dropped from metrics.jsonl and
        hidden in TensorBoard, so every step appears once."""
        self.started = True
        if not self.enabled:
            return
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and _step(line) <= step]
            _write_atomic(self.path, "".join(line + "\n" for line in kept))
        if self.want_tb:
            from torch.utils.tensorboard import SummaryWriter
            folder = self.run_dir / "tensorboard"
            # purge_step: TensorBoard ignores the events of steps >= it written before this writer's
            self.tb = SummaryWriter(str(folder), purge_step=step + 1 if folder.is_dir() else None)
            if self.config is not None:  # indented: Markdown shows it as code
                text = yaml.safe_dump(self.config, sort_keys=False)
                self.tb.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), step)
        if self.want_wandb:
            self.wandb, self.wandb_step = _start_wandb(self.project, self.run_dir, self.config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if not self.started:
            raise RuntimeError("MetricsLogger.log before start(step): the sinks are not open")
        step = record["step"]
        print(format_line(record), flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None and step > self.wandb_step:  # steps it holds from before a resume: kept
            self.wandb.log(wandb_values(record), step=step)
            self.wandb_step = step
            _write_atomic(self.run_dir / WANDB_STATE, json.dumps({"id": self.wandb.id, "step": step}))
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, list):
                    self.tb.add_histogram_raw(k, **expert_histogram(v), global_step=step)
                elif isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def wandb_values(record: dict) -> dict:
    """The record as wandb.log takes it: the step goes as step=, None is left out, and each per-expert list
    becomes a histogram with one bin per expert, centred on its id (a plain list past wandb's most bins)."""
    import wandb
    out = {}
    for k, v in record.items():
        if k == "step" or v is None:
            continue
        if isinstance(v, list) and len(v) <= wandb.Histogram.MAX_LENGTH:
            v = wandb.Histogram(np_histogram=(v, [e - 0.5 for e in range(len(v) + 1)]))
        out[k] = v
    return out


def expert_histogram(counts: list[int]) -> dict:
    """add_histogram_raw's arguments for [E] counts per expert: bucket e holds expert e's count (right edge
    e + 0.5); min, max, sum and sum of squares are those of the expert ids, each assignment one sample."""
    used = [e for e, c in enumerate(counts) if c]
    return {"min": used[0] if used else 0, "max": used[-1] if used else 0, "num": sum(counts),
            "sum": sum(e * c for e, c in enumerate(counts)),
            "sum_squares": sum(e * e * c for e, c in enumerate(counts)),
            "bucket_limits": [e + 0.5 for e in range(len(counts))], "bucket_counts": counts}


class MetricsError(ValueError):
    """A metrics.jsonl that cannot be read: the message names the file, the line and what to do."""


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in order. MetricsError (one line) for a missing file, a line that is not a
    JSON object with an integer step, or steps that do not increase (two runs appended into one file)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such file; is {path.parent} a run directory (logging.run_dir) of a run "
                           "that reached its first log interval?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsError(f"{path}: cannot be read ({e})") from None
    records, last = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise MetricsError(f"{path}:{n}: not a JSON record ({e.args[0].split(':')[0]}); the file is damaged: "
                               "delete that line or rerun") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise MetricsError(f"{path}:{n}: a record without an integer 'step'; not a metrics.jsonl of moetron")
        if step <= last:
            raise MetricsError(f"{path}:{n}: step {step} follows step {last}; the file mixes runs: give each run "
                               "its own logging.run_dir")
        records.append(record)
        last = step
    if not records:
        raise MetricsError(f"{path}: holds no record; the run stopped before its first log interval")
    return records


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # not a record of ours: dropped


def previous_run(run_dir: Path) -> list[str]:
    """The files of a previous run in `run_dir` (metrics, checkpoints), or []."""
    found = [name for name in ("metrics.jsonl",) if (run_dir / name).is_file()]
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    return found


def set_aside(run_dir: Path) -> Path:
    """Move the previous run's files into <run_dir>/previous-<time>/ (logging.overwrite): nothing is deleted."""
    import time
    target = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir()
    for name in ("metrics.jsonl", "config.yaml", "checkpoints", "tensorboard", "wandb", WANDB_STATE):
        if (run_dir / name).exists():
            os.replace(run_dir / name, target / name)
    return target


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_line(record: dict) -> str:
    parts = []
    for key, fmt in CONSOLE_KEYS:
        if record.get(key) is not None:
            parts.append(f"{key} {fmt.format(record[key])}")
    if "total_steps" in record:
        parts[0] = f"step {record['step']}/{record['total_steps']}"
    for key, name in (("elapsed_s", "elapsed"), ("eta_s", "ETA")):
        if record.get(key) is not None:
            parts.append(f"{name} {duration(record[key])}")
    moe = [v for k, v in record.items() if k.endswith("/max_over_mean")]
    if moe:
        parts.append(f"load max/mean {max(moe):.2f}")
    drop = [v for k, v in record.items() if k.endswith("/dropped_frac")]
    if drop:
        parts.append(f"dropped {sum(drop) / len(drop):.2%}")
    return " | ".join(parts)


def _start_wandb(project: str, run_dir: Path, config: dict | None):
    """-> (the wandb run, the last step it holds). The run of <run_dir>/wandb.json continues (resume="allow"), or
    a new one starts and its id is stored there at once (so a requeue before the first log continues it too)."""
    import wandb
    state = _wandb_state(run_dir / WANDB_STATE)
    run_id, step = (state["id"], state["step"]) if state else (uuid.uuid4().hex[:16], 0)
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    args = {"project": project, "dir": str(run_dir), "config": config, "id": run_id, "resume": "allow",
            "settings": wandb.Settings(init_timeout=30, silent=True)}
    try:
        run = wandb.init(**args)
    except Exception as e:  # no network or a bad key: keep the run, log offline
        print(f"wandb: going offline ({type(e).__name__}: {e})", flush=True)
        os.environ["WANDB_MODE"] = "offline"
        run = wandb.init(**args, mode="offline")
    if state is None:
        _write_atomic(run_dir / WANDB_STATE, json.dumps({"id": run.id, "step": 0}))
    return run, step


def _wandb_state(path: Path) -> dict | None:
    """The stored {"id", "step"} of this run_dir's wandb run, or None (none yet, or unreadable: said)."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"wandb: {path} is unreadable ({e}); starting a new wandb run", flush=True)
        return None
    if isinstance(state, dict) and isinstance(state.get("id"), str) and isinstance(state.get("step"), int):
        return state
    print(f"wandb: {path} holds no run id and step; starting a new wandb run", flush=True)
    return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
