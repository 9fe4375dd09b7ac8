"""Expert backends, picked by `moe.backend` (the names: moe/config.py BACKENDS). Each maps to a module and
class, imported on demand so that backends needing Triton or CUDA cost nothing when unused."""
from __future__ import annotations

import importlib

from moe.config import BACKENDS, MoEConfig
from moe.experts.base import Experts

_CLASSES = {
    "reference": ("moe.experts.reference", "ReferenceExperts"),
    "padded": ("moe.experts.padded", "PaddedExperts"),
    "grouped": ("moe.experts.grouped", "GroupedExperts"),
    "scatter": ("moe.experts.scatter", "ScatterExperts"),
    "blocksparse": ("moe.experts.blocksparse", "BlockSparseExperts"),
}
assert set(_CLASSES) == set(BACKENDS), "moe/config.py BACKENDS and the backend modules disagree"


def backend_class(name: str) -> type[Experts]:
    if name not in _CLASSES:
        raise ValueError(f"moe.backend={name!r} is unknown: use one of {sorted(BACKENDS)}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def build_experts(cfg: MoEConfig, hidden_size: int, ffn_hidden_size: int, activation: str, init_std: float,
                  output_std: float, local: range | None = None) -> Experts:
    """The experts of one MoE layer, `local` of the cfg.num_experts (all by default). The Triton backends get
    the moe.kernels section."""
    cls = backend_class(cfg.backend)
    kwargs = {"kernels": cfg.kernels} if cfg.backend == "blocksparse" else {}
    return cls(cfg.num_experts, hidden_size, cfg.ffn_hidden_size or ffn_hidden_size, activation, init_std,
               output_std, local, **kwargs)
