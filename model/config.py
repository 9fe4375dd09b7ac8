"""The `model:` section of the config."""
from __future__ import annotations

from dataclasses import dataclass

from errors import ConfigError

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    ffn_hidden_size: int = 0  # 0: 4 x hidden_size
    vocab_size: int = 0  # 0: the tokenizer's, padded to data.vocab_divisible_by
    position: str = "learned"  # learned | rope
    activation: str = "gelu"  # gelu | swiglu
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    attention_backend: str = "auto"  # auto (cudnn, flash, efficient, math: the first that runs) | one of them

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def validate(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}", f"is {getattr(self, key)}; it must be positive")
        if self.hidden_size % self.num_heads:
            near = _divisor_near(self.hidden_size, self.num_heads)
            raise ConfigError("model.num_heads", f"is {self.num_heads} but must divide model.hidden_size="
                              f"{self.hidden_size}; pick a divisor such as {near}")
        if self.position not in ("learned", "rope"):
            raise ConfigError("model.position", f"is {self.position!r}; use learned or rope")
        if self.position == "rope" and (self.hidden_size // self.num_heads) % 2:
            raise ConfigError("model.num_heads", "gives an odd head size, which rotary positions cannot use")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError("model.attention_backend", f"is {self.attention_backend!r}; use one of "
                              f"{', '.join(ATTENTION_BACKENDS)}")
        if self.activation not in ("gelu", "swiglu"):
            raise ConfigError("model.activation", f"is {self.activation!r}; use gelu or swiglu")
        if self.init_std <= 0:
            raise ConfigError("model.init_std", f"is {self.init_std}; it must be positive")
        if self.vocab_size < 0 or self.ffn_hidden_size < 0:
            raise ConfigError("model.vocab_size" if self.vocab_size < 0 else "model.ffn_hidden_size",
                              "must be >= 0 (0 derives it)")


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))
