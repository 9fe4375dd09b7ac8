"""A moetron checkpoint as one process's GPT, and back: the checkpoint code of train/ does the reading and the
writing (any saved parallel layout loads into one process), this module only picks the model to build."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from model.gpt import GPT
from parallel.state import ParallelState
from train.checkpoint import Checkpointer
from train.checkpoint_state import SafeReader
from train.checkpoint_storage import META, CheckpointError
from train.config import CheckpointConfig, Config, config_from_tree
from train.optim import build_optimizer, lr_at


def one_process_config(tree: dict) -> Config:
    """The config a checkpoint recorded, for one process and the dropless reference experts (the same parameters
    in every backend; the padded backend's capacity drops tokens, which inference should not)."""
    tree = copy.deepcopy(tree)
    tree["parallel"] = {}
    moe = tree.setdefault("moe", {})
    moe["backend"], moe["capacity"] = "reference", {}
    tree.setdefault("checkpoint", {})["resume"] = ""
    return config_from_tree(tree)


def load_checkpoint_model(path: str | Path) -> tuple[GPT, Config, dict]:
    """A step-N folder -> (the GPT in one process, fp32, eval mode; its config; the config as saved)."""
    path = Path(path)
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is not a moetron checkpoint (no {META}); give a step-N folder such as "
                              "runs/tiny/checkpoints/step-120")
    saved = json.loads((path / META).read_text()).get("config")
    if not isinstance(saved, dict) or "model" not in saved:
        raise CheckpointError(f"{path / META} records no config (model and moe sections); it was not written by "
                              "pretrain.py")
    cfg = one_process_config(saved)
    stored = SafeReader(path).read_metadata().state_dict_metadata
    if "model.embed.weight" not in stored:
        raise CheckpointError(f"{path} holds no model.embed.weight; it is not a moetron GPT checkpoint")
    vocab = stored["model.embed.weight"].size[0]  # the padded vocabulary the model was trained with
    model = GPT(cfg.model, cfg.moe, vocab, cfg.data.seq_length)
    Checkpointer(path.parent, CheckpointConfig(), ParallelState(), cfg.to_dict()).load(path, model, None)
    return model.float().eval(), cfg, saved


def save_checkpoint_model(model: GPT, cfg: Config, out: str | Path) -> Path:
    """Write `model` as a step-0 checkpoint under <out>/checkpoints/ with <out>/config.yaml, whose run_dir is
    <out> and resume auto, so that `pretrain.py --config <out>/config.yaml` trains on from it (with a fresh
    optimizer: the checkpoint holds no optimizer state). Returns the step-0 folder."""
    from train.config import save_config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.logging.run_dir, cfg.checkpoint.resume = str(out), "auto"
    save_config(cfg, out / "config.yaml")
    checkpointer = Checkpointer(out / "checkpoints", CheckpointConfig(), ParallelState(), cfg.to_dict())
    optimizer = build_optimizer(model, cfg.train)  # no state yet: nothing of it is saved
    checkpointer.save(0, model, optimizer, {"consumed_samples": 0, "lr": lr_at(0, cfg.train), "skipped_in_row": 0})
    return out / "checkpoints" / "step-0"

