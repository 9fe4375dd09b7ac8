"""Run pretrain.py in a subprocess for a benchmark or a study, and read back the run's metrics: the one launcher
of bench_e2e.py and quality.py (each run in a process of its own: nothing of one run, such as compiled graphs,
allocator state or RNG, leaks into the next)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train.metrics import MetricsError, read_metrics  # noqa: E402


def pretrain_command(config: str | Path, overrides: list[str], run_dir: str | Path) -> list[str]:
    """pretrain.py on `config` with the dotted overrides, writing into `run_dir` (a previous run there is moved
    aside by logging.overwrite, never deleted). A relative run_dir is taken from the current directory."""
    return [sys.executable, str(ROOT / "pretrain.py"), "--config", str(config), *overrides,
            f"logging.run_dir={Path(run_dir).resolve()}", "logging.overwrite=true"]


def run_pretrain(command: list[str], run_dir: str | Path) -> tuple[list[dict] | None, str | None]:
    """Print and run `command` (from pretrain_command) from the repository root, its output going to ours.
    -> (the run's metrics records, None) or (None, why it failed)."""
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode:
        return None, f"pretrain.py exited with {done.returncode} (see its output)"
    try:
        return read_metrics(Path(run_dir).resolve() / "metrics.jsonl"), None
    except MetricsError as e:
        return None, str(e)
