"""Every sink gets the same record, read back from what was written: metrics.jsonl, TensorBoard's event files
(tensorboard's EventAccumulator) and wandb's offline run file (its records, read below). A resumed run continues
the same wandb run and logs every step once everywhere. Offline: no network, no API key."""
import json
import struct
import time
from pathlib import Path

import pytest
import yaml

import pretrain
from train.metrics import MetricsLogger, expert_histogram, wandb_values

CORPUS = Path("corpus/shakespeare_text_document.bin")
needs_corpus = pytest.mark.skipif(not CORPUS.exists(), reason="embedded corpus missing: run scripts/setup.sh")
# the tiny model on 2 sequences of 32 tokens: 64 tokens per step, each routed to top-2 of 4 experts
SMALL = ["--config", "configs/tiny.yaml", "train.micro_batch_size=2", "train.global_batch_size=2",
         "data.seq_length=32", "train.eval_batches=1", "logging.wandb=true", "logging.tensorboard=true"]
TOKENS, TOP_K, EXPERTS, LAYERS = 64, 2, 4, 2


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    """No API key and no WANDB_MODE: the logger goes offline by itself (the WANDB_MODE it sets is undone after
    the test: setenv first, so that the undo has a value to restore)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_SILENT", "true")


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensorboard(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, TENSORS, EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0, HISTOGRAMS: 0, TENSORS: 0})
    return acc.Reload()  # purge_orphaned_data (the default): events hidden by a resumed writer's purge_step


def wandb_records(path: Path) -> list:
    """The protobuf Records of an offline .wandb file. Its layout is LevelDB's log format: a 7-byte header
    (":W&B", magic, version), then 32 KiB blocks of chunks, each [crc32 u32, length u16, type u8] + data, a
    record split over chunks of type first (2), middle (3), last (4), or in one chunk of type full (1)."""
    from wandb.proto.wandb_internal_pb2 import Record
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, parts, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a chunk still being written
            break
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(parts))
            parts = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    """One offline wandb run of a run_dir: its id, config and history {step: {key: value}} (nested keys, such
    as a histogram's values, as a dict)."""
    (path,) = run_dir.glob("run-*.wandb")
    records, deadline = wandb_records(path), time.monotonic() + 60
    # wandb's service process finishes writing the file shortly after finish() returns: wait for its last record
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{path} has no exit record: wandb did not finish writing it"
        time.sleep(0.1)
        records = wandb_records(path)
    out = {"id": None, "config": {}, "history": {}}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"] = r.run.run_id
            out["config"] = {u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != "_wandb"}
        elif kind == "history":
            row = {}
            for item in r.history.item:
                keys = list(item.nested_key) or [item.key]
                node = row
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(item.value_json)
            out["history"][r.history.step.num] = row
    return out


def wandb_runs(run: Path) -> list[dict]:
    return [wandb_run(d) for d in sorted((run / "wandb").glob("offline-run-*"))]


def assert_tensorboard_holds(records: list[dict], acc) -> None:
    """TensorBoard holds the records' values: each scalar by name, each per-expert list as a histogram with one
    bucket per expert."""
    scalars = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
    assert set(acc.Tags()["scalars"]) == scalars
    lists = {k for r in records for k, v in r.items() if isinstance(v, list)}
    assert set(acc.Tags()["histograms"]) == lists
    for key in scalars:
        got = {e.step: e.value for e in acc.Scalars(key)}
        want = {r["step"]: r[key] for r in records if r.get(key) is not None}
        assert got == pytest.approx(want, rel=1e-6), key  # TensorBoard keeps float32
    for key in lists:
        got = {e.step: e.histogram_value for e in acc.Histograms(key)}
        assert sorted(got) == [r["step"] for r in records]
        for r in records:
            assert list(got[r["step"]].bucket) == r[key] and got[r["step"]].num == sum(r[key])
            assert list(got[r["step"]].bucket_limit) == [e + 0.5 for e in range(EXPERTS)]


def assert_wandb_holds(records: list[dict], history: dict) -> None:
    """wandb's history holds the records' values at their steps: scalars by name (None left out), per-expert
    lists as histograms with one bin per expert."""
    assert sorted(history) == [r["step"] for r in records]
    for r in records:
        row = history[r["step"]]
        assert row["_step"] == r["step"]
        for key, value in r.items():
            if key == "step" or value is None:
                assert key not in row
            elif isinstance(value, list):
                assert row[key] == {"_type": "histogram", "values": value,
                                    "bins": [e - 0.5 for e in range(EXPERTS + 1)]}
            else:
                assert row[key] == pytest.approx(value, rel=1e-12), key


@needs_corpus
def test_every_sink_carries_the_record_and_the_config(tmp_path):
    """metrics.jsonl has each MoE layer's tokens per expert (summing to tokens x top_k over the interval);
    TensorBoard and wandb carry the same scalars and counts, and the resolved config."""
    run = tmp_path / "run"
    assert pretrain.main(SMALL + ["train.steps=4", "train.log_interval=2", "train.eval_interval=4",
                                  f"logging.run_dir={run}", "checkpoint.save=false"]) == 0
    records = jsonl(run)
    assert [r["step"] for r in records] == [2, 4] and "val_loss" in records[-1] and records[0]["mfu"] is None
    assert sum(k.endswith("/tokens_per_expert") for k in records[0]) == LAYERS
    for r in records:
        for layer in range(LAYERS):
            counts = r[f"moe/{layer}/tokens_per_expert"]
            assert len(counts) == EXPERTS and all(isinstance(c, int) for c in counts)
            assert sum(counts) == TOKENS * TOP_K * 2  # two steps per record
            assert max(counts) <= r[f"moe/{layer}/tokens_max"] * 2  # the busiest expert of each call, summed
    acc = tensorboard(run)
    (wb,) = wandb_runs(run)
    assert_tensorboard_holds(records, acc)
    assert_wandb_holds(records, wb["history"])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert wb["config"] == config and wb["id"] == json.loads((run / "wandb.json").read_text())["id"]
    (text,) = acc.Tensors("config/text_summary")
    assert yaml.safe_load(text.tensor_proto.string_val[0].decode().replace("\n    ", "\n")[4:]) == config


@needs_corpus
def test_resumed_run_continues_the_wandb_run_and_logs_each_step_once(tmp_path):
    """Run to step 4 (checkpoints at 2 and 4), then resume=auto from step 2 (as after a crash at step 4) and go
    on to step 6: one wandb id in both offline runs; wandb keeps steps 1-4 from the first and gets 5-6 from the
    second; metrics.jsonl and TensorBoard hold steps 1-6 once, the redone steps 3-4 with the second run's values."""
    run = tmp_path / "run"
    args = SMALL + ["train.log_interval=1", "train.eval_interval=0", f"logging.run_dir={run}",
                    "checkpoint.interval=2"]
    assert pretrain.main(args + ["train.steps=4"]) == 0
    first = jsonl(run)
    (run / "checkpoints" / "latest").write_text((run / "checkpoints" / "latest").read_text().replace("step-4",
                                                                                                       "step-2"))
    assert pretrain.main(args + ["train.steps=6", "checkpoint.resume=auto"]) == 0
    records = jsonl(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[:2] == first[:2]
    a, b = wandb_runs(run)
    assert a["id"] == b["id"] == json.loads((run / "wandb.json").read_text())["id"]
    assert sorted(a["history"]) == [1, 2, 3, 4] and sorted(b["history"]) == [5, 6]
    assert_tensorboard_holds(records, tensorboard(run))  # steps 3-4 of the first run purged: each step once
    assert_wandb_holds(first, a["history"])
    assert_wandb_holds(records[4:], b["history"])


def test_logger_without_training(tmp_path, capsys):
    """The sinks on hand-made records: a start after step 2 drops the later JSONL records and hides the later
    TensorBoard events; wandb's stored step keeps steps it holds from being sent again; an unreadable
    wandb.json starts a new wandb run and says so."""
    def record(step, loss):
        return {"step": step, "loss": loss, "mfu": None, "moe/0/tokens_per_expert": [step, 0, 2, 1]}

    logger = MetricsLogger(tmp_path, True, wandb=True, tensorboard=True, config={"a": {"b": 1}})
    logger.start(0)
    for step in (1, 2, 3):
        logger.log(record(step, 1.0))
    logger.close()
    logger = MetricsLogger(tmp_path, True, wandb=True, tensorboard=True, config={"a": {"b": 1}})
    logger.start(2)
    for step in (3, 4):
        logger.log(record(step, 2.0))
    logger.close()
    records = jsonl(tmp_path)
    assert records == [record(1, 1.0), record(2, 1.0), record(3, 2.0), record(4, 2.0)]
    assert_tensorboard_holds(records, tensorboard(tmp_path))
    a, b = wandb_runs(tmp_path)
    assert a["id"] == b["id"] and a["config"] == b["config"] == {"a": {"b": 1}}
    assert sorted(a["history"]) == [1, 2, 3] and sorted(b["history"]) == [4]
    (tmp_path / "wandb.json").write_text("{")
    logger = MetricsLogger(tmp_path, True, wandb=True)
    logger.start(4)
    logger.close()
    assert "wandb.json is unreadable" in capsys.readouterr().out
    assert json.loads((tmp_path / "wandb.json").read_text()) == {"id": logger.wandb.id, "step": 0}
    assert logger.wandb.id != a["id"]


def test_expert_counts_as_histograms():
    """One bucket per expert holding its count (an idle expert included), and the moments of the expert ids;
    past wandb's most bins the counts stay a list."""
    h = expert_histogram([3, 0, 1])
    assert h == {"min": 0, "max": 2, "num": 4, "sum": 2, "sum_squares": 4, "bucket_limits": [0.5, 1.5, 2.5],
                 "bucket_counts": [3, 0, 1]}
    values = wandb_values({"step": 7, "loss": 1.5, "mfu": None, "moe/0/tokens_per_expert": [3, 0, 1],
                           "moe/1/tokens_per_expert": list(range(600))})
    assert values["loss"] == 1.5 and "mfu" not in values and "step" not in values
    assert values["moe/0/tokens_per_expert"].to_json() == {"_type": "histogram", "values": [3, 0, 1],
                                                           "bins": [-0.5, 0.5, 1.5, 2.5]}
    assert values["moe/1/tokens_per_expert"] == list(range(600))
