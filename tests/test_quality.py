"""The learning-quality study: scripts/plot_runs.py on hand-made run directories (grouping of seeds, the series
behind each figure, the PNGs, clear errors) and benchmarks/quality.py (its grid, every config of it, and the
whole job with a stand-in for pretrain.py)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import quality
from scripts import plot_runs
from train.config import load_config, save_config

BASE = "configs/quality.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, overrides: list[str], records: list[dict]) -> Path:
    """A run directory as pretrain.py leaves it: the resolved config and one JSON record per log interval."""
    run_dir.mkdir(parents=True)
    save_config(load_config(BASE, [*overrides, f"logging.run_dir={run_dir}"]), run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def records(seed: int, layers: int = 2, experts: int = 4, dropped: float = 0.0) -> list[dict]:
    """Four log intervals (steps 10..40), validation at 20 and 40; counts and losses that differ by seed."""
    out = []
    for i, step in enumerate((10, 20, 30, 40)):
        r = {"step": step, "loss": 5.0 - i, "elapsed_s": 1.5 * step + seed, "tokens_per_s": 1000.0 + 10 * i}
        if step % 20 == 0:
            r["val_loss"] = 6.0 - 0.5 * i + 0.1 * seed
        for layer in range(layers):
            r[f"moe/{layer}/tokens_per_expert"] = [seed + layer + e * (i + 1) for e in range(experts)]
            r[f"moe/{layer}/dropped_frac"] = dropped * (layer + 1) / (i + 1)
        out.append(r)
    return out


@pytest.fixture
def study(tmp_path):
    """Variant a (top-1 dropless) with seeds 2 and 1 given out of order, variant b (top-1 cf 1, which drops)
    with seed 1, and a dense variant."""
    dirs = [write_run(tmp_path / "a-s2", ["train.seed=2"], records(2)),
            write_run(tmp_path / "b-s1", ["train.seed=1", "moe.backend=padded"], records(1, dropped=0.2)),
            write_run(tmp_path / "a-s1", ["train.seed=1"], records(1)),
            write_run(tmp_path / "dense_seed1", ["train.seed=1", "moe.num_experts=0"],
                      [{k: v for k, v in r.items() if not k.startswith("moe/")} for r in records(1)])]
    return dirs


def test_seeds_form_one_variant_and_the_band_is_over_seeds(study):
    variants = plot_runs.group_runs([plot_runs.load_run(d) for d in study])
    assert [(v.name, v.seeds) for v in variants] == [("a", [1, 2]), ("b", [1]), ("dense", [1])]
    curve = plot_runs.val_curve(variants[0])
    val = np.array([[6.0 - 0.5 + 0.1 * s, 6.0 - 1.5 + 0.1 * s] for s in (1, 2)])  # steps 20, 40
    assert curve["step"].tolist() == [20, 40]
    assert curve["tokens"].tolist() == [20 * 64 * 256, 40 * 64 * 256]  # step x global batch x sequence
    np.testing.assert_allclose(curve["mean"], val.mean(0))
    np.testing.assert_allclose(curve["std"], abs(val[0] - val[1]) / math.sqrt(2))
    np.testing.assert_allclose(curve["min"], val[0])
    np.testing.assert_allclose(curve["max"], val[1])
    np.testing.assert_allclose(curve["elapsed_s"], [30 + 1.5, 60 + 1.5])  # mean over seeds 1 and 2
    single = plot_runs.val_curve(variants[1])
    assert single["std"].tolist() == [0, 0] and single["min"].tolist() == single["max"].tolist()


def test_heatmap_data_is_each_experts_share_of_its_layer(study):
    run = plot_runs.load_run(study[0])  # seed 2
    steps, layers, shares = plot_runs.expert_shares(run)
    assert steps.tolist() == [10, 20, 30, 40] and layers == [0, 1] and shares.shape == (2, 4, 4)  # [L, E, T]
    for layer in layers:
        for t, record in enumerate(run.records):
            counts = np.array(record[f"moe/{layer}/tokens_per_expert"], dtype=float)
            np.testing.assert_allclose(shares[layer, :, t], counts / counts.sum())
    assert plot_runs.expert_shares(plot_runs.load_run(study[3])) is None  # dense


def test_dropped_fraction_and_summary(study):
    variants = plot_runs.group_runs([plot_runs.load_run(d) for d in study])
    a, b, dense = variants
    assert [plot_runs.drops(v) for v in variants] == [False, True, False]
    curve = plot_runs.dropped_curve(b)
    np.testing.assert_allclose(curve["mean"], [0.2 * 1.5 / (i + 1) for i in range(4)])  # mean of layers 1x, 2x
    row = plot_runs.summary(a)
    assert row["seeds"] == [1, 2] and row["final_step"] == 40 and row["tokens"] == 40 * 64 * 256
    assert row["final_val_loss"]["mean"] == pytest.approx(4.5 + 0.15)
    assert row["final_val_loss"]["std"] == pytest.approx(0.1 / math.sqrt(2))
    assert row["wall_s"] == pytest.approx(60 + 1.5) and row["dropped_frac"] is None
    assert plot_runs.summary(b)["dropped_frac"] == pytest.approx(float(curve["mean"].mean()))
    table = plot_runs.summary_table([row, plot_runs.summary(b)])
    assert "| a | 1,2 | 4.6500 ± 0.0707 | 4.6000 - 4.7000 | 655,360 |" in table


def test_plot_runs_writes_the_pngs(study, tmp_path, capsys):
    out = tmp_path / "figures"
    assert plot_runs.main([*map(str, study), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["dropped.png", "experts_a.png", "experts_b.png", "val_loss_time.png", "val_loss_tokens.png"]
    assert all((out / n).read_bytes()[:8] == PNG and (out / n).stat().st_size > 5000 for n in names)
    assert "| dense | 1 |" in capsys.readouterr().out


def test_label_pattern_names_variants_from_the_config(study):
    runs = [plot_runs.load_run(d) for d in study]
    assert [v.name for v in plot_runs.group_runs(runs, "e{moe.num_experts} {moe.backend}")] == [
        "e16 grouped", "e16 padded", "e0 grouped"]
    with pytest.raises(plot_runs.RunError, match=r"\{moe.topk\} is not a key"):
        plot_runs.group_runs(runs, "{moe.topk}")


def test_the_same_seed_twice_is_refused(tmp_path):
    dirs = [write_run(tmp_path / name, ["train.seed=1"], records(1)) for name in ("x-s1", "y-s1")]
    with pytest.raises(plot_runs.RunError, match="same variant with the same train.seed=1"):
        plot_runs.group_runs([plot_runs.load_run(d) for d in dirs])


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "metrics.jsonl").unlink(), "metrics.jsonl: no such file"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 10}\n{"step": 20, "loss"\n'),
     "metrics.jsonl:2: not a JSON record"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 20}\n{"step": 10}\n'), "step 10 follows step 20"),
    (lambda d: (d / "metrics.jsonl").write_text('{"loss": 3}\n'), "without an integer 'step'"),
    (lambda d: (d / "metrics.jsonl").write_text(""), "holds no record"),
    (lambda d: (d / "config.yaml").unlink(), "no config.yaml"),
])
def test_a_bad_run_directory_is_one_clear_line(tmp_path, capsys, damage, message):
    run = write_run(tmp_path / "r-s1", ["train.seed=1"], records(1))
    damage(run)
    assert plot_runs.main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(run) in err and err.count("\n") == 1


def test_quality_grid_and_every_config_in_it():
    full = quality.build_grid(quality.parse_args([]))
    assert [(j.variant, j.seed) for j in full[:3]] == [("dense", 1), ("dense", 2), ("top1-dropless", 1)]
    assert len(full) == 2 * len(quality.VARIANTS) and len({j.run_dir for j in full}) == len(full)
    cfgs = {(j.variant, j.seed): load_config(BASE, j.overrides) for j in full}
    for (name, seed), cfg in cfgs.items():
        m, t = cfg.moe, cfg.train
        assert t.seed == seed and t.steps == 500 and (t.log_interval, t.eval_interval) == (5, 25)
        assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.data.seq_length) == (4, 256, 256)
        assert (t.global_batch_size, t.lr) == (64, 1e-3)
        assert m.num_experts == (0 if name == "dense" else 16)
        if name != "dense":
            assert m.top_k == int(name[3])
            assert (m.backend, m.capacity.factor) == (("padded", 1.0) if "cf1" in name else ("grouped", 1.0))
            assert m.capacity.rectify_intra == m.capacity.rectify_fill == ("rectify" in name)
            assert m.router.type == ("sparsemixer" if "sparsemixer" in name else "softmax")
    smoke = quality.build_grid(quality.parse_args(["--smoke", "--seeds", "3,4", "--set", "train.lr=2e-3"]))
    assert [(j.variant, j.seed) for j in smoke] == [("top1-dropless", 3), ("top1-dropless", 4), ("top1-cf1", 3),
                                                   ("top1-cf1", 4)]
    for job in smoke:
        cfg = load_config(BASE, job.overrides)
        assert (cfg.model.hidden_size, cfg.moe.num_experts, cfg.train.device, cfg.train.steps) == (32, 4, "cpu", 20)
        assert cfg.moe.backend == ("padded" if job.variant == "top1-cf1" else "reference") and cfg.train.lr == 2e-3
        assert cfg.data.paths == ["corpus/shakespeare_text_document"] and cfg.data.valid_paths == []
    english = quality.build_grid(quality.parse_args(["--corpus", "english", "--variants", "dense", "--steps", "40"]))
    cfg = load_config(BASE, english[0].overrides)
    assert cfg.data.valid_paths == ["corpus/english/english_valid_text_document"] and cfg.train.steps == 40
    paper = quality.build_grid(quality.parse_args(["--base", "configs/moe_xs.yaml", "--variants",
                                                   "dense,top1-dropless", "--seeds", "1", "--steps", "954",
                                                   "--set", "train.global_batch_size=512"]))
    assert [j.command[2:4] for j in paper] == [["--config", str(Path("configs/moe_xs.yaml").resolve())]] * 2
    dense, moe = (load_config(j.base, j.overrides) for j in paper)
    for cfg in (dense, moe):  # the paper's sizes and batch, the English corpus when built
        assert (cfg.model.hidden_size, cfg.data.seq_length, cfg.train.global_batch_size) == (512, 1024, 512)
        assert cfg.train.steps == 954 and cfg.train.eval_interval % cfg.train.log_interval == 0
    assert (dense.moe.num_experts, moe.moe.num_experts, moe.moe.top_k) == (0, 64, 1)
    with pytest.raises(quality.ConfigError, match="--variants names \\['top3'\\]"):
        quality.build_grid(quality.parse_args(["--variants", "top1-cf1,top3"]))
    with pytest.raises(quality.ConfigError, match="--seeds"):
        quality.build_grid(quality.parse_args(["--seeds", "1,1"]))


def test_quality_job_end_to_end_with_a_stand_in_for_pretrain(tmp_path, capsys):
    """The whole job (grid, runs, summary .md and .json, figures, --skip-done) with `run` standing in for
    pretrain.py: it writes each run's resolved config, as pretrain.py does, and made-up metrics; one run fails."""
    calls = []

    def fake_run(command, run_dir):
        overrides = command[command.index("--config") + 2:]
        cfg = load_config(command[command.index("--config") + 1], overrides)
        calls.append(Path(run_dir).name)
        if Path(run_dir).name == "top1-cf1-s2":
            return None, "pretrain.py exited with 1 (see its output)"
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(run_dir) / "config.yaml")
        recs = records(cfg.train.seed, layers=cfg.model.num_layers, experts=cfg.moe.num_experts,
                       dropped=0.1 if cfg.moe.backend == "padded" else 0.0)
        for r in recs:
            r["step"] = r["step"] // 2  # steps 5..20 of train.steps=20
        (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return recs, None

    args = ["--smoke", "--run-root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--figures", str(tmp_path / "fig")]
    assert quality.main(args, run=fake_run) == 1  # one run failed
    assert calls == ["top1-dropless-s1", "top1-dropless-s2", "top1-cf1-s1", "top1-cf1-s2"]
    (md,) = (tmp_path / "out").glob("*-cpu-quality-smoke.md")
    result = json.loads(md.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["top1-dropless"]["seeds"] == [1, 2] and rows["top1-cf1"]["seeds"] == [1]
    assert rows["top1-dropless"]["final_val_loss"]["mean"] == pytest.approx(4.5 + 0.15)
    assert rows["top1-cf1"]["dropped_frac"] > 0 and rows["top1-dropless"]["dropped_frac"] is None
    assert result["failed"] == [{"variant": "top1-cf1", "seed": 2, "run_dir": str(tmp_path / "runs/top1-cf1-s2"),
                                 "error": "pretrain.py exited with 1 (see its output)"}]
    text = md.read_text()
    assert "CPU smoke run" in text and "| top1-dropless | 1,2 | 4.6500 ± 0.0707 |" in text
    assert "top1-cf1 seed 2: failed" in text
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {
        "val_loss_tokens.png", "val_loss_time.png", "dropped.png", "experts_top1-dropless.png", "experts_top1-cf1.png"}
    capsys.readouterr()
    calls.clear()  # again with --skip-done: only the failed run runs again
    assert quality.main([*args, "--skip-done"], run=fake_run) == 1
    assert calls == ["top1-cf1-s2"] and capsys.readouterr().out.count("holds this run finished; reused") == 3


def val_records(seed: int, losses: list[float]) -> list[dict]:
    """Validation at steps 10, 20, ...: the given losses."""
    return [{"step": 10 * (i + 1), "loss": v, "val_loss": v, "elapsed_s": float(i), "tokens_per_s": 1.0}
            for i, v in enumerate(losses)]


def test_claims_are_judged_seed_by_seed_and_by_steps_to_the_target(tmp_path):
    from benchmarks import quality_claims
    root, out = tmp_path / "grid", tmp_path / "out"
    curves = {  # variant -> overrides, losses of seed 1, losses of seed 2
        "dense": (["moe.num_experts=0"], [6, 5, 4.0], [6, 5, 4.2]),
        "top1-dropless": (["moe.top_k=1"], [6, 5, 3.9], [6, 5, 4.3]),  # lower for seed 1 only: undecided
        "top1-sparsemixer": (quality.VARIANTS["top1-sparsemixer"], [6, 4.0, 3.5], [6, 4.2, 3.5]),  # mean 4.1 at 20
    }
    for name, (overrides, *by_seed) in curves.items():
        for seed, losses in enumerate(by_seed, 1):
            write_run(root / f"{name}-s{seed}", [*overrides, f"train.seed={seed}"], val_records(seed, losses))
    rows = {(r["claim"], r["candidate"]): r for r in quality_claims.judge([root], out)}
    assert set(rows) == {("moe-vs-dense", "top1-dropless")}  # sparsemixer's claim needs its other pair too
    r = rows["moe-vs-dense", "top1-dropless"]
    assert r["deltas"] == pytest.approx([-0.1, 0.1]) and r["verdict"].startswith("undecided")
    assert (out / "moe-vs-dense-grid.png").read_bytes().startswith(PNG)

    from benchmarks.quality_claims import compare_steps
    variants = {v.name: v for v in plot_runs.group_runs([plot_runs.load_run(d) for d in sorted(root.iterdir())])}
    s = compare_steps(variants["top1-dropless"], variants["top1-sparsemixer"])  # target: 4.1, the mean at step 30
    assert (s["target"], s["baseline_steps"], s["candidate_steps"]) == (pytest.approx(4.1), 30, 20)
    assert s["speedup"] == pytest.approx(1.5) and s["verdict"] == "confirmed"
    refused = compare_steps(variants["top1-sparsemixer"], variants["dense"])  # dense never reaches 3.5
    assert refused["candidate_steps"] is None and refused["verdict"].startswith("refuted")
