"""The GPT sample stream: splits, blending, determinism, resume, data-parallel shards, tokenizer checks."""
from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from data import loader
from data.config import DataConfig
from data.loader import GPTData
from data.tokenizer import padded_vocab_size, train_sentencepiece, write_meta
from errors import ConfigError

SEQ = 16
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    texts = [" ".join(rng.choices(words, k=40)) for _ in range(200)]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok") / "tok.model"), vocab_size=280,
                               num_threads=1)


def make_dataset(prefix: Path, first_value: int, num_docs: int, info, seed: int = 0) -> str:
    """Document d holds only the token first_value + d (then EOD), so every token names its document."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for d in range(num_docs):
        length = int(rng.integers(3, 40))
        builder.add_document(np.array([first_value + d] * length + [info.eod_id]), [length + 1])
    builder.finalize(f"{prefix}.idx")
    write_meta(str(prefix), info)
    return str(prefix)


def config(paths: list[str], tokenizer, **kw) -> DataConfig:
    kw.setdefault("split", "80,15,5")
    return DataConfig(paths=paths, tokenizer=tokenizer.info.path, seq_length=SEQ, vocab_divisible_by=64, **kw)


def documents(batch: torch.Tensor, eod: int) -> set[int]:
    values = set(batch.flatten().tolist())
    values.discard(eod)
    return values


@pytest.fixture
def corpus(tmp_path, tokenizer):
    return make_dataset(tmp_path / "c", 1000, 200, tokenizer.info)


def test_batches_have_the_promised_shape_and_vocab(corpus, tokenizer):
    data = GPTData(config([corpus], tokenizer), seed=1, train_samples=64, valid_samples=16)
    assert data.vocab_size == 320 == padded_vocab_size(280, 64) and data.eod_id == 2
    batch = next(data.train_batches(0, micro_batch_size=4, accumulation=2))
    assert batch.shape == (4, SEQ + 1) and batch.dtype == torch.int64
    sample = data.train_dataset[0]  # megatron-core's own view of the first sample: tokens and shifted labels
    assert torch.equal(batch[0, :-1], sample["tokens"]) and torch.equal(batch[0, 1:], sample["labels"])
    assert padded_vocab_size(8000, 1024) == 8192 and padded_vocab_size(1024, 1024) == 1024


def test_train_valid_test_are_disjoint(corpus, tokenizer):
    data = GPTData(config([corpus], tokenizer), seed=1, train_samples=300, valid_samples=40)
    train = set().union(*(documents(b, 2) for b in data.train_batches(0, 10, 1)))
    valid = set().union(*(documents(b, 2) for b in data.valid_batches(10, 4)))
    # split 80,15,5 of 200 documents: train 0..159, valid 160..189, test 190..199
    assert train <= set(range(1000, 1160)) and len(train) > 150
    assert valid <= set(range(1160, 1190)) and len(valid) > 10


def test_order_is_deterministic_and_follows_the_seed(corpus, tokenizer, tmp_path):
    def first_batches(seed, cache):
        data = GPTData(config([corpus], tokenizer, cache_dir=str(tmp_path / cache)), seed, 200, 16)
        return torch.cat(list(data.train_batches(0, 4, 2))[:10])

    a = first_batches(7, "a")
    assert torch.equal(a, first_batches(7, "b"))  # rebuilt from scratch in another cache
    assert torch.equal(a, first_batches(7, "a"))  # read back from the cache
    assert not torch.equal(a, first_batches(8, "a"))


def test_resume_at_step_n_gives_the_same_batches(corpus, tokenizer):
    data = GPTData(config([corpus], tokenizer), seed=3, train_samples=400, valid_samples=16)
    micro, per_step, n = 2, 4, 5
    global_batch = micro * per_step
    uninterrupted = list(data.train_batches(0, micro, per_step))
    resumed = data.train_batches(n * global_batch, micro, per_step)
    for expected in uninterrupted[n * per_step:(n + 3) * per_step]:
        assert torch.equal(next(resumed), expected)
    assert len(uninterrupted) == len(data.train_dataset) // global_batch * per_step


def test_rank_shards_are_disjoint_and_cover_the_global_batch(corpus, tokenizer):
    cfg = config([corpus], tokenizer)
    single = GPTData(cfg, seed=5, train_samples=200, valid_samples=24)
    ranks = [GPTData(cfg, seed=5, train_samples=200, valid_samples=24, dp_rank=r, dp_size=2) for r in range(2)]
    full = single.train_batches(0, micro_batch_size=2, accumulation=4)  # global batch 8
    shards = [r.train_batches(0, micro_batch_size=2, accumulation=2) for r in ranks]  # 2 ranks x 2 x 2 = 8
    for _ in range(6):
        global_batch = torch.cat([next(full) for _ in range(4)])
        rank0 = torch.cat([next(shards[0]) for _ in range(2)])
        rank1 = torch.cat([next(shards[1]) for _ in range(2)])
        assert torch.equal(torch.cat([rank0, rank1]), global_batch)
    valid = [list(r.valid_batches(3, 2)) for r in ranks]
    valid_single = list(single.valid_batches(6, 2))
    for k in range(2):
        assert torch.equal(torch.cat([valid[0][k], valid[1][k]]), valid_single[k])


def test_valid_batches_are_the_same_every_call(corpus, tokenizer):
    data = GPTData(config([corpus], tokenizer), seed=1, train_samples=64, valid_samples=30)
    first, second = list(data.valid_batches(5, 6)), list(data.valid_batches(5, 6))
    assert len(first) == 6 and all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="larger valid_samples"):
        data.valid_batches(5, 100)


def test_valid_paths_give_validation_a_dataset_of_its_own(tmp_path, tokenizer):
    train = make_dataset(tmp_path / "train", 1000, 50, tokenizer.info, seed=1)
    valid = make_dataset(tmp_path / "valid", 5000, 20, tokenizer.info, seed=2)
    data = GPTData(config([train], tokenizer, valid_paths=[valid]), seed=1, train_samples=400, valid_samples=40)
    seen_train = set().union(*(documents(b, 2) for b in data.train_batches(0, 10, 1)))
    seen_valid = set().union(*(documents(b, 2) for b in data.valid_batches(10, 4)))
    assert seen_train == set(range(1000, 1050))  # all of data.paths trains: data.split is not used
    assert seen_valid <= set(range(5000, 5020)) and len(seen_valid) > 10
    with pytest.raises(ConfigError, match=r"data\.valid_paths names .*nope, but .*nope\.bin does not exist"):
        GPTData(config([train], tokenizer, valid_paths=[str(tmp_path / "nope")]), seed=1, train_samples=8,
                valid_samples=4)
    assert GPTData(config([train], tokenizer, valid_paths=[valid]), seed=1, train_samples=8,
                   valid_samples=0).valid_dataset is None


def test_blend_proportions(tmp_path, tokenizer):
    a = make_dataset(tmp_path / "a", 1000, 100, tokenizer.info, seed=1)
    b = make_dataset(tmp_path / "b", 5000, 100, tokenizer.info, seed=2)
    data = GPTData(config(["0.3", a, "0.7", b], tokenizer, split="100,0,0"), seed=1, train_samples=4000,
                   valid_samples=0)
    assert not torch.distributed.is_initialized()  # the temporary group for blending is gone again
    counts = {"a": 0, "b": 0}
    for batch in data.train_batches(0, 50, 1):
        for sample in batch:
            tokens = sample[sample != 2]
            counts["a" if tokens.float().mean() < 5000 else "b"] += 1
    share_a = counts["a"] / sum(counts.values())
    assert sum(counts.values()) >= 4000 and abs(share_a - 0.3) < 0.01


def test_missing_data_names_the_file_and_the_fix(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"nope\.bin does not exist.*prepare_corpus\.py"):
        GPTData(config([str(tmp_path / "nope")], tokenizer), seed=1, train_samples=8, valid_samples=0)


def test_tokenizer_data_mismatch_is_refused(corpus, tokenizer, tmp_path):
    other = train_sentencepiece(["a b c d e f g " * 50] * 20, str(tmp_path / "other.model"), vocab_size=270,
                                num_threads=1)
    cfg = config([corpus], tokenizer)
    cfg.tokenizer = other.info.path
    with pytest.raises(ConfigError, match=r"data\.tokenizer does not match the data.*tok\.model"):
        GPTData(cfg, seed=1, train_samples=8, valid_samples=0)


def test_a_split_without_documents_is_a_config_error(tmp_path, tokenizer):
    small = make_dataset(tmp_path / "small", 1000, 10, tokenizer.info)
    with pytest.raises(ConfigError, match="data.split gives the valid split none of the 10 documents"):
        GPTData(config([small], tokenizer, split="969,30,1"), seed=1, train_samples=8, valid_samples=4)
    GPTData(config([small], tokenizer, split="969,30,1"), seed=1, train_samples=8, valid_samples=0)


def test_prefetch_thread_stops_and_errors_reach_the_consumer(corpus, tokenizer, monkeypatch):
    data = GPTData(config([corpus], tokenizer, prefetch=2), seed=1, train_samples=64, valid_samples=0)
    batches = data.train_batches(0, 2, 2)
    next(batches)
    threads = [t for t in threading.enumerate() if t.name == "gpt-data-prefetch"]
    assert threads
    batches.close()
    for thread in threads:
        thread.join(2.0)
    assert not any(t.is_alive() for t in threads)

    def broken(dataset, index):
        raise OSError("disk gone")

    monkeypatch.setattr(loader, "_raw_sample", broken)
    with pytest.raises(OSError, match="disk gone"):
        next(data.train_batches(0, 2, 2))


@pytest.mark.skipif(not (REPO / "corpus" / "shakespeare_text_document.idx").exists(),
                    reason="embedded corpus not built (python scripts/prepare_corpus.py)")
def test_embedded_corpus_with_the_default_config(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    data = GPTData(DataConfig(cache_dir=str(tmp_path)), seed=1234, train_samples=64, valid_samples=8)
    assert data.vocab_size == 8192 and data.eod_id == 2
    batch = next(data.train_batches(0, 2, 2))
    assert batch.shape == (2, 1025) and int(batch.max()) < 8000
    from data.tokenizer import load_tokenizer

    text = load_tokenizer("corpus/tokenizer.model", "sentencepiece").decode(batch[0].tolist())
    assert text.count("\n") > 20 and len(text) > 2000
    assert os.listdir(tmp_path)  # the sample index was cached where data.cache_dir says


class _Payload:
    """Unpickling this creates a marker file: a stand-in for any code a tampered file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_poisoned_index_cache_runs_no_code_and_is_rebuilt(corpus, tokenizer, tmp_path, caplog):
    """A sample-index cache file replaced by a pickle payload (megatron-core loads the cache with allow_pickle)
    is removed, named in a warning, and rebuilt; the marker the payload would create never appears."""
    cfg = config([corpus], tokenizer, cache_dir=str(tmp_path / "cache"))
    first = next(GPTData(cfg, seed=1, train_samples=64, valid_samples=0).train_batches(0, 4, 1))
    index = sorted((tmp_path / "cache").glob("*-train-document_index.npy"))
    assert index
    marker = tmp_path / "marker"
    np.save(index[0], np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with caplog.at_level("WARNING"):
        data = GPTData(cfg, seed=1, train_samples=64, valid_samples=0)
        again = next(data.train_batches(0, 4, 1))
    assert not marker.exists()
    assert str(index[0]) in caplog.text and "pickled objects" in caplog.text
    assert torch.equal(again, first)  # rebuilt the same


@pytest.mark.parametrize("content, words", [(b"garbage", "not a .npy array"), (None, "truncated or altered")])
def test_damaged_index_cache_file_is_named_and_rebuilt(tmp_path, content, words):
    from data.loader import distrust_index_cache, plain_npy_problem
    good = tmp_path / "h-GPTDataset-train-document_index.npy"
    np.save(good, np.arange(10, dtype=np.int32))
    (tmp_path / "h-GPTDataset-train-description.txt").write_text("{}")
    (tmp_path / "other-GPTDataset-valid-document_index.npy").write_bytes(good.read_bytes())
    assert plain_npy_problem(str(good)) is None
    good.write_bytes(content if content is not None else good.read_bytes()[:-4])
    assert words in plain_npy_problem(str(good))
    distrust_index_cache(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-GPTDataset-valid-document_index.npy"]


def share_of_first(data: GPTData, boundary: int) -> tuple[float, int]:
    """The share of training samples from the dataset whose tokens lie below `boundary`, and the sample count."""
    counts = [0, 0]
    for batch in data.train_batches(0, 50, 1):
        for sample in batch:
            counts[int(sample[sample != 2].float().mean() >= boundary)] += 1
    return counts[0] / sum(counts), sum(counts)


def test_megatron_blend_string_samples_in_its_proportions(tmp_path, tokenizer):
    """Megatron's "0.7 A 0.3 B" in data.paths: the stream the trainer reads comes 70/30 from A and B, and so does
    megatron-core's sample index (the blended dataset's per-dataset counts)."""
    a = make_dataset(tmp_path / "a", 1000, 100, tokenizer.info, seed=1)
    b = make_dataset(tmp_path / "b", 5000, 100, tokenizer.info, seed=2)
    data = GPTData(config([f"0.7 {a} 0.3 {b}"], tokenizer, split="100,0,0"), seed=1, train_samples=4000,
                   valid_samples=0)
    share_a, total = share_of_first(data, 5000)
    assert total == 4000 and abs(share_a - 0.7) < 0.01
    per_dataset = np.bincount(data.train_dataset.dataset_index, minlength=2)
    assert abs(per_dataset[0] / per_dataset.sum() - 0.7) < 0.01


def test_prefixes_without_weights_sample_by_size_for_any_length(tmp_path, tokenizer):
    """As Megatron-LM, an unweighted list is sampled in proportion to the datasets' sizes (tokens here); unlike
    megatron-core's one-epoch cap, the stream is as long as asked (many epochs of these small datasets)."""
    a = make_dataset(tmp_path / "a", 1000, 60, tokenizer.info, seed=3)
    b = make_dataset(tmp_path / "b", 5000, 240, tokenizer.info, seed=4)
    datasets = [loader.IndexedDataset(p) for p in (a, b)]  # held: their index is a memory map
    tokens = [int(d.sequence_lengths.sum()) for d in datasets]
    data = GPTData(config([f"{a} {b}"], tokenizer, split="100,0,0"), seed=1, train_samples=3000, valid_samples=0)
    share_a, total = share_of_first(data, 5000)
    assert total == 3000 > sum(tokens) / SEQ  # beyond one epoch of both
    assert abs(share_a - tokens[0] / sum(tokens)) < 0.015 and 0.1 < share_a < 0.35


def test_blend_with_a_missing_dataset_names_it_and_the_fix(tmp_path, tokenizer):
    a = make_dataset(tmp_path / "a", 1000, 50, tokenizer.info)
    make_dataset(tmp_path / "my-gpt2_text_document", 3000, 50, tokenizer.info)
    cases = {f"0.7 {a} 0.3 {tmp_path / 'nope'}": r"nope\.bin does not exist.*preprocess_data\.py",
             f"0.7 {a} 0.3 {tmp_path / 'my-gpt2'}": r"my-gpt2\.bin does not exist; did you mean .*_text_document",
             f"{a}.bin": r"a\.bin\.bin does not exist; a prefix names the files without their suffix"}
    for paths, words in cases.items():
        with pytest.raises(ConfigError, match=words):
            GPTData(config([paths], tokenizer), seed=1, train_samples=8, valid_samples=0)
