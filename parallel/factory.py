"""`build_layers(ps)`: the layer factory for this rank (parallel/layers.py describes the protocol)."""
from __future__ import annotations

from parallel.layers import Layers
from parallel.state import ParallelState


def build_layers(ps: ParallelState) -> Layers:
    """Plain modules when tp = 1; megatron-core's parallel layers (imported only then) when tp > 1."""
    if ps.tp_size == 1:
        return Layers(ps)
    from parallel.tensor import TensorParallelLayers
    return TensorParallelLayers(ps)
