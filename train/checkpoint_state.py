"""Checkpoint state: what a checkpoint holds and how it maps onto this rank's tensors.

    .metadata, __<r>_0.distcp   torch.distributed.checkpoint (DCP), tensors only: "model.<name>" (parameters and
                                persistent buffers) and "optim.<param name>.<state>" (exp_avg, exp_avg_sq, step),
                                keyed by full parameter names
    rng-<rank>.json             that rank's python, numpy, torch CPU and CUDA generator states

No file of a checkpoint can run code when it is loaded: the RNG states and meta.json are JSON, the DCP tensors
are read with torch.load(weights_only=True) (DCP's own), and DCP's .metadata, a pickle, is read by `SafeReader`
through an unpickler that builds only the metadata classes DCP writes (`METADATA_CLASSES`) and refuses any other
object with a CheckpointError naming the file.

Resharding: every tensor is saved under its one-process name and shape, whatever the layout. Which tensors are
split over ranks comes from parallel/shards.py. Split tensors and their optimizer states are saved as DTensors
of the full shape, so each rank writes its slice at its offset and any other layout, one process included,
reads the slices it needs; chunked ones (the fused q|k|v), whose slices are not contiguous in the full tensor,
are gathered to the full tensor on save and sliced on load. Other tensors are full copies (DCP writes one).
"""
from __future__ import annotations

import contextlib
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from parallel.shards import ShardSpec
from train.checkpoint_storage import CheckpointError

# what DCP pickles into .metadata for a state of tensors (seen with torch 2.11 and 2.13), and nothing else
METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "TensorProperties", "MetadataIndex", "StorageMeta",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "torch": {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds a pickled {module}.{name}, which DCP metadata never holds")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with .metadata read through the restricted unpickler above."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with path.open("rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"{path} is not DCP metadata ({e}); refusing to load it") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; refusing to load it")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def dcp_quiet():
    """DCP warns that it runs in one process even when told so (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def _param_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) in the optimizer's numbering (the order of its param_groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"]]


def optim_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in _param_order(model, optimizer):
        for k, v in optimizer.state.get(p, {}).items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"optimizer state {name}.{k} is a {type(v).__name__}; only tensors are saved")
            out[f"optim.{name}.{k}"] = v
    return out


def optim_templates(model, optimizer, stored: dict, shards: dict[str, ShardSpec]) -> dict[str, torch.Tensor]:
    """Empty tensors for the optimizer states the checkpoint holds: parameter-shaped ones take the local
    parameter's shape and device (resharded on load), the rest (step counters) the stored shape."""
    by_param = {}
    for key, md in stored.items():
        if key.startswith("optim."):
            by_param.setdefault(owner(key), []).append((key, md))
    out = {}
    for name, p in _param_order(model, optimizer):
        spec = shards.get(name)
        saved = spec.full_shape(p.shape) if spec is not None else tuple(p.shape)
        for key, md in by_param.get(name, []):
            out[key] = (torch.empty_like(p, dtype=md.properties.dtype) if tuple(md.size) == saved
                        else torch.empty(md.size, dtype=md.properties.dtype))
    return out


def load_optim(model, optimizer, state: dict[str, torch.Tensor]) -> None:
    """Load optim.<name>.<state> entries; hyperparameters stay the current config's."""
    by_param = {}
    for key, v in state.items():
        by_param.setdefault(owner(key), {})[key.rsplit(".", 1)[1]] = v
    per_param = {i: by_param[name] for i, (name, _) in enumerate(_param_order(model, optimizer)) if name in by_param}
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})


def owner(key: str) -> str:
    """The parameter or buffer name of a state entry: model.<name> or optim.<name>.<state>."""
    return key[len("model."):] if key.startswith("model.") else key[len("optim."):].rsplit(".", 1)[0]


def saved_views(state: dict[str, torch.Tensor], model, shards: dict[str, ShardSpec], device: torch.device,
                 gather: bool) -> dict:
    """The entries as DCP sees them, all in one-process shapes: a split tensor (model.<name>, or optim.<name>.<state>
    of the parameter's shape) becomes a DTensor of the full shape over this rank's slice; a chunked one becomes
    the gathered full tensor (`gather`, to save) or an empty full tensor (to load into, then slice)."""
    if not shards:
        return state
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    meshes, out = {}, {}
    for key, t in state.items():
        name = owner(key)
        spec = shards.get(name)
        if spec is not None and (key.startswith("model.") or t.shape == model.get_parameter(name).shape):
            if id(spec.group) not in meshes:
                meshes[id(spec.group)] = DeviceMesh.from_group(spec.group, device.type)
            mesh = meshes[id(spec.group)]
            full = spec.full_shape(t.shape)
            if spec.chunks == 1:
                t = DTensor.from_local(t, mesh, [Shard(spec.dim)], run_check=False, shape=torch.Size(full),
                                       stride=_contiguous_stride(full))
            elif gather:
                blocks = DTensor.from_local(t.unflatten(spec.dim, (spec.chunks, -1)), mesh, [Shard(spec.dim + 1)],
                                            run_check=False)
                t = blocks.full_tensor().flatten(spec.dim, spec.dim + 1)
            else:
                t = t.new_empty(full)
        out[key] = t
    return out


def _contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def rng_state() -> dict:
    """This process's generator states as JSON-able values."""
    version, words, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"python": [version, list(words), gauss], "numpy": np_state,
            "torch": torch.get_rng_state().tolist(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    np_state = state["numpy"]
    np_state["state"]["key"] = np.array(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
