"""Checkpoints (train/checkpoint.py, train/signals.py, the trainer's run loop): exact resume, atomic layout,
corruption and disk failures, preemption by SIGTERM of a real training process, non-finite step skipping,
and resharding between parallel layouts."""
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from model.gpt import GPT
from parallel.grads import GradSync
from parallel.shards import shard_spec, tag_expert_parallel, tag_tensor_parallel
from parallel.state import ParallelState
from train.checkpoint import Checkpointer, CheckpointError
from train.config import CheckpointConfig, load_config
from train.metrics import MetricsLogger
from train.plan import plan_run
from train.trainer import Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "tiny.yaml"  # made smaller still by TINY
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.vocab_size=64",
        "moe.num_experts=4", "moe.top_k=2", "moe.router.jitter_eps=0.1", "moe.router.z_loss_weight=0.001",
        "data.seq_length=16",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=12", "train.log_interval=1",
        "train.warmup_frac=0.2", "train.device=cpu", "checkpoint.interval=3", "checkpoint.keep=2"]


class FakeData:
    """The GPTData interface over fixed random tokens: batch i of the stream is the same after any restart."""
    vocab_size, eod_id = 64, 0

    def __init__(self, seq_length: int = 16, num_samples: int = 512):
        gen = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, self.vocab_size, (num_samples, seq_length + 1), generator=gen)

    def train_batches(self, consumed_samples, micro_batch_size, accumulation):
        start = consumed_samples
        while True:
            idx = torch.arange(start, start + micro_batch_size) % len(self.tokens)
            yield self.tokens[idx]
            start += micro_batch_size

    def valid_batches(self, micro_batch_size, num_batches):
        return (self.tokens[:micro_batch_size] for _ in range(num_batches))


def fake_loader() -> types.ModuleType:
    """A stand-in for the data.loader module whose GPTData is FakeData (pretrain.py imports it by name)."""
    module = types.ModuleType("data.loader")
    module.GPTData = lambda cfg, seed, **kwargs: FakeData(cfg.seq_length)
    return module


def make_trainer(run_dir: Path, *overrides: str) -> Trainer:
    cfg = load_config(TINY_YAML, [*TINY, f"logging.run_dir={run_dir}", *overrides])
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, cfg.moe, cfg.model.vocab_size, cfg.data.seq_length)
    ps = ParallelState()
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, ps, cfg.to_dict())
    return Trainer(cfg.train, plan_run(cfg, 1), model, FakeData(), ps, MetricsLogger(run_dir, enabled=False),
                   GradSync(model, ps), ckpt)


def resume_and_run(run_dir: Path, *overrides: str) -> tuple[Trainer, list[float]]:
    trainer = make_trainer(run_dir, *overrides)
    path = trainer.checkpointer.resolve(trainer.checkpointer.cfg.resume)
    if path is not None:
        trainer.load_checkpoint(path)
    return trainer, [r["loss"] for r in trainer.run()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, list[float]]:
    """An uninterrupted 12-step run (checkpoints at 3, 6, 9, 12; the newest 2 kept)."""
    run = tmp_path_factory.mktemp("straight")
    _, losses = resume_and_run(run)
    return run, losses


def steps_on_disk(run: Path) -> list[str]:
    """The checkpoint folders and the latest pointer (not the lineage record)."""
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name != "lineage.json")


def latest_of(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().split()[0]


# ---------------------------------------------------------------------------------------------- layout, exact resume

def test_layout_keep_and_latest(straight):
    run, losses = straight
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert steps_on_disk(run) == ["latest", "step-12", "step-9"]
    assert latest_of(run) == "step-12"
    folder = run / "checkpoints" / "step-12"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {".metadata", "meta.json", "rng-0.json"} <= set(manifest["files"])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 12 and meta["consumed_samples"] == 96 and meta["config"]["model"]["hidden_size"] == 32
    assert meta["layout"]["world_size"] == 1


def test_exact_resume_matches_uninterrupted(straight, tmp_path):
    """12 steps straight vs 6 steps, stop (the preemption path), resume=auto, 6 more: bit-identical losses."""
    _, losses = straight
    trainer = make_trainer(tmp_path, "checkpoint.interval=0")
    trainer.stop = _StopAfter(6)
    first = [r["loss"] for r in trainer.run()]
    assert steps_on_disk(tmp_path) == ["latest", "step-6"]
    trainer, second = resume_and_run(tmp_path, "checkpoint.resume=auto")
    assert trainer.step == 12 and first + second == losses


class _StopAfter:
    """Stands in for StopRequest: asks to stop once `step` steps have run."""

    def __init__(self, step: int):
        self.step, self.calls, self.received = step, 0, "test"

    def agreed(self) -> bool:
        self.calls += 1
        return self.calls >= self.step


def test_async_save_gives_the_same_checkpoint(straight, tmp_path):
    """Training goes on while step 9 is written in the background: the checkpoint still holds step 9's state."""
    run, losses = straight
    trainer, got = resume_and_run(tmp_path, "checkpoint.async_save=true")
    assert got == losses and steps_on_disk(tmp_path) == ["latest", "step-12", "step-9"]
    for step in (9, 12):
        a, b = make_trainer(run), make_trainer(tmp_path)
        a.load_checkpoint(run / "checkpoints" / f"step-{step}")
        b.load_checkpoint(tmp_path / "checkpoints" / f"step-{step}")
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    trainer, more = resume_and_run(tmp_path, "checkpoint.resume=auto", "train.steps=13")
    assert trainer.step == 13 and len(more) == 1


# ---------------------------------------------------------------------------------------------- bad checkpoints

@pytest.fixture
def copied(straight, tmp_path) -> Path:
    """A copy of the straight run's checkpoints (step-9, step-12) to damage."""
    shutil.copytree(straight[0] / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def _data_file(folder: Path) -> Path:
    return next(folder.glob("*.distcp"))


@pytest.mark.parametrize("damage, message", [
    (lambda f: _data_file(f).unlink(), "is missing"),
    (lambda f: os.truncate(_data_file(f), 100), "truncated"),
    (lambda f: _flip_byte(_data_file(f)), "corrupted"),
    (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda f: (f / "rng-0.json").write_text("{}"), "rng-0.json has 2 bytes"),
])
def test_damaged_checkpoint_is_named_and_auto_falls_back(copied, capsys, damage, message):
    folder = copied / "checkpoints" / "step-12"
    damage(folder)
    trainer = make_trainer(copied)
    with pytest.raises(CheckpointError, match=message) as err:
        trainer.load_checkpoint(folder)
    assert str(folder) in str(err.value)
    with pytest.raises(CheckpointError, match=message):
        trainer.checkpointer.resolve(str(folder))
    assert trainer.checkpointer.resolve("auto") == copied / "checkpoints" / "step-9"
    assert "falling back to" in capsys.readouterr().out


def _reseal(folder: Path) -> None:
    """Rewrite the manifest to match the files: what whoever hands you a checkpoint can do."""
    from train.checkpoint_storage import _file_entry
    files = {p.name: _file_entry(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"step": 12, "files": files}))


class _Payload:
    """Unpickling this creates a marker file: a stand-in for any code a tampered file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _poison_metadata(folder: Path) -> None:
    import pickle
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(folder.parent.parent / "marker")))


@pytest.mark.parametrize("damage, names, message", [
    (lambda f: (f / "meta.json").write_text("{not json"), "meta.json", "is not valid JSON"),
    (lambda f: (f / "meta.json").write_text(""), "meta.json", "is not valid JSON"),
    (lambda f: (f / "meta.json").write_text('{"step": 12}'), "meta.json", "has no valid 'layout'"),
    (lambda f: (f / "meta.json").write_text("[12]"), "meta.json", "holds a list"),
    (lambda f: (f / "rng-0.json").write_bytes(b"\xff\xfe\x00binary"), "rng-0.json", "is not valid JSON"),
    (lambda f: (f / "rng-0.json").write_text('{"python": 1}'), "rng-0.json", "lacks the generator states"),
    (_poison_metadata, ".metadata", f"holds a pickled {open.__module__}.open, which DCP metadata never holds"),
], ids=["meta-syntax", "meta-empty", "meta-no-layout", "meta-list", "rng-binary", "rng-fields", "pickle-payload"])
def test_damaged_file_with_a_consistent_manifest_is_named(copied, capsys, damage, names, message):
    """Each file the loader reads, damaged and the manifest rewritten to match: one CheckpointError naming the
    file (no traceback from json, pickle or the loader), nothing run, and auto falls back past it."""
    folder = copied / "checkpoints" / "step-12"
    damage(folder)
    _reseal(folder)
    trainer = make_trainer(copied)
    with pytest.raises(CheckpointError, match=message) as err:
        trainer.load_checkpoint(folder)
    assert str(folder / names) in str(err.value) and "\n" not in str(err.value)
    assert not (copied / "marker").exists()
    assert trainer.checkpointer.resolve("auto") == copied / "checkpoints" / "step-9"
    assert "falling back to" in capsys.readouterr().out


def test_pickle_payload_in_the_tensor_data_runs_no_code(copied):
    """DCP reads each tensor with torch.load(weights_only=True): a payload in the data file is refused."""
    import pickle
    folder = copied / "checkpoints" / "step-12"
    data = _data_file(folder)
    payload = pickle.dumps(_Payload(copied / "marker"))
    data.write_bytes(payload * (data.stat().st_size // len(payload) + 1))
    _reseal(folder)
    with pytest.raises(CheckpointError, match="reading checkpoint .* failed"):
        make_trainer(copied).load_checkpoint(folder)
    assert not (copied / "marker").exists()


def test_manifest_entries_of_the_wrong_type_or_outside_the_folder(copied):
    folder = copied / "checkpoints" / "step-12"
    manifest = json.loads((folder / "manifest.json").read_text())
    trainer = make_trainer(copied)
    for files, message in (([1, 2], "not a mapping"), ({"meta.json": "abc"}, "not {bytes, sha256}"),
                           ({"../../x": {"bytes": 1, "sha256": "0"}}, "outside the checkpoint folder")):
        (folder / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(CheckpointError, match=message):
            trainer.checkpointer.resolve(str(folder))


def test_resume_path_refuses_an_unfinished_save(copied):
    tmp = copied / "checkpoints" / "step-15.tmp"
    shutil.copytree(copied / "checkpoints" / "step-12", tmp)
    with pytest.raises(CheckpointError, match="is not a step-N folder"):
        make_trainer(copied).checkpointer.resolve(str(tmp))


def test_auto_follows_the_lineage_of_latest(tmp_path, capsys):
    """Run A saves 3, 6, 9, 12; run B resumes from step-6 and saves 9 (latest). With B's step-9 damaged, auto
    takes A's step-6 (where B came from), not A's stale step-12 (forward of latest) nor A's step-9 (not on B's
    lineage)."""
    resume_and_run(tmp_path, "checkpoint.keep=5")
    b = make_trainer(tmp_path, "checkpoint.keep=5", "train.steps=9")
    b.load_checkpoint(tmp_path / "checkpoints" / "step-6")
    b.run()
    meta = json.loads((tmp_path / "checkpoints" / "step-9" / "meta.json").read_text())
    assert meta["run_id"] == b.checkpointer.run_id and meta["parent"]["step"] == 6
    assert latest_of(tmp_path) == "step-9" and (tmp_path / "checkpoints" / "step-12").is_dir()
    os.truncate(_data_file(tmp_path / "checkpoints" / "step-9"), 10)
    capsys.readouterr()
    assert make_trainer(tmp_path).checkpointer.resolve("auto") == tmp_path / "checkpoints" / "step-6"
    out = capsys.readouterr().out
    assert "skipping" in out and "step-12" not in out
    os.truncate(_data_file(tmp_path / "checkpoints" / "step-6"), 10)
    assert make_trainer(tmp_path).checkpointer.resolve("auto") == tmp_path / "checkpoints" / "step-3"


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_auto_never_silently_starts_from_scratch(copied, tmp_path, capsys):
    for step in (9, 12):
        os.truncate(_data_file(copied / "checkpoints" / f"step-{step}"), 10)
    trainer = make_trainer(copied)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        trainer.checkpointer.resolve("auto")
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.checkpointer.resolve(str(tmp_path / "nowhere" / "step-5"))
    # only an unfinished save: that is no checkpoint, and the fresh start is announced
    fresh = make_trainer(tmp_path / "fresh")
    (tmp_path / "fresh" / "checkpoints" / "step-3.tmp").mkdir(parents=True)
    assert fresh.checkpointer.resolve("auto") is None
    assert "(ignoring unfinished saves: step-3.tmp); starting from scratch" in capsys.readouterr().out


def test_resume_typo_is_a_config_error():
    from errors import ConfigError
    with pytest.raises(ConfigError, match="checkpoint.resume is 'latest'; use auto"):
        load_config(TINY_YAML, ["checkpoint.resume=latest"])


def test_latest_names_the_resumed_checkpoint_first(copied, capsys):
    (copied / "checkpoints" / "latest").write_text("step-9\n")  # a crash between the rename and the pointer
    assert make_trainer(copied).checkpointer.resolve("auto") == copied / "checkpoints" / "step-9"
    (copied / "checkpoints" / "latest").write_text("step-99\n")
    assert make_trainer(copied).checkpointer.resolve("auto") == copied / "checkpoints" / "step-12"
    assert "names step-99, which does not exist" in capsys.readouterr().out


def test_wrong_model_shape_is_explained(copied):
    trainer = make_trainer(copied, "model.hidden_size=64")
    with pytest.raises(CheckpointError, match=r"does not fit this model: model\.embed\.weight is \[64, 32\] in the "
                                              r"checkpoint but \[64, 64\] here.*model\.hidden_size: 32 saved, 64 now"):
        trainer.load_checkpoint(copied / "checkpoints" / "step-12")
    trainer = make_trainer(copied, "model.num_layers=3")
    with pytest.raises(CheckpointError, match=r"model\.blocks\.2\.ln1\.weight is missing from the checkpoint"):
        trainer.load_checkpoint(copied / "checkpoints" / "step-12")


def test_changed_global_batch_is_refused(copied):
    trainer = make_trainer(copied, "train.global_batch_size=16")
    with pytest.raises(CheckpointError, match="resume with the saved global batch size"):
        trainer.load_checkpoint(copied / "checkpoints" / "step-12")


def test_full_disk_fails_loudly_and_keeps_the_previous_checkpoint(copied, monkeypatch):
    trainer = make_trainer(copied, "checkpoint.resume=auto", "train.steps=15")
    trainer.load_checkpoint(copied / "checkpoints" / "step-12")
    before = {p.name: p.stat().st_mtime_ns for p in (copied / "checkpoints" / "step-12").iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("torch.distributed.checkpoint.filesystem._write_item", no_space)
    with pytest.raises(CheckpointError, match=r"step 15 failed .*No space left on device.*step-12 is intact"):
        trainer.run()
    assert steps_on_disk(copied) == ["latest", "step-12", "step-9"]  # no step-15, no step-15.tmp
    assert latest_of(copied) == "step-12"
    assert {p.name: p.stat().st_mtime_ns for p in (copied / "checkpoints" / "step-12").iterdir()} == before
    monkeypatch.undo()
    assert make_trainer(copied).checkpointer.resolve("auto") == copied / "checkpoints" / "step-12"


@contextlib.contextmanager
def _read_only(folder: Path):
    """No new entries in `folder`: chmod for a user; root ignores modes, so the immutable flag (ext4) for root."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        undo = ["chmod", "700", str(folder)]
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(folder)]
    else:
        pytest.skip("running as root on a filesystem without chattr +i: cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_unwritable_folder_fails_loudly_and_keeps_the_previous_checkpoint(copied):
    trainer = make_trainer(copied, "train.steps=13")
    trainer.load_checkpoint(copied / "checkpoints" / "step-12")
    with _read_only(copied / "checkpoints"):
        with pytest.raises(CheckpointError, match=r"step 13 failed .*step-12 is intact.*make .* writable"):
            trainer.run()
    assert steps_on_disk(copied) == ["latest", "step-12", "step-9"]
    assert latest_of(copied) == "step-12"
    assert make_trainer(copied).checkpointer.resolve("auto") == copied / "checkpoints" / "step-12"


# ---------------------------------------------------------------------------------------------- non-finite steps

def _poison_aux(trainer: Trainer, layer: int, bad_steps) -> None:
    """Make block `layer`'s router return a NaN aux loss during the given (0-based) steps."""
    def hook(module, args, routing):
        if trainer.step in bad_steps:
            return dataclasses.replace(routing, aux_loss=routing.aux_loss * float("nan"))
    trainer.model.blocks[layer].mlp.router.register_forward_hook(hook)


def test_nan_step_is_skipped_and_its_suspect_named(tmp_path, capsys):
    trainer = make_trainer(tmp_path, "checkpoint.save=false")
    _poison_aux(trainer, 1, {2})
    history = trainer.run()
    out = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient, step skipped (1 in a row)" in out
    assert "moe/1/aux_loss=nan" in out and "moe/0/aux_loss" not in out
    assert "grad_norm=nan" in out
    assert len(history) == 12 and trainer.step == 12 and trainer.skipped_in_row == 0
    step_counts = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert step_counts == {11.0}  # one of the 12 optimizer steps was skipped


def test_max_skipped_stops_without_saving(tmp_path, capsys):
    trainer = make_trainer(tmp_path, "train.max_skipped=2")
    _poison_aux(trainer, 0, range(6, 12))
    with pytest.raises(TrainingDiverged, match=r"2 non-finite steps in a row \(train.max_skipped=2\) up to step 8"):
        trainer.run()
    assert steps_on_disk(tmp_path) == ["latest", "step-3", "step-6"]
    assert "step 7: non-finite" in capsys.readouterr().out


def test_pretrain_exit_codes(tmp_path, monkeypatch, capsys):
    """Through pretrain.main: a diverging run exits 1 with the reason; resuming from a missing folder exits 1;
    resume=auto with no checkpoint says it starts fresh."""
    import pretrain
    monkeypatch.setitem(sys.modules, "data.loader", fake_loader())
    args = ["--config", str(TINY_YAML), *TINY, "train.eval_interval=0", "train.steps=4"]
    run = tmp_path / "run"
    assert pretrain.main([*args, f"logging.run_dir={run}", "checkpoint.resume=auto"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint.resume=auto: no checkpoint in" in out and "starting from scratch" in out
    assert steps_on_disk(run) == ["latest", "step-3", "step-4"]
    assert pretrain.main([*args, f"logging.run_dir={run}", f"checkpoint.resume={run / 'step-9'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    diverging = [*args, f"logging.run_dir={tmp_path / 'nan'}", "train.lr=1e30", "train.min_lr=0",
                 "train.max_skipped=2"]
    assert pretrain.main(diverging) == 1
    assert "non-finite steps in a row" in capsys.readouterr().err
    assert not (tmp_path / "nan" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- preemption

RUNNER = """import sys
sys.path[:0] = [{root!r}, {tests!r}]
import conftest  # the same torch thread count as this test process, so the losses can be compared
from test_checkpoint import fake_loader
sys.modules["data.loader"] = fake_loader()
import pretrain
sys.exit(pretrain.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_exits_and_resume_matches(straight, tmp_path, sig, code):
    """A real training process (pretrain.py's main on the fake data) gets SIGTERM (a scheduler) or SIGINT
    (Ctrl-C) mid-run: it finishes the step, saves, exits 0 (to be requeued) or 130 (the user stopped it); the
    same command with resume=auto ends with the uninterrupted run's losses."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    run = tmp_path / "run"
    cmd = [sys.executable, str(runner), "--config", str(TINY_YAML), *TINY, "train.eval_interval=0",
           "checkpoint.interval=0", "checkpoint.resume=auto", f"logging.run_dir={run}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(sig)
    assert proc.wait(timeout=120) == code, "".join(lines)
    stopped = [line for line in lines if line.startswith("stopping at step")]
    assert stopped and f"on {sig.name}, saving; resume with checkpoint.resume=auto" in stopped[0], "".join(lines)
    at = int(stopped[0].split()[3])
    assert 2 <= at < 12 and steps_on_disk(run) == ["latest", f"step-{at}"]
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {run / 'checkpoints' / f'step-{at}'} at step {at}" in resumed.stdout
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses == straight[1]


def _start(tmp_path, *extra):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    cmd = [sys.executable, str(runner), "--config", str(TINY_YAML), *TINY, "train.eval_interval=0",
           "checkpoint.interval=1", f"logging.run_dir={tmp_path / 'run'}", *extra]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_second_ctrl_c_stops_at_once(tmp_path):
    """Two Ctrl-C: the first asks for a clean stop, the second stops the process at once with one line and exit
    130, leaving complete checkpoints and at most an unfinished step-N.tmp, which resume=auto ignores."""
    proc = _start(tmp_path, "train.steps=200", "model.hidden_size=256", "model.num_heads=4")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):  # the first: a clean stop after this step ...
            proc.send_signal(signal.SIGINT)
        if line.startswith("stopping at step"):  # ... the second, while the final checkpoint is being saved
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, "".join(lines)
    out = "".join(lines)
    assert "interrupted: a second Ctrl-C stopped the run at once" in out and "Traceback" not in out, out
    trainer = make_trainer(tmp_path / "run")
    assert trainer.checkpointer.resolve("auto") is not None


def test_signal_during_start_up_stops_cleanly(tmp_path):
    """SIGTERM before the first step (while the model is being built) stops the run with exit 0 and a line
    saying so, not with the default action (143)."""
    proc = _start(tmp_path)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("model:"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "".join(lines)
    assert any(line.startswith("stopping before the first step on SIGTERM") for line in lines), "".join(lines)


@pytest.mark.parametrize("trial", range(4))
def test_fault_injection_resume_is_exact(straight, tmp_path, trial):
    """A signal (SIGTERM, SIGUSR1, SIGINT) or kill -9 at a random moment of a run that saves every step, then
    resume=auto until the run is done: every step's loss equals the uninterrupted run's, and at most the step in
    flight when the process died is done again (logged twice)."""
    import random
    import time

    rng = random.Random(1000 + trial)
    sig = [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGKILL][trial]
    at, delay = rng.randint(1, 9), rng.uniform(0, 0.05)
    proc = _start(tmp_path, "checkpoint.resume=auto", "checkpoint.keep=2")
    for line in proc.stdout:
        if line.startswith(f"step {at}/"):
            time.sleep(delay)  # into the save of step `at`, or the next step
            proc.send_signal(sig)
    code = proc.wait(timeout=120)
    assert code == {signal.SIGINT: 130, signal.SIGKILL: -9}.get(sig, 0), (sig, code)
    done = _start(tmp_path, "checkpoint.resume=auto", "checkpoint.keep=2")  # the requeued command
    out = done.communicate(timeout=120)[0]
    assert done.returncode == 0 and "step 12/12 |" in out, out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r["loss"])
    assert sorted(by_step) == list(range(1, 13))
    assert all(losses == [straight[1][step - 1]] * len(losses) for step, losses in by_step.items()), by_step
    assert len(records) - 12 <= 1, f"{len(records) - 12} steps done twice after {sig.name} at step {at}"


def test_stop_request_catches_sigusr1_and_restores_handlers():
    from train.signals import StopRequest
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(torch.device("cpu"))
    try:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed() and stop.received == "SIGUSR1"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


# ---------------------------------------------------------------------------------------------- resharding

class ShardedToy(torch.nn.Module):
    """Stacked experts [4, 3, 2] split along dim 0, a fused q|k|v [6, 2] whose three blocks are split separately,
    and a replicated matrix: the three kinds of tensors a tensor- or expert-parallel model holds, tagged as the
    parallel layers tag them (parallel/shards.py)."""

    def __init__(self, rank: int = 0, size: int = 1):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        experts, qkv, dense = (torch.randn(shape, generator=gen) for shape in ((4, 3, 2), (6, 2), (3, 3)))
        self.experts = torch.nn.Parameter(experts.chunk(size)[rank].clone())
        self.qkv = torch.nn.Parameter(torch.cat([block.chunk(size)[rank] for block in qkv.chunk(3)]))
        self.dense = torch.nn.Parameter(dense)
        tag_expert_parallel(self.experts)
        tag_tensor_parallel(self.qkv, 0, chunks=3)

    def slices_of(self, full: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
        """This layout's share of one-process tensors (parameters or their optimizer states)."""
        return {"experts": full["experts"].chunk(size)[rank],
                "qkv": torch.cat([block.chunk(size)[rank] for block in full["qkv"].chunk(3)]), "dense": full["dense"]}


def _toy_stepped(model: ShardedToy) -> torch.optim.AdamW:
    """One AdamW step on gradients that are an elementwise function of the weights: slices step like the whole."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = p.detach() ** 2 - 0.5
    opt.step()
    return opt


def _toy_state(model: ShardedToy, opt) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    state = {"param": {n: p.detach() for n, p in model.named_parameters()}}
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = {names[id(p)]: s[key] for p, s in opt.state.items()}
    return state


LAYOUTS = ((2, 1), (1, 2))  # (tensor, expert) parallel sizes on 2 ranks


def _gpt_stepped(layers=None):
    """The GPT of test_parallel.py's size after one AdamW step on a fixed batch (one process: layers=None)."""
    from model.config import ModelConfig
    from moe.config import MoEConfig, RouterConfig
    from train.config import TrainConfig
    from train.optim import build_optimizer
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64)
    moe_cfg = MoEConfig(num_experts=4, top_k=2, layers="1", router=RouterConfig(z_loss_weight=0.001))
    torch.manual_seed(1234)
    model = GPT(model_cfg, moe_cfg, 64, 8, layers)
    opt = build_optimizer(model, TrainConfig(lr=0.01))
    if layers is None:
        tokens = torch.randint(64, (2, 9), generator=torch.Generator().manual_seed(0))
        model(tokens[:, :-1], tokens[:, 1:])[0].backward()
        opt.step()
    return model, opt


def _expected_slice(p: torch.Tensor, full: torch.Tensor, ps) -> torch.Tensor:
    spec = shard_spec(p, ps)
    return full if spec is None else spec.local_slice(full)


def _reshard_worker(rank: int, size: int, tmp: Path, port: int, threads: int) -> None:
    """On each of `size` gloo ranks: load the one-process checkpoints into this rank's slices (the toy through its
    tags; the GPT under tensor and expert parallelism through the parallel layers' tags), check
    them against the one-process state, and save them split over the ranks. `threads`: the parent's CPU threads,
    so that the one-process reference recomputed here rounds as the saved one did (a spawned process starts
    with one thread per core: the GPU machine's 16 against the suite's 2 gave other bits)."""
    from parallel.factory import build_layers
    from parallel.state import build_state
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    try:
        world = torch.distributed.group.WORLD  # the toy's experts and q|k|v are split over both ranks
        ps = ParallelState(rank=rank, world_size=size, tp_rank=rank, tp_size=size, ep_rank=rank, ep_size=size,
                           tp_group=world, ep_group=world)
        reference = ShardedToy()
        full = _toy_state(reference, _toy_stepped(reference))
        model = ShardedToy(rank, size)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        Checkpointer(tmp / "one", CheckpointConfig(), ps, {}).load(tmp / "one" / "step-1", model, opt)
        for kind, tensors in _toy_state(model, opt).items():
            for name, want in model.slices_of(full[kind], rank, size).items():
                assert torch.equal(tensors[name], want), (rank, kind, name)
        model = ShardedToy(rank, size)
        Checkpointer(tmp / "two", CheckpointConfig(), ps, {}).save(1, model, _toy_stepped(model), {})

        reference, ref_opt = _gpt_stepped()
        want = _toy_state(reference, ref_opt)
        for tp, ep in LAYOUTS:
            ps = build_state(tp, ep, torch.device("cpu"))
            model, opt = _gpt_stepped(build_layers(ps))
            assert any(shard_spec(p, ps) is not None for p in model.parameters())
            Checkpointer(tmp / "gpt", CheckpointConfig(), ps, {}).load(tmp / "gpt" / "step-1", model, opt)
            params = dict(model.named_parameters())
            for kind, tensors in _toy_state(model, opt).items():
                for name, t in tensors.items():
                    assert torch.equal(t, _expected_slice(params[name], want[kind][name], ps)), (tp, ep, kind, name)
            Checkpointer(tmp / f"gpt-tp{tp}-ep{ep}", CheckpointConfig(), ps, {}).save(1, model, opt, {})
    finally:
        torch.distributed.destroy_process_group()


def test_checkpoints_move_between_layouts(tmp_path):
    """Saved by one process, loaded split over 2 gloo ranks; saved by the 2 ranks, loaded by one process:
    parameters and Adam states equal the one-process run's, bit for bit. For a toy model with the
    tags of parallel/shards.py (experts split, fused qkv split per block), and for the GPT under tp=2 and ep=2."""
    reference = ShardedToy()
    opt = _toy_stepped(reference)
    Checkpointer(tmp_path / "one", CheckpointConfig(), ParallelState(), {}).save(1, reference, opt, {})
    gpt, gpt_opt = _gpt_stepped()
    Checkpointer(tmp_path / "gpt", CheckpointConfig(), ParallelState(), {}).save(1, gpt, gpt_opt, {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_reshard_worker, args=(2, tmp_path, port, torch.get_num_threads()), nprocs=2)
    meta = json.loads((tmp_path / "two" / "step-1" / "meta.json").read_text())
    assert meta["layout"]["world_size"] == 2 and {"rng-0.json", "rng-1.json"} <= set(
        json.loads((tmp_path / "two" / "step-1" / "manifest.json").read_text())["files"])
    cases = [("two", reference, opt, ShardedToy())] + [
        (f"gpt-tp{tp}-ep{ep}", gpt, gpt_opt, _gpt_stepped(None)[0]) for tp, ep in LAYOUTS]
    for folder, ref, ref_opt, model in cases:
        fresh_opt = (torch.optim.AdamW(model.parameters(), lr=0.1) if isinstance(model, ShardedToy)
                     else _fresh_optimizer(model))
        Checkpointer(tmp_path / folder, CheckpointConfig(), ParallelState(), {}).load(
            tmp_path / folder / "step-1", model, fresh_opt)
        want, got = _toy_state(ref, ref_opt), _toy_state(model, fresh_opt)
        for kind in want:
            for name in want[kind]:
                assert torch.equal(got[kind][name], want[kind][name]), (folder, kind, name)


def _fresh_optimizer(model):
    from train.config import TrainConfig
    from train.optim import build_optimizer
    return build_optimizer(model, TrainConfig(lr=0.01))
