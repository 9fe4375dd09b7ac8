"""The quantities a run derives from its config and layout, computed once (pretrain.py, the dry run) and passed
to whoever needs them."""
from __future__ import annotations

from dataclasses import dataclass

from data.tokenizer import load_tokenizer, padded_vocab_size
from errors import ConfigError
from train.config import Config
from train.flops import flops_per_sequence


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    data_parallel: int  # ranks that split each global batch: world / tensor
    accumulation: int  # micro-batches per optimizer step on each data-parallel rank
    vocab_size: int  # the model's: model.vocab_size, or the tokenizer's padded to data.vocab_divisible_by
    seq_length: int
    global_batch_size: int  # sequences per optimizer step
    flops_per_sequence: float  # forward + backward (train/flops.py)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


def model_vocab_size(cfg: Config) -> int:
    """model.vocab_size, or the tokenizer's vocabulary padded to data.vocab_divisible_by."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type, cfg.data.merge_file)
    except (OSError, ValueError) as e:
        raise ConfigError("data.tokenizer", f"cannot be loaded ({e}); or set model.vocab_size=N") from e
    return padded_vocab_size(tokenizer.vocab_size, cfg.data.vocab_divisible_by)


def check_device(cfg: Config, device_type: str, interpreted: bool) -> None:
    """ConfigError for what this device cannot run: the Triton backends on the CPU need the interpreter (tests),
    which computes bf16 products wrongly."""
    triton = cfg.moe.num_experts and cfg.moe.backend in ("scatter", "blocksparse")
    if device_type != "cpu" or not triton:
        return
    if not interpreted:
        raise ConfigError("moe.backend", f"is {cfg.moe.backend}, whose Triton kernels need a GPU; on the CPU use "
                          "reference, grouped or padded (or TRITON_INTERPRET=1, slow, for tests)")
    if cfg.train.dtype == "bf16":
        raise ConfigError("train.dtype", f"is bf16, which the Triton interpreter that runs moe.backend="
                          f"{cfg.moe.backend} on the CPU computes wrongly; use train.dtype=fp32 (or auto)")


def plan_run(cfg: Config, world_size: int, vocab_size: int | None = None) -> RunPlan:
    """`vocab_size` None: `model_vocab_size(cfg)` (loads the tokenizer when model.vocab_size is 0)."""
    vocab = vocab_size or model_vocab_size(cfg)
    dp = world_size // cfg.parallel.tensor
    return RunPlan(world_size, dp, cfg.train.accumulation(dp), vocab, cfg.data.seq_length,
                   cfg.train.global_batch_size, flops_per_sequence(cfg.model, cfg.moe, vocab, cfg.data.seq_length))
