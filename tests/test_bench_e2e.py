"""benchmarks/bench_e2e.py on the CPU: a run that trains and one that fails, in one job; profile_step.py's phases."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_e2e_tables_a_run_and_a_failed_one(tmp_path):
    """The tiny config trains (its steady-state tokens/s and losses are in the table and the JSON); a spec with a
    bad override fails at start-up and is listed as failed after it, without losing the first row."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_e2e.py"), "--configs", "tiny,tiny@moe.backend=magic",
         "--steps", "4", "--log-interval", "2", "--micro-batch", "2", "--vocab", "128", "--no-compile",
         "--no-baseline", "--run-root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
         "--set", f"data.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (md,), (js,) = (tmp_path / "out").glob("*-e2e.md"), (tmp_path / "out").glob("*-e2e.json")
    rows = json.loads(js.read_text())["rows"]
    assert [r["config"] for r in rows] == ["tiny", "tiny@moe.backend=magic"]
    ok, bad = rows
    assert ok["tokens_per_s"] > 0 and ok["step_time_s"] > 0 and math.isfinite(ok["final_loss"]), ok
    assert "exited with 2" in bad["error"], bad  # pretrain.py's configuration-error exit
    table = md.read_text().splitlines()
    assert table[-2].startswith("| tiny | ") and table[-1] == "| tiny@moe.backend=magic | failed | | | | | | |"


def test_profile_phases_put_the_sinkhorn_pick_in_the_router():
    """benchmarks/profile_step.py's phases from names: the router's Sinkhorn op is routing, the other moetron ops
    the MoE's, and the enclosing labels (optimizer, LM loss) come first."""
    from benchmarks.profile_step import ROUTING, phase_of

    assert phase_of("_sinkhorn_round", ["_sinkhorn_round", "moetron::sinkhorn_rounds"]) == ROUTING
    assert phase_of("_scatter_mm_kernel", ["moetron::scatter_mm"]) == "MoE kernels (experts, dispatch, combine)"
    assert phase_of("aten::mm", ["aten::mm", "lm_loss"]) == "LM head + loss"
    assert phase_of("aten::_fused_adamw_", ["Optimizer.step#AdamW.step"]) == "optimizer"
    assert phase_of("aten::topk", []) == ROUTING and phase_of("aten::mm", []).startswith("GEMMs")
