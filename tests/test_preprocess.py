"""Preprocessing: every input format into a megatron-core readable .bin/.idx, bad records, --strict, atomic output."""
from __future__ import annotations

import gzip
import json
import random
import runpy
from pathlib import Path

import numpy as np
import pytest

from data.preprocess import tokenize_to_indexed
from data.readers import InputError, read_records, resolve_inputs
from data.tokenizer import read_meta, train_sentencepiece

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
IndexedDataset = megatron_indexed.IndexedDataset
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def make_texts(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "king", "queen", "of", "and", "to", "be", "or", "not", "fair", "foul", "night", "day", "sweet",
             "love", "death", "crown", "sword", "héllo", "naïve"]
    return ["\n".join(" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 5)))
            for _ in range(num)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_sentencepiece(make_texts(400, seed=1), str(path), vocab_size=300, num_threads=1)


def write_jsonl(path: Path, texts: list[str], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
    return path


def read_docs(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def expected_docs(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(text) + [tokenizer.eod_id] for text in texts]


def run(inputs: list[str], prefix: Path, tokenizer, **kwargs):
    text_key = kwargs.pop("text_key", "text")
    records = read_records(resolve_inputs(inputs), text_key)
    return tokenize_to_indexed(records, str(prefix), tokenizer.info.path, text_key=text_key, progress=False,
                               **kwargs)


def test_round_trip_text_tokens_bin_idx(tmp_path, tokenizer):
    texts = make_texts(50)
    summary = run([str(write_jsonl(tmp_path / "in.jsonl", texts))], tmp_path / "out", tokenizer)
    docs = read_docs(str(tmp_path / "out"))
    assert docs == expected_docs(tokenizer, texts)
    assert [tokenizer.decode(doc[:-1]) for doc in docs] == texts  # identity normalisation: exact text back
    assert summary.documents == 50 and summary.tokens == sum(map(len, docs)) and not summary.skipped
    assert IndexedDataset(str(tmp_path / "out")).index.dtype == np.uint16  # megatron's choice for small vocabs
    meta = read_meta(str(tmp_path / "out"))
    assert meta["tokenizer"]["fingerprint"] == tokenizer.info.fingerprint and meta["documents"] == 50


def test_every_input_format_gives_the_same_tokens(tmp_path, tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = make_texts(30, seed=2)
    want = expected_docs(tokenizer, texts)
    zst = tmp_path / "in.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    pq.write_table(pa.table({"text": texts, "n": list(range(30))}), tmp_path / "in.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    inputs = {
        "jsonl": write_jsonl(tmp_path / "in.jsonl", texts),
        "gz": write_jsonl(tmp_path / "in.jsonl.gz", texts, opener=gzip.open),
        "zst": zst,
        "parquet": tmp_path / "in.parquet",
        "hf": tmp_path / "saved",
    }
    for name, path in inputs.items():
        run([str(path)], tmp_path / name, tokenizer)
        assert read_docs(str(tmp_path / name)) == want, name


def test_text_key_and_folder_input(tmp_path, tokenizer):
    folder = tmp_path / "shards"
    folder.mkdir()
    texts = make_texts(20, seed=3)
    for i in range(2):
        with open(folder / f"part{i}.jsonl", "w") as f:
            for text in texts[i * 10:(i + 1) * 10]:
                f.write(json.dumps({"content": text}) + "\n")
    run([str(folder)], tmp_path / "out", tokenizer, text_key="content")
    assert read_docs(str(tmp_path / "out")) == expected_docs(tokenizer, texts)


def bad_jsonl(path: Path) -> Path:
    good = json.dumps({"text": "good one"}).encode()
    lines = [good, b'{"text": "unterminated', json.dumps({"body": "no text key"}).encode(),
             b'{"text": "caf\xe9"}', json.dumps({"text": "  \n "}).encode(), good]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_records_are_skipped_and_counted(tmp_path, tokenizer):
    summary = run([str(bad_jsonl(tmp_path / "bad.jsonl"))], tmp_path / "out", tokenizer)
    assert summary.documents == 2
    assert dict(summary.skipped) == {"invalid_json": 1, "missing_text_key": 1, "undecodable_bytes": 1,
                                     "empty_document": 1}
    assert summary.examples["undecodable_bytes"] == [f"{tmp_path / 'bad.jsonl'}:4"]
    assert read_docs(str(tmp_path / "out")) == expected_docs(tokenizer, ["good one", "good one"])
    report = summary.format()
    assert "invalid_json: 1" in report and "bad.jsonl:2" in report


@pytest.mark.parametrize("line,reason", [(2, "invalid json"), (3, "missing text key"), (4, "undecodable bytes"),
                                         (5, "empty document")])
def test_strict_names_file_and_line(tmp_path, tokenizer, line, reason):
    lines = bad_jsonl(tmp_path / "bad.jsonl").read_bytes().split(b"\n")
    only = tmp_path / "one.jsonl"
    only.write_bytes(lines[0] + b"\n" + lines[line - 1] + b"\n")
    with pytest.raises(InputError, match=f"one.jsonl:2: {reason}"):
        run([str(only)], tmp_path / "out", tokenizer, strict=True)
    assert not list(tmp_path.glob("out*"))


def test_two_workers_write_the_same_as_one(tmp_path, tokenizer):
    path = str(bad_jsonl(tmp_path / "bad.jsonl"))
    texts_path = str(write_jsonl(tmp_path / "in.jsonl", make_texts(300, seed=4)))
    one = run([texts_path, path], tmp_path / "one", tokenizer, workers=1, batch_size=16)
    two = run([texts_path, path], tmp_path / "two", tokenizer, workers=2, batch_size=16)
    assert read_docs(str(tmp_path / "one")) == read_docs(str(tmp_path / "two"))
    assert (one.documents, one.tokens, one.skipped) == (two.documents, two.tokens, two.skipped)


def test_interrupted_run_leaves_nothing_loadable_and_keeps_old_output(tmp_path, tokenizer):
    texts = make_texts(40, seed=5)
    run([str(write_jsonl(tmp_path / "old.jsonl", texts[:5]))], tmp_path / "out", tokenizer)
    old = read_docs(str(tmp_path / "out"))

    def interrupted():
        for i, record in enumerate(read_records([str(write_jsonl(tmp_path / "new.jsonl", texts))])):
            if i == 30:
                raise KeyboardInterrupt  # as from Ctrl-C, after batches were already written
            yield record

    with pytest.raises(KeyboardInterrupt):
        tokenize_to_indexed(interrupted(), str(tmp_path / "out"), tokenizer.info.path, batch_size=8,
                            progress=False)
    assert read_docs(str(tmp_path / "out")) == old
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.bin", "out.idx", "out.meta.json"]

    with pytest.raises(KeyboardInterrupt):
        tokenize_to_indexed(interrupted(), str(tmp_path / "fresh"), tokenizer.info.path, batch_size=8,
                            progress=False)
    assert not IndexedDataset.exists(str(tmp_path / "fresh")) and not list(tmp_path.glob("fresh*"))


def test_killed_run_leaves_only_temporary_names(tmp_path, tokenizer, monkeypatch):
    """A process killed before the final renames leaves files whose names no loader looks for."""
    import data.preprocess as preprocess

    def killed(*args):
        raise SystemExit("killed before commit")

    monkeypatch.setattr(preprocess, "_commit", killed)
    monkeypatch.setattr(preprocess.os, "remove", lambda path: None)  # a killed process cleans nothing up
    with pytest.raises(SystemExit):
        run([str(write_jsonl(tmp_path / "in.jsonl", make_texts(10)))], tmp_path / "out", tokenizer)
    monkeypatch.undo()
    assert list(tmp_path.glob("out.tmp-*"))  # the half-finished files exist...
    assert not IndexedDataset.exists(str(tmp_path / "out"))  # ...but not under the loadable names


def test_missing_input_and_unwritable_output_fail_at_once(tmp_path, tokenizer, capsys):
    main = runpy.run_path(str(SCRIPTS / "preprocess_data.py"))["main"]
    good = str(write_jsonl(tmp_path / "in.jsonl", make_texts(3)))
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", tokenizer.info.path]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--input", good, "--output-prefix", str(blocker / "o"), "--tokenizer", tokenizer.info.path]) == 2
    assert "cannot write output" in capsys.readouterr().err
    assert main(["--input", good, "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                 str(tmp_path / "missing.model")]) == 2
    assert "missing.model does not exist" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown format"):
        resolve_inputs([str(blocker)])


def test_cli_prints_summary_and_strict_exit_code(tmp_path, tokenizer, capsys):
    main = runpy.run_path(str(SCRIPTS / "preprocess_data.py"))["main"]
    bad = str(bad_jsonl(tmp_path / "bad.jsonl"))
    args = ["--input", bad, "--output-prefix", str(tmp_path / "o"), "--tokenizer", tokenizer.info.path, "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "documents 2" in out and "skipped 4" in out and "undecodable_bytes: 1" in out
    assert main(args + ["--strict", "--output-prefix", str(tmp_path / "s")]) == 2
    assert "bad.jsonl:2: invalid json" in capsys.readouterr().err


def test_train_tokenizer_script(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPTS / "train_tokenizer.py"))["main"]
    path = write_jsonl(tmp_path / "in.jsonl", make_texts(300, seed=6))
    assert main(["--input", str(path), "--model", str(tmp_path / "t.model"), "--vocab-size", "290"]) == 0
    assert "vocab 290" in capsys.readouterr().out
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "t.model"), "sentencepiece")
    assert tok.vocab_size == 290 and tok.eod_id == 2
    assert tok.decode(tok.encode("to be or not\n  to be")) == "to be or not\n  to be"


def test_hugging_face_tokenizer_from_a_local_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data.tokenizer import load_tokenizer

    texts = make_texts(100, seed=7)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(str(tmp_path / "hf"), "hf")
    assert tok.eod_id == 1 and tok.info.type == "hf"
    records = read_records([str(write_jsonl(tmp_path / "in.jsonl", texts))])
    tokenize_to_indexed(records, str(tmp_path / "out"), str(tmp_path / "hf"), "hf", progress=False)
    assert read_docs(str(tmp_path / "out")) == expected_docs(tok, texts)
    assert read_meta(str(tmp_path / "out"))["tokenizer"]["type"] == "hf"


@pytest.mark.parametrize("streaming", [True, False])
def test_load_dataset_path_streamed_or_not(tmp_path, tokenizer, streaming, monkeypatch):
    """--hf-dataset goes through datasets.load_dataset (here a local folder of data files, as a hub name would)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.readers import read_hub_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    texts = make_texts(12, seed=8)
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"body": texts}), tmp_path / "ds" / "train.parquet")
    records = read_hub_dataset(str(tmp_path / "ds"), "body", streaming=streaming)
    tokenize_to_indexed(records, str(tmp_path / "out"), tokenizer.info.path, text_key="body", progress=False)
    assert read_docs(str(tmp_path / "out")) == expected_docs(tokenizer, texts)
    with pytest.raises(InputError, match="has no column .text."):
        list(read_hub_dataset(str(tmp_path / "ds"), "text", streaming=streaming))


def test_prepare_corpus_cuts_plays_into_scenes():
    split_scenes = runpy.run_path(str(SCRIPTS / "prepare_corpus.py"))["split_scenes"]
    play = ("THE PLAY\n\nPERSONS\n\nACT I.\n\nSCENE 1. A room\nA: one\n\nSCENE 2. A hall\nB: two\n\n"
            "ACT II.\n\nSCENE I. A field\nC: three\n")
    scenes = split_scenes(play)
    assert [s.splitlines()[0] for s in scenes] == ["THE PLAY", "SCENE 2. A hall", "ACT II."]
    assert "ACT II." not in scenes[1] and "".join(scenes).replace("\n", "") == play.replace("\n", "")
    assert split_scenes("Shall I compare thee\nto a summer's day?\n") == ["Shall I compare thee\nto a summer's day?\n"]


def _zst(path: Path, texts: list[str], frames: int = 1) -> Path:
    import zstandard
    lines = [json.dumps({"text": t}) + "\n" for t in texts]
    per = -(-len(lines) // frames)
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress("".join(lines[i:i + per]).encode())
                              for i in range(0, len(lines), per)))
    return path


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) * 2 // 3]), "is truncated"),
    (lambda p: p.write_bytes(random.Random(0).randbytes(4000)), "is not valid zstd data"),
], ids=["truncated", "random-bytes"])
def test_damaged_zstd_input_is_an_error_naming_the_file(tmp_path, tokenizer, damage, words):
    """A truncated .zst used to read as a shorter file without a word (and random bytes gave a traceback)."""
    path = _zst(tmp_path / "in.jsonl.zst", make_texts(300))
    damage(path)
    with pytest.raises(InputError, match=words) as err:
        run([str(path)], tmp_path / "out", tokenizer)
    assert str(path) in str(err.value)


def test_truncated_gzip_input_is_an_error_naming_the_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl.gz", make_texts(300), opener=gzip.open)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(InputError, match=str(path)):
        run([str(path)], tmp_path / "out", tokenizer)


def test_multi_frame_zstd_reads_every_document(tmp_path, tokenizer):
    texts = make_texts(40)
    run([str(_zst(tmp_path / "in.jsonl.zst", texts, frames=3))], tmp_path / "out", tokenizer)
    assert read_docs(str(tmp_path / "out")) == expected_docs(tokenizer, texts)


def test_lone_surrogate_is_skipped_by_reason_not_a_crash(tmp_path, tokenizer):
    texts = make_texts(5)
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(2, '{"text": "broken \\ud800 here"}')
    path.write_text("\n".join(lines) + "\n")
    summary = run([str(path)], tmp_path / "out", tokenizer)
    assert summary.skipped == {"invalid_unicode": 1}
    assert read_docs(str(tmp_path / "out")) == expected_docs(tokenizer, texts)
    with pytest.raises(InputError, match=f"{path}:3: invalid unicode"):
        run([str(path)], tmp_path / "strict", tokenizer, strict=True)


# ---------------------------------------------------------------------------- Megatron-LM's command lines
# Run as Megatron-LM's documentation writes them (minus `python tools/preprocess_data.py`), on small made-up data:
# its README's "Data Preprocessing" for GPT, and megatron-core's developer guide, "Data Preparation".
README_GPT2 = ("--input my-corpus.json --output-prefix my-gpt2 --vocab-file gpt2-vocab.json "
               "--tokenizer-type GPT2BPETokenizer --merge-file gpt2-merges.txt --append-eod")
DOCS_HF = ("--input data.jsonl --output-prefix processed_data --tokenizer-type HuggingFaceTokenizer "
           "--tokenizer-model /path/to/tokenizer --workers 8 --append-eod")


def megatron_corpus(path: Path, texts: list[str]) -> Path:
    """Loose json as Megatron-LM's README shows it: a text field among others."""
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"src": "www.nvidia.com", "text": text, "type": "Eng", "id": str(i),
                                "title": f"Part {i}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A small GPT-2 style byte-level BPE trained with the tokenizers library, saved as Megatron's README names its
    files (gpt2-vocab.json, gpt2-merges.txt); returns (folder, the trained tokenizer: the reference encoding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("gpt2")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(make_texts(200, seed=11), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(folder), "gpt2")
    return folder, bpe


def script_main():
    return runpy.run_path(str(SCRIPTS / "preprocess_data.py"))["main"]


def test_megatron_readme_gpt2_command_line(tmp_path, gpt2_files, monkeypatch):
    import shutil

    folder, bpe = gpt2_files
    for name in ("gpt2-vocab.json", "gpt2-merges.txt"):
        shutil.copy(folder / name, tmp_path / name)
    texts = ["The quick brown fox", "jumps over the lazy dog"] + make_texts(30, seed=12)
    megatron_corpus(tmp_path / "my-corpus.json", texts)
    monkeypatch.chdir(tmp_path)
    assert script_main()(README_GPT2.split() + ["--quiet"]) == 0
    # "Here the output files are named my-gpt2_text_document.bin and my-gpt2_text_document.idx"
    assert sorted(p.name for p in tmp_path.glob("my-gpt2*")) == [
        "my-gpt2_text_document.bin", "my-gpt2_text_document.idx", "my-gpt2_text_document.meta.json"]
    eod = bpe.token_to_id("<|endoftext|>")
    assert read_docs("my-gpt2_text_document") == [bpe.encode(text).ids + [eod] for text in texts]
    assert IndexedDataset("my-gpt2_text_document").index.dtype == np.uint16

    # without --append-eod, as in Megatron-LM: the bare encoding
    assert script_main()(README_GPT2.replace(" --append-eod", "").split() + ["--quiet"]) == 0
    assert read_docs("my-gpt2_text_document") == [bpe.encode(text).ids for text in texts]

    # and the data trains: the loader takes the same vocab/merges pair, by Megatron's name or ours
    from data.config import DataConfig
    from data.loader import GPTData
    assert script_main()(README_GPT2.split() + ["--quiet"]) == 0
    for kind in ("GPT2BPETokenizer", "gpt2bpe"):
        cfg = DataConfig(paths=["my-gpt2_text_document"], tokenizer="gpt2-vocab.json", tokenizer_type=kind,
                         merge_file="gpt2-merges.txt", seq_length=8, split="100,0,0", vocab_divisible_by=64,
                         cache_dir=str(tmp_path / kind))
        data = GPTData(cfg, seed=1, train_samples=16, valid_samples=0)
        assert data.eod_id == eod and data.vocab_size == -(-bpe.get_vocab_size() // 64) * 64
        assert eod in next(data.train_batches(0, 16, 1)).flatten().tolist()


def hf_tokenizer_folder(path: Path) -> Path:
    """A Hugging Face tokenizer that adds a BOS (as Llama's do), so that its special tokens show in the ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(make_texts(100, seed=13), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


@pytest.mark.parametrize("special_tokens", [True, False])
def test_megatron_docs_hugging_face_command_line(tmp_path, monkeypatch, special_tokens):
    """Ids as megatron-core's own HuggingFaceTokenizer gives them; special tokens included unless
    --tokenizer-hf-no-include-special-tokens (Megatron-LM main's default and flag)."""
    from megatron.core.tokenizers import MegatronTokenizer

    hf_tokenizer_folder(tmp_path / "tokenizer")
    texts = make_texts(40, seed=14)
    megatron_corpus(tmp_path / "data.jsonl", texts)
    monkeypatch.chdir(tmp_path)
    argv = DOCS_HF.replace("/path/to/tokenizer", "tokenizer").split() + ["--quiet"]
    assert script_main()(argv + ([] if special_tokens else ["--tokenizer-hf-no-include-special-tokens"])) == 0
    assert sorted(p.name for p in tmp_path.glob("processed_data*")) == [
        "processed_data_text_document.bin", "processed_data_text_document.idx",
        "processed_data_text_document.meta.json"]
    megatron = MegatronTokenizer.from_pretrained(tokenizer_path="tokenizer", metadata_path={"library": "huggingface"},
                                                 include_special_tokens=special_tokens)
    want = [megatron.tokenize(text) + [megatron.eod] for text in texts]
    assert read_docs("processed_data_text_document") == want
    assert all((doc[0] == 1) == special_tokens for doc in want)  # the BOS is there exactly when asked for


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_megatron_sentencepiece_command_line(tmp_path, tokenizer, monkeypatch, kind):
    """Megatron-LM main builds its three sentencepiece types alike: ids and EOD as megatron-core's tokenizer."""
    from megatron.core.tokenizers import MegatronTokenizer

    texts = make_texts(30, seed=15)
    megatron_corpus(tmp_path / "data.jsonl", texts)
    monkeypatch.chdir(tmp_path)
    argv = (f"--input data.jsonl --output-prefix my-llama --tokenizer-type {kind} --tokenizer-model "
            f"{tokenizer.info.path} --workers 2 --append-eod --quiet").split()
    assert script_main()(argv) == 0
    megatron = MegatronTokenizer.from_pretrained(tokenizer_path=tokenizer.info.path,
                                                 metadata_path={"library": "sentencepiece"})
    assert megatron.eod == tokenizer.eod_id
    assert read_docs("my-llama_text_document") == [megatron.tokenize(text) + [megatron.eod] for text in texts]


def test_megatron_json_keys_write_one_dataset_per_key(tmp_path, tokenizer, monkeypatch):
    texts = make_texts(10, seed=16)
    megatron_corpus(tmp_path / "in.json", texts)
    monkeypatch.chdir(tmp_path)
    argv = (f"--input in.json --output-prefix out --json-keys text title --tokenizer-type SentencePieceTokenizer "
            f"--tokenizer-model {tokenizer.info.path} --append-eod --quiet").split()
    assert script_main()(argv) == 0
    assert read_docs("out_text_document") == expected_docs(tokenizer, texts)
    assert read_docs("out_title_document") == expected_docs(tokenizer, [f"Part {i}" for i in range(10)])
    assert read_meta("out_title_document")["text_key"] == "title"
    # our own spelling (--text-key, --tokenizer) keeps our naming, <prefix>.bin, and always ends documents with EOD
    assert script_main()(["--input", "in.json", "--output-prefix", "own", "--json-keys", "title", "--tokenizer",
                          tokenizer.info.path, "--quiet"]) == 0
    assert read_docs("own") == read_docs("out_title_document")


def test_quoted_glob_input(tmp_path, tokenizer):
    texts = make_texts(6, seed=17)
    for i in range(2):
        write_jsonl(tmp_path / f"shard{i}.jsonl", texts[i * 3:(i + 1) * 3])
    assert script_main()(["--input", str(tmp_path / "shard*.jsonl"), "--output-prefix", str(tmp_path / "o"),
                          "--tokenizer", tokenizer.info.path, "--quiet"]) == 0
    assert read_docs(str(tmp_path / "o")) == expected_docs(tokenizer, texts)


@pytest.mark.parametrize("extra, words", [
    (["--split-sentences"], "--split-sentences (a Megatron-LM flag) is not supported here"),
    (["--lang", "english"], "--lang (a Megatron-LM flag) is not supported here"),
    (["--vocab-extra-ids", "100"], "--vocab-extra-ids (a Megatron-LM flag) is not supported"),
    (["--tokenizer-type", "BertWordPieceLowerCase"], "--tokenizer-type BertWordPieceLowerCase is not supported"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "needs --vocab-file gpt2-vocab.json and --merge-file"),
    (["--merge-file", "m.txt"], "--vocab-file and --merge-file go with GPT2BPETokenizer"),
    (["--json-keys", "text", "title"], "2 text keys need one output each"),
], ids=["split-sentences", "lang", "vocab-extra-ids", "bert", "gpt2-without-files", "merges-for-sp", "two-keys"])
def test_megatron_flags_we_do_not_support_are_one_line_errors(tmp_path, tokenizer, capsys, extra, words):
    good = str(write_jsonl(tmp_path / "in.jsonl", make_texts(3)))
    argv = ["--input", good, "--output-prefix", str(tmp_path / "o"), "--quiet"]
    if "GPT2BPETokenizer" not in extra:
        argv += ["--tokenizer", tokenizer.info.path]
    assert script_main()(argv + extra) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("o*"))


def test_gpt2_vocab_without_endoftext_is_refused(tmp_path, gpt2_files, capsys):
    folder, _ = gpt2_files
    vocab = json.loads((folder / "gpt2-vocab.json").read_text())
    del vocab["<|endoftext|>"]
    (tmp_path / "v.json").write_text(json.dumps(vocab))
    good = str(write_jsonl(tmp_path / "in.jsonl", make_texts(3)))
    assert script_main()(["--input", good, "--output-prefix", str(tmp_path / "o"), "--vocab-file",
                          str(tmp_path / "v.json"), "--merge-file", str(folder / "gpt2-merges.txt"),
                          "--tokenizer-type", "GPT2BPETokenizer", "--quiet"]) == 2
    assert "has no <|endoftext|> token" in capsys.readouterr().err
