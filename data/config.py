"""The `data:` section of the config."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from data.tokenizer import TOKENIZER_TYPES
from errors import ConfigError

BLEND_EXAMPLE = '"0.7 corpus_a_text_document 0.3 corpus_b_text_document"'


@dataclass
class DataConfig:
    # The datasets (a prefix = the path without .bin/.idx), Megatron-LM's --data-path: one prefix, several (each
    # sampled in proportion to its tokens), or a weighted blend, weights then prefixes, alternating. A list, or one
    # string whose entries are separated by whitespace (Megatron's blend string "0.7 A 0.3 B") or commas.
    paths: list[str] = field(default_factory=lambda: ["corpus/shakespeare_text_document"])
    split: str = "969,30,1"  # train, valid, test proportions of the documents of `paths` (unused with valid_paths)
    # A validation set of its own, a blend like `paths` (e.g. corpus/english/english_valid_text_document): then all
    # of `paths` trains and `split` is not used. Empty: validation is cut from `paths` by `split`.
    valid_paths: list[str] = field(default_factory=list)
    seq_length: int = 1024
    tokenizer: str = "corpus/tokenizer.model"  # sentencepiece .model file, Hugging Face tokenizer folder, GPT-2 vocab
    # sentencepiece | hf | gpt2bpe, or Megatron-LM's name of one (SentencePieceTokenizer, HuggingFaceTokenizer,
    # GPT2BPETokenizer, ...)
    tokenizer_type: str = "sentencepiece"
    merge_file: str = ""  # gpt2bpe: GPT-2's merges.txt (Megatron's --merge-file); data.tokenizer is its vocab.json
    vocab_divisible_by: int = 1024  # the model's vocabulary is the tokenizer's, padded to a multiple of this
    cache_dir: str = ""  # sample-index cache; "" = next to the data
    prefetch: int = 2  # micro-batches prepared ahead by a background thread

    def blend(self) -> tuple[list[str], list[float] | None]:
        """data.paths as (prefixes, weights), weights None when none are given (see parse_blend)."""
        return parse_blend(self.paths, "data.paths")

    def valid_blend(self) -> tuple[list[str], list[float] | None] | None:
        """data.valid_paths like data.paths; None when empty (validation is cut from data.paths)."""
        return parse_blend(self.valid_paths, "data.valid_paths") if self.valid_paths else None

    def validate(self) -> None:
        self.blend()
        self.valid_blend()
        if self.seq_length <= 0:
            raise ConfigError("data.seq_length", f"is {self.seq_length}; it must be positive")
        parts = self.split.split(",")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) != 3 or min(nums) < 0 or nums[0] <= 0:
            raise ConfigError("data.split", f"is {self.split!r}; use three non-negative weights such as 969,30,1")
        kind = TOKENIZER_TYPES.get(self.tokenizer_type)
        if kind is None:
            raise ConfigError("data.tokenizer_type", f"is {self.tokenizer_type!r}; use one of "
                              f"{', '.join(TOKENIZER_TYPES)}")
        if (kind == "gpt2bpe") != bool(self.merge_file):
            raise ConfigError("data.merge_file", f"is {self.merge_file!r} with data.tokenizer_type="
                              f"{self.tokenizer_type}; GPT-2 BPE (gpt2bpe, GPT2BPETokenizer) needs its merges.txt "
                              "here and data.tokenizer its vocab.json, and no other tokenizer type takes one")
        if self.vocab_divisible_by <= 0:
            raise ConfigError("data.vocab_divisible_by", f"is {self.vocab_divisible_by}; it must be positive")


def parse_blend(entries: list[str], key: str) -> tuple[list[str], list[float] | None]:
    """A blend list (data.paths, data.valid_paths) as (prefixes, weights), weights None when none are given.
    Megatron-LM's reading (megatron/core/datasets/utils.py, get_blend_from_list), but strict: a weighted blend
    starts with a weight and alternates weight and prefix, weights are finite and non-negative, not all zero;
    datasets of weight 0 are left out. Anything else is a ConfigError naming the fix."""
    items = [item for entry in entries for item in entry.split()]
    if not items:
        raise ConfigError(key, f"is empty; give a .bin/.idx prefix, or a blend such as {BLEND_EXAMPLE}")
    given = " ".join(items)
    numbers = [_number(item) for item in items]
    if numbers[0] is None:  # prefixes only
        for item, number in zip(items, numbers):
            if number is not None:
                raise ConfigError(key, f"is {given!r}: {item!r} looks like a weight, but the list does "
                                  "not start with one; give every dataset a weight before its prefix, such as "
                                  f"{BLEND_EXAMPLE}, or none at all")
        return items, None
    if len(items) % 2:
        raise ConfigError(key, f"is {given!r}: {len(items)} entries, but a weighted blend alternates "
                          f"weight and prefix (an even count), such as {BLEND_EXAMPLE}")
    pairs = list(zip(items[0::2], numbers[0::2], items[1::2], numbers[1::2]))
    for raw_weight, weight, prefix, prefix_number in pairs:
        if weight is None:
            raise ConfigError(key, f"is {given!r}: {raw_weight!r} stands where a weight belongs (before "
                              f"{prefix!r}); a weighted blend alternates weight and prefix, such as "
                              f"{BLEND_EXAMPLE}")
        if prefix_number is not None:
            raise ConfigError(key, f"is {given!r}: {prefix!r} stands where a prefix belongs (after weight "
                              f"{raw_weight}); a weighted blend alternates weight and prefix, such as "
                              f"{BLEND_EXAMPLE}")
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(key, f"is {given!r}: the weight {raw_weight} of {prefix} is not a finite "
                              "non-negative number; weights are shares such as 0.7 and 0.3")
    kept = [(prefix, weight) for _, weight, prefix, _ in pairs if weight > 0]
    if not kept:
        raise ConfigError(key, f"is {given!r}: every weight is zero; give at least one dataset a "
                          "positive weight")
    return [prefix for prefix, _ in kept], [weight for _, weight in kept]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
