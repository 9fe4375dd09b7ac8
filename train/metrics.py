"""One metrics record per log interval: a console line, a JSONL line, and optionally wandb and TensorBoard.

Only rank 0 writes. wandb runs offline when there is no API key (or when going online fails), with a short
init timeout, so a run never hangs on the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CONSOLE_KEYS = [("step", "{:d}"), ("loss", "{:.4f}"), ("lm_loss", "{:.4f}"), ("aux_loss", "{:.4f}"),
                ("z_loss", "{:.3f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:,.0f}"),
                ("tflops", "{:.1f}"), ("mfu", "{:.1%}"), ("mem_gib", "{:.2f}"),
                ("val_loss", "{:.4f}")]


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, wandb: bool = False, wandb_project: str = "moetron",
                 tensorboard: bool = False, config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = self.tb = None
        if not enabled:
            return
        if wandb:
            self.wandb = _start_wandb(wandb_project, Path(run_dir), config)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def resume_at(self, step: int) -> None:
        """Continue metrics.jsonl after `step` (a resumed run): records of later steps, which the run will log
        again, are dropped, so every step appears once."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and _step(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        print(format_line(record), flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


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
    for name in ("metrics.jsonl", "config.yaml", "checkpoints", "tensorboard", "wandb"):
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
    import wandb
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    settings = wandb.Settings(init_timeout=30, silent=True)
    try:
        return wandb.init(project=project, dir=str(run_dir), config=config, settings=settings)
    except Exception as e:  # no network or a bad key: keep the run, log offline
        print(f"wandb: going offline ({type(e).__name__}: {e})", flush=True)
        os.environ["WANDB_MODE"] = "offline"
        return wandb.init(project=project, dir=str(run_dir), config=config, mode="offline", settings=settings)
