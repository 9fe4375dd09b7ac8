"""Expert backends, picked by `moe.backend`. Each maps to a module and class, imported on demand so that
backends needing Triton or CUDA cost nothing when unused."""
from __future__ import annotations

import importlib

BACKENDS = {
    "reference": ("moe.experts.reference", "ReferenceExperts"),
    "padded": ("moe.experts.padded", "PaddedExperts"),
    "grouped": ("moe.experts.grouped", "GroupedExperts"),
    "scatter": ("moe.experts.scatter", "ScatterExperts"),
    "blocksparse": ("moe.experts.blocksparse", "BlockSparseExperts"),
}


def backend_class(name: str):
    if name not in BACKENDS:
        raise ValueError(f"moe.backend={name!r} is unknown: use one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)
