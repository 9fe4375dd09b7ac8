"""The `data:` section of the config."""
from __future__ import annotations

from dataclasses import dataclass, field

from errors import ConfigError


@dataclass
class DataConfig:
    # Megatron-style blend: ["prefix"] or ["0.7", "prefixA", "0.3", "prefixB"] (prefix = path without .bin/.idx)
    paths: list[str] = field(default_factory=lambda: ["corpus/shakespeare_text_document"])
    split: str = "969,30,1"  # train, valid, test proportions of the documents of `paths` (unused with valid_paths)
    # A validation set of its own, a blend like `paths` (e.g. corpus/english/english_valid_text_document): then all
    # of `paths` trains and `split` is not used. Empty: validation is cut from `paths` by `split`.
    valid_paths: list[str] = field(default_factory=list)
    seq_length: int = 1024
    tokenizer: str = "corpus/tokenizer.model"  # sentencepiece .model file, or a Hugging Face tokenizer folder
    tokenizer_type: str = "sentencepiece"  # sentencepiece | hf
    vocab_divisible_by: int = 1024  # the model's vocabulary is the tokenizer's, padded to a multiple of this
    cache_dir: str = ""  # sample-index cache; "" = next to the data
    prefetch: int = 2  # micro-batches prepared ahead by a background thread

    def validate(self) -> None:
        if not self.paths:
            raise ConfigError("data.paths", "is empty; give at least one .bin/.idx prefix")
        if self.seq_length <= 0:
            raise ConfigError("data.seq_length", f"is {self.seq_length}; it must be positive")
        parts = self.split.split(",")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) != 3 or min(nums) < 0 or nums[0] <= 0:
            raise ConfigError("data.split", f"is {self.split!r}; use three non-negative weights such as 969,30,1")
        if self.tokenizer_type not in ("sentencepiece", "hf"):
            raise ConfigError("data.tokenizer_type", f"is {self.tokenizer_type!r}; use sentencepiece or hf")
        if self.vocab_divisible_by <= 0:
            raise ConfigError("data.vocab_divisible_by", f"is {self.vocab_divisible_by}; it must be positive")
