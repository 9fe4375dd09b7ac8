"""Tokenizers (a sentencepiece model file, a Hugging Face tokenizer from a local path, or GPT-2's byte-level BPE from
a vocab.json and merges.txt pair) and the record of which tokenizer made a dataset (`<prefix>.meta.json`), so
training refuses data tokenized with another vocabulary."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

META_SUFFIX = ".meta.json"

# Megatron-LM's --tokenizer-type names for the tokenizers here. Megatron-LM main builds its three sentencepiece types
# alike (megatron/core/tokenizers/utils/build_tokenizer.py, SP_TOKENIZERS: the ids of encode_as_ids, EOD = the model's
# eos), HuggingFaceTokenizer from a local folder, GPT2BPETokenizer from --vocab-file and --merge-file with
# <|endoftext|> as EOD (megatron/training/tokenizer/tokenizer.py, _GPT2BPETokenizer).
MEGATRON_TOKENIZER_TYPES = {"SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
                            "Llama2Tokenizer": "sentencepiece", "HuggingFaceTokenizer": "hf",
                            "GPT2BPETokenizer": "gpt2bpe"}
TOKENIZER_TYPES = {"sentencepiece": "sentencepiece", "hf": "hf", "gpt2bpe": "gpt2bpe", **MEGATRON_TOKENIZER_TYPES}
GPT2_EOD = "<|endoftext|>"


class TokenizerMismatchError(ValueError):
    """The data was tokenized with a different tokenizer than the one configured."""


@dataclass(frozen=True)
class TokenizerInfo:
    """What identifies a tokenizer: written next to the data by preprocessing, checked by the loader."""

    type: str
    path: str
    vocab_size: int
    eod_id: int
    fingerprint: str  # sha256 of the model file (sentencepiece) or of the vocabulary (HF, GPT-2 BPE), 16 hex digits
    merge_file: str = ""  # gpt2bpe: the merges.txt beside `path` (the vocab.json)


class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise ValueError(f"sentencepiece model {path} has no end-of-sequence piece (eos_id=-1); "
                             "retrain it with scripts/train_tokenizer.py, which sets eos_id")
        self.vocab_size = self._sp.get_piece_size()
        fingerprint = hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()[:16]
        self.info = TokenizerInfo("sentencepiece", path, self.vocab_size, self.eod_id, fingerprint)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=1)  # parallelism comes from preprocessing's worker processes

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class HFTokenizer:
    """A Hugging Face tokenizer: a local folder AutoTokenizer reads (type hf), or GPT-2's byte-level BPE from its
    vocab.json and merges.txt (type gpt2bpe). `special_tokens`: encode adds the tokenizer's own special tokens
    (a BOS, say), as Megatron-LM's HuggingFaceTokenizer does by default."""

    def __init__(self, path: str, merge_file: str = "", special_tokens: bool = False):
        if merge_file:
            self._tok = _gpt2_bpe(path, merge_file)
        else:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.special_tokens = special_tokens
        self.eod_id = self._tok.eos_token_id
        if self.eod_id is None:
            raise ValueError(f"Hugging Face tokenizer {path} has no eos token to end documents with; "
                             "use a tokenizer whose config sets eos_token")
        self.vocab_size = len(self._tok)
        vocab = json.dumps(sorted(self._tok.get_vocab().items()), ensure_ascii=False)
        fingerprint = hashlib.sha256(vocab.encode()).hexdigest()[:16]
        self.info = TokenizerInfo("gpt2bpe" if merge_file else "hf", path, self.vocab_size, self.eod_id, fingerprint,
                                  merge_file)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=self.special_tokens)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=self.special_tokens)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _gpt2_bpe(vocab_file: str, merge_file: str):
    """GPT-2's tokenizer (byte-level BPE, GPT-2's pre-tokenizer, no prefix space) from local files, offline."""
    from transformers import GPT2TokenizerFast

    if not os.path.exists(merge_file):
        raise FileNotFoundError(f"GPT-2 merges file {merge_file} does not exist; give the merges.txt that goes with "
                                f"{vocab_file}")
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"GPT-2 vocabulary {vocab_file} is not a JSON vocab.json ({error}); give GPT-2's vocab file "
                         "(gpt2-vocab.json)") from error
    if not isinstance(vocab, dict) or GPT2_EOD not in vocab:
        raise ValueError(f"GPT-2 vocabulary {vocab_file} has no {GPT2_EOD} token, the end of document of "
                         "GPT2BPETokenizer; use GPT-2's vocab file or one trained with that special token")
    return GPT2TokenizerFast(vocab=vocab_file, merges=merge_file, eos_token=GPT2_EOD)


Tokenizer = SentencePieceTokenizer | HFTokenizer


def load_tokenizer(path: str, tokenizer_type: str, merge_file: str = "", special_tokens: bool = False) -> Tokenizer:
    """`tokenizer_type` is "sentencepiece" (a .model file), "hf" (a local folder AutoTokenizer can read) or "gpt2bpe"
    (`path` GPT-2's vocab.json, `merge_file` its merges.txt), or a Megatron-LM name of one of them
    (MEGATRON_TOKENIZER_TYPES). `special_tokens` (hf, gpt2bpe): encode adds the tokenizer's special tokens (GPT-2's
    adds none); sentencepiece adds none either way, as Megatron-LM's."""
    kind = TOKENIZER_TYPES.get(tokenizer_type)
    if kind is None:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; use one of {', '.join(TOKENIZER_TYPES)}")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"tokenizer {path} does not exist; for the embedded corpus run `python scripts/prepare_corpus.py`, "
            "otherwise train one with scripts/train_tokenizer.py or point data.tokenizer at an existing one")
    if (kind == "gpt2bpe") != bool(merge_file):
        raise ValueError("GPT-2 BPE (gpt2bpe, GPT2BPETokenizer) needs a merges file and no other type takes one: "
                         f"got type {tokenizer_type} with merge file {merge_file!r}")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path, merge_file, special_tokens)


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """The model's vocabulary: the tokenizer's, rounded up to a multiple of `divisible_by`."""
    return -(-vocab_size // divisible_by) * divisible_by


def write_meta(path_prefix: str, info: TokenizerInfo, **stats) -> str:
    """Write `<prefix>.meta.json` (to `path_prefix` + META_SUFFIX); returns the path."""
    path = path_prefix + META_SUFFIX
    with open(path, "w") as f:
        json.dump({"tokenizer": asdict(info), **stats}, f, indent=2)
    return path


def read_meta(path_prefix: str) -> dict | None:
    path = path_prefix + META_SUFFIX
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_tokenizer_matches(path_prefix: str, info: TokenizerInfo) -> bool:
    """Raise TokenizerMismatchError if `<prefix>.meta.json` names another tokenizer. Returns False when the data
    has no meta file (made by another tool), so there is nothing to check."""
    meta = read_meta(path_prefix)
    if meta is None:
        return False
    made = meta["tokenizer"]
    if made["fingerprint"] != info.fingerprint or made["eod_id"] != info.eod_id:
        raise TokenizerMismatchError(
            f"{path_prefix}.bin was tokenized with {made['type']} tokenizer {made['path']} "
            f"(vocab {made['vocab_size']}, eod {made['eod_id']}, fingerprint {made['fingerprint']}), but the "
            f"configured tokenizer {info.path} differs (vocab {info.vocab_size}, eod {info.eod_id}, fingerprint "
            f"{info.fingerprint}); set data.tokenizer (and data.tokenizer_type) to the one the data was made with, "
            "or re-tokenize the data with scripts/preprocess_data.py --tokenizer <yours>")
    return True


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int = 8000, model_type: str = "bpe",
                        max_sentences: int = 10_000_000, num_threads: int | None = None) -> SentencePieceTokenizer:
    """Train a sentencepiece model on `texts` and write it to `model_path`. Text is kept as is (no normalisation),
    newline is a piece of its own, unknown characters fall back to bytes, and eos (id 2) is the EOD token, so
    decode(encode(text)) == text. Each line is one training sentence; at most `max_sentences`, sampled."""
    import io

    import sentencepiece

    def lines() -> Iterator[str]:
        for text in texts:
            yield from (line for line in text.split("\n") if line.strip())

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=0.9999, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["\n"], allow_whitespace_only_pieces=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, num_threads=num_threads or os.cpu_count(), minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    tmp_path = f"{model_path}.tmp-{os.getpid()}"
    with open(tmp_path, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp_path, model_path)
    return SentencePieceTokenizer(model_path)
