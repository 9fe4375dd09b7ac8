"""The config tree: one typed dataclass per section, loaded from YAML with dotted overrides.

    python pretrain.py --config configs/tiny.yaml train.lr=1e-3 moe.backend=padded

Each package owns its section (`model/config.py`, `moe/config.py`, `data/config.py`, `parallel/config.py`);
`train`, `checkpoint` and `logging` live here. Unknown keys, wrong types and inconsistent values raise
`ConfigError`, whose message names the dotted key and the fix, before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data.config import DataConfig
from errors import ConfigError
from model.config import ModelConfig
from moe.config import MoEConfig
from parallel.config import ParallelConfig


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 8
    global_batch_size: int = 8  # sequences per optimizer step; accumulation = global / (micro x data-parallel)
    lr: float = 6e-4
    min_lr: float = 6e-5  # cosine floor
    warmup_frac: float = 0.01  # of train.steps
    weight_decay: float = 0.1  # matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    log_interval: int = 10
    eval_interval: int = 0  # 0 disables validation
    eval_batches: int = 4
    seed: int = 1234
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    master_weights: bool = True  # with bf16: bf16 weights over fp32 masters (train/precision.py); false: autocast
    compile: bool = False  # torch.compile each block (the paper configs turn it on)
    # with compile, on a GPU: replay each block's compiled forward and backward as CUDA graphs (torch.compile's
    # mode reduce-overhead): no kernel launches from the host; needs static shapes, so not with expert parallelism,
    # moe.backend=reference or the dynamic capacity (moe.capacity.factor=0), whose expert sizes reach the host
    cuda_graphs: bool = False
    device: str = "auto"  # auto | cpu | cuda
    max_skipped: int = 5  # consecutive non-finite steps before the run stops

    def accumulation(self, data_parallel: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank: global / (micro x data-parallel)."""
        per_step = self.micro_batch_size * data_parallel
        if self.global_batch_size % per_step:
            raise ConfigError("train.global_batch_size", f"is {self.global_batch_size} but must be divisible by "
                              f"train.micro_batch_size x data-parallel size = {self.micro_batch_size} x "
                              f"{data_parallel}; set it to a multiple of {per_step}")
        return self.global_batch_size // per_step

    def validate(self) -> None:
        for key in ("steps", "micro_batch_size", "global_batch_size", "log_interval", "eval_batches"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}", f"is {getattr(self, key)}; it must be positive")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("train.min_lr" if self.lr > 0 else "train.lr",
                              f"gives lr={self.lr}, min_lr={self.min_lr}; need 0 <= min_lr <= lr and lr > 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", f"is {getattr(self, key)}; Adam's betas lie in [0, 1), such as "
                                  "0.9 and 0.95")
        if self.adam_eps <= 0 or self.weight_decay < 0:
            raise ConfigError("train.adam_eps" if self.adam_eps <= 0 else "train.weight_decay",
                              "is out of range (adam_eps > 0, weight_decay >= 0)")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError("train.warmup_frac", f"is {self.warmup_frac}; use a fraction in [0, 1)")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError("train.dtype", f"is {self.dtype!r}; use auto, bf16 or fp32")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("train.device", f"is {self.device!r}; use auto, cpu or cuda")
        if self.eval_interval < 0 or self.clip_grad < 0 or self.max_skipped < 1:
            raise ConfigError("train.eval_interval" if self.eval_interval < 0 else
                              "train.clip_grad" if self.clip_grad < 0 else "train.max_skipped",
                              "is out of range (eval_interval >= 0, clip_grad >= 0, max_skipped >= 1)")


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 2  # newest checkpoints kept
    # "" (fresh run) | auto (<run_dir>/checkpoints/latest, falling back to the newest complete one; fresh only
    # when there is no checkpoint at all) | a step-N folder (must exist and verify). See train/checkpoint.py
    resume: str = ""
    async_save: bool = False  # dcp.async_save: copy to host memory, write in a background thread (for GPUs)
    save: bool = True  # write checkpoints at all

    def validate(self) -> None:
        if self.interval < 0 or self.keep < 1:
            raise ConfigError("checkpoint.interval" if self.interval < 0 else "checkpoint.keep",
                              "is out of range (interval >= 0, keep >= 1)")
        if self.resume.strip().lower() in ("latest", "last", "yes", "true", "on"):
            raise ConfigError("checkpoint.resume", f"is {self.resume!r}; use auto (the latest checkpoint of "
                              "logging.run_dir), a step-N folder, or '' for a fresh run")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"  # config.yaml, metrics.jsonl, checkpoints/ go here
    # a run_dir that holds a previous run is refused unless checkpoint.resume continues it, or with overwrite=true
    # (the previous run's files move to <run_dir>/previous-<time>/, nothing is deleted)
    overwrite: bool = False
    # the same record as metrics.jsonl to wandb (offline automatically without an API key; a resumed run continues
    # the wandb run whose id <run_dir>/wandb.json keeps) and to TensorBoard (<run_dir>/tensorboard); train/metrics.py
    wandb: bool = False
    wandb_project: str = "moetron"
    tensorboard: bool = False

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("logging.run_dir", "is empty; give a folder for the run's files")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int = 1) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        self.model.validate()
        self.moe.moe_layer_indices(self.model.num_layers)
        p, t = self.parallel, self.train
        if world_size % (p.tensor * p.expert):
            raise ConfigError("parallel.tensor", f"x parallel.expert = {p.tensor} x {p.expert} must divide the "
                              f"world size {world_size}; change the sizes or the number of processes")
        if self.moe.num_experts and self.moe.num_experts % p.expert:
            raise ConfigError("parallel.expert", f"is {p.expert} but must divide moe.num_experts="
                              f"{self.moe.num_experts}")
        if self.moe.num_experts == 0 and p.expert > 1:
            raise ConfigError("parallel.expert", "is > 1 but the model is dense (moe.num_experts=0)")
        if self.model.num_heads % p.tensor:
            raise ConfigError("parallel.tensor", f"is {p.tensor} but must divide model.num_heads="
                              f"{self.model.num_heads}")
        if self.model.ffn % p.tensor:
            raise ConfigError("parallel.tensor", f"is {p.tensor} but must divide the dense MLP width "
                              f"model.ffn_hidden_size={self.model.ffn}")
        if self.model.vocab_size % p.tensor:
            raise ConfigError("model.vocab_size", f"is {self.model.vocab_size} but parallel.tensor={p.tensor} must "
                              f"divide it; pad it to a multiple of {p.tensor} (or 0: the tokenizer's, padded)")
        if not self.model.vocab_size and self.data.vocab_divisible_by % p.tensor:
            raise ConfigError("data.vocab_divisible_by", f"is {self.data.vocab_divisible_by} but must be a multiple "
                              f"of parallel.tensor={p.tensor}, so the padded vocabulary splits evenly")
        if t.cuda_graphs and not t.compile:
            raise ConfigError("train.cuda_graphs", "is true but train.compile is false; the graphs are those of "
                              "the compiled blocks: set train.compile=true")
        if t.cuda_graphs and p.expert > 1:
            raise ConfigError("train.cuda_graphs", f"is true with parallel.expert={p.expert}: the all-to-all's "
                              "uneven splits change the shapes every step; set train.cuda_graphs=false")
        m = self.moe
        if t.cuda_graphs and m.sizes_reach_host:
            raise ConfigError("train.cuda_graphs", f"is true with moe.backend={m.backend}"
                              f"{' and moe.capacity.factor=0' if m.backend == 'padded' else ''}: its expert sizes "
                              "are read to the host every step, which a CUDA graph cannot replay; use "
                              "moe.backend=scatter|grouped|blocksparse (or padded with a capacity factor > 0), or "
                              "set train.cuda_graphs=false")
        t.accumulation(world_size // p.tensor)  # batches are split over every rank of one tensor-parallel position

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading

def _check_type(key: str, value, tp):
    """Return value coerced to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list):
            return [_check_type(key, v, item) for v in value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(key, f"is {value!r}; it must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(key, f"is {value!r} ({type(value).__name__}) but must be of type {name}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    renamed = getattr(cls, "RENAMED", {})  # keys of earlier versions -> their spelling now
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key in renamed:
            raise ConfigError(dotted, f"was renamed: write {prefix}{renamed[key]}={value!r} (or nest it under "
                              f"{prefix}{renamed[key].split('.')[0]}: in the YAML)")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {sorted(names)}"
            raise ConfigError(dotted, f"is not a known key{hint}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(dotted, f"is a section and must be a mapping, not {value!r}")
            kwargs[key] = _build(hints[key], value, dotted + ".")
        else:
            kwargs[key] = _check_type(dotted, value, hints[key])
    return cls(**kwargs)


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(item, "is not an override; write dotted.key=value, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"cannot be set: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(key, f"has a value {raw!r} that is not valid YAML; quote it or fix its syntax") from None


def load_config(path: str | Path | None, overrides: list[str] = (), world_size: int = 1) -> Config:
    """Read YAML, apply dotted overrides, type-check, validate. Raises ConfigError on any problem."""
    tree = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", f"file {path} does not exist; pick one of configs/*.yaml")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError("--config", f"file {path} is not valid YAML{where}: {problem}") from None
        if not isinstance(tree, dict):
            raise ConfigError("--config", f"file {path} must hold a mapping of sections")
    for item in overrides:
        _apply_override(tree, item)
    return config_from_tree(tree, world_size)


def config_from_tree(tree: dict, world_size: int = 1) -> Config:
    """A config from its nested dict (a parsed YAML, or the `config` a checkpoint's meta.json records):
    type-checked and validated. Raises ConfigError on any problem."""
    cfg = _build(Config, tree, "")
    cfg.validate(world_size)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
