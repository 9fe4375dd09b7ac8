"""End to end on the embedded corpus: the tiny config trains, its loss falls, its metrics are written."""
import json
from pathlib import Path

import pytest
import torch

import pretrain

CORPUS = Path("corpus/shakespeare_text_document.bin")
pytestmark = pytest.mark.skipif(not CORPUS.exists(), reason="embedded corpus missing: run scripts/setup.sh")

REQUIRED = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu",
            "mem_gib"}


def test_tiny_loss_falls_and_metrics_schema(tmp_path, capsys):
    run = tmp_path / "run"
    code = pretrain.main(["--config", "configs/tiny.yaml", "train.steps=30", "train.log_interval=5",
                          "train.eval_interval=30", f"logging.run_dir={run}", "checkpoint.save=false"])
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for r in records:
        assert REQUIRED <= set(r)
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert (r["mfu"] is None) == (not torch.cuda.is_available())  # no MFU on CPU (no peak to divide by)
        per_layer = {k.split("/")[-1] for k in r if k.startswith("moe/")}
        assert {"tokens_max", "tokens_mean", "dropped_frac"} <= per_layer
        assert all(r[k] == 0 for k in r if k.endswith("dropped_frac"))  # reference backend is dropless
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert "val_loss" in records[-1] and records[-1]["val_loss"] < records[0]["loss"]
    assert (run / "config.yaml").exists()
    out = capsys.readouterr().out
    # the start-up summary, and lines that tell time
    assert "MoE 4 experts top-2 in 2 of 2 blocks, backend reference" in out
    assert "batch: 2,048 tokens per step (16 sequences of 128" in out and "30 steps, 61,440 tokens" in out
    assert "layout: world 1 = tensor 1 x expert 1 x expert-data 1" in out and f"run: {run} (fresh)" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 5/30 | loss") and "| elapsed " in lines[0] and "| ETA " in lines[0]
    assert "| ETA 0s" in lines[-1] and all("tokens_per_s" in line for line in lines)


def test_run_dir_of_a_previous_run_is_refused_and_resume_does_not_repeat_steps(tmp_path, capsys):
    """A second fresh run into the same logging.run_dir is refused with the fix; resume=auto continues it (and
    metrics.jsonl gets each step once); logging.overwrite=true starts over with the old files moved aside."""
    run = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", "train.steps=4", "train.log_interval=1", "train.eval_interval=0",
            f"logging.run_dir={run}", "checkpoint.interval=2"]
    assert pretrain.main(args) == 0
    capsys.readouterr()
    assert pretrain.main(args) == 2
    err = capsys.readouterr().err
    assert "holds a previous run (metrics.jsonl, checkpoints/)" in err and "checkpoint.resume=auto" in err
    # resume from step 2 (as after a crash at step 3): steps 3 and 4 are done again, logged once each
    (run / "checkpoints" / "latest").write_text((run / "checkpoints" / "latest").read_text().replace("step-4",
                                                                                                       "step-2"))
    assert pretrain.main(args + ["checkpoint.resume=" + str(run / "checkpoints" / "step-2")]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert pretrain.main(args + ["logging.overwrite=true"]) == 0
    assert "the previous run's files moved to" in capsys.readouterr().out
    moved = list(run.glob("previous-*"))
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").is_file() and (moved[0] / "checkpoints").is_dir()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
