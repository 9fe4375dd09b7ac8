"""Checkpoints that never lose a run: torch.distributed.checkpoint (DCP) shards in atomically renamed folders,
verified against a manifest before anything is loaded.

Layout under <run_dir>/checkpoints/:

    latest                "step-12": the newest complete checkpoint; replaced atomically, after everything else
    step-12/              one complete checkpoint; a save is written to step-12.tmp/ and renamed when complete
      .metadata           DCP metadata
      __<r>_0.distcp      DCP data, tensors only: "model.<name>" (parameters and persistent buffers) and
                          "optim.<param name>.<state>" (exp_avg, exp_avg_sq, step), keyed by full parameter names
      meta.json           step, consumed_samples, lr of the next step, skipped_in_row, world layout, the resolved config
      rng-<rank>.json     that rank's python, numpy, torch CPU and CUDA generator states
      manifest.json       size and sha256 of every other file; written last, checked before anything is read

Nothing is unpickled except DCP's own files, and only after their checksums match the manifest: metadata and
RNG states are JSON, and the DCP state holds only tensors.

Resharding: every tensor is saved under its one-process name and shape, whatever the layout. Which tensors
are split over ranks comes from the tags the parallel layers put on parameters (parallel/tensor.py:
`tensor_model_parallel`, `partition_dim`, `partition_stride`; parallel/expert.py: `expert_parallel`, split
along dim 0 over the expert group), or from a model hook that overrides them:

    def checkpoint_shards(self) -> dict[str, ShardSpec]

mapping a parameter or persistent-buffer name to how this rank's tensor is a slice of the full one: an even
split along `dim` over the ranks of process group `group`, in group-rank order; with `chunks` > 1 the tensor is
that many blocks stacked along `dim`, each split separately (a fused q|k|v whose rank keeps its heads of each).
Split tensors and their optimizer states are saved as DTensors of the full shape, so each rank writes its
slice at its offset and any other layout, one process included, reads the slices it needs; chunked ones, whose
slices are not contiguous in the full tensor, are gathered to the full tensor on save and sliced on load.
Untagged tensors are full copies (replicated; DCP writes one).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from parallel.comm import all_reduce_sum, is_distributed
from parallel.state import ParallelState
from train.config import CheckpointConfig

STEP_DIR = re.compile(r"step-(\d+)")
MANIFEST, META, LATEST = "manifest.json", "meta.json", "latest"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the fix."""


@dataclass
class ShardSpec:
    dim: int  # the tensor is split evenly along this dimension
    group: object = None  # over the ranks of this process group; None or one rank: not split
    chunks: int = 1  # stacked blocks along dim, each split separately (fused q|k|v)

    def size(self) -> int:
        return 1 if self.group is None else torch.distributed.get_world_size(self.group)

    def full_shape(self, local_shape) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] *= self.size()
        return tuple(shape)

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor."""
        rank = torch.distributed.get_rank(self.group)
        blocks = full.unflatten(self.dim, (self.chunks, -1))
        return blocks.chunk(self.size(), self.dim + 1)[rank].flatten(self.dim, self.dim + 1)


class Checkpointer:
    """Saves and loads the training state of one run. Every rank calls every method (they are collective)."""

    def __init__(self, root: str | Path, cfg: CheckpointConfig, ps: ParallelState, config: dict):
        self.root, self.cfg, self.ps, self.config = Path(root), cfg, ps, config
        self._pending = None  # (future, step) of an async save not yet committed
        self._verified: set[Path] = set()
        # an async save's collectives run in a background thread: give them their own group, so they never
        # interleave with the training's collectives on the default one
        self._async_group = (torch.distributed.new_group(backend="gloo")
                             if cfg.async_save and cfg.save and is_distributed() else None)

    # ------------------------------------------------------------------------------------------ saving

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
        """Write step-<step>/ (DCP + meta + RNG + manifest), point `latest` at it, drop all but the newest `keep`.
        Raises CheckpointError on any failure, leaving earlier checkpoints and `latest` untouched."""
        self.wait()
        if not self.cfg.save:
            return
        tmp = self.root / f"step-{step}.tmp"
        error = None
        try:
            if self.ps.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob("step-*.tmp"):  # left by a crash
                    shutil.rmtree(stale)
                tmp.mkdir()
            self._agree_failed(False)  # barrier: the folder is clean before anyone writes
            state = _saved_views({**_model_tensors(model), **_optim_tensors(model, optimizer)}, model,
                                 _shards(model, self.ps), self.ps.device, gather=True)
            writer = dcp.FileSystemWriter(tmp)
            with _dcp_quiet():
                if self.cfg.async_save:
                    future = dcp.async_save(state, storage_writer=writer, process_group=self._async_group,
                                            no_dist=not is_distributed())
                else:
                    dcp.save(state, storage_writer=writer, no_dist=not is_distributed())
            _write_json(tmp / f"rng-{self.ps.rank}.json", rng_state())
            if self.ps.is_main:
                layout = {"world_size": self.ps.world_size, **self.config.get("parallel", {})}
                _write_json(tmp / META, {**meta, "step": step, "layout": layout, "config": self.config})
        except (Exception, CheckpointException) as e:  # re-raised below as CheckpointError on every rank
            error = e
        if self._agree_failed(error is not None):
            self._fail(step, tmp, error)
        if self.cfg.async_save:
            self._pending = (future, step)
        else:
            self._commit(step)

    def wait(self) -> None:
        """Finish a pending async save (a no-op otherwise). Call before exit."""
        if self._pending is None:
            return
        future, step = self._pending
        self._pending = None
        error = None
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            error = e
        if self._agree_failed(error is not None):
            self._fail(step, self.root / f"step-{step}.tmp", error)
        self._commit(step)

    def _commit(self, step: int) -> None:
        tmp, final = self.root / f"step-{step}.tmp", self.root / f"step-{step}"
        error = None
        if self.ps.is_main:
            try:
                files = {str(p.relative_to(tmp)): _file_entry(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
                _write_json(tmp / MANIFEST, {"step": step, "files": files})
                _fsync_dir(tmp)
                if final.exists():  # re-saving a step (after resuming from an older one): swap it out
                    old = self.root / f"step-{step}.old"
                    os.replace(final, old)
                    try:
                        os.replace(tmp, final)
                    except OSError:
                        os.replace(old, final)
                        raise
                    shutil.rmtree(old)
                else:
                    os.replace(tmp, final)
                _fsync_dir(self.root)
                _write_atomic(self.root / LATEST, final.name + "\n")
                self._prune(final)
                print(f"checkpoint: saved {final}", flush=True)
            except (Exception, CheckpointException) as e:
                error = e
        if self._agree_failed(error is not None):
            self._fail(step, tmp, error)

    def _prune(self, current: Path) -> None:
        """Keep `current` and the newest keep - 1 others."""
        others = [path for _, path in self.checkpoints() if path != current]
        for path in others[self.cfg.keep - 1:]:
            shutil.rmtree(path)

    def _fail(self, step: int, tmp: Path, error: BaseException | None):
        if self.ps.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        where = f"{tmp}: {_describe(error)}" if error is not None else f"{tmp} on another rank"
        previous = self.checkpoints()
        kept = f"the previous checkpoint {previous[0][1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"saving the checkpoint of step {step} failed writing {where}; {kept}. Free disk "
                              f"space or make {self.root} writable, then resume with checkpoint.resume=auto") from error

    def _agree_failed(self, failed: bool) -> bool:
        """True on every rank when any rank failed (an all-reduce, so also a barrier)."""
        if not is_distributed():
            return failed
        return all_reduce_sum(torch.tensor([float(failed)], device=self.ps.device)).item() > 0

    # ------------------------------------------------------------------------------------------ finding

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of the complete-looking step-N folders, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.fullmatch(p.name))]
        return sorted(found, reverse=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: None for a fresh run (resume="", or auto with no checkpoint at all).
        auto takes the newest complete one, falling back (and saying so) past corrupted or partial ones."""
        if not resume:
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.resume={resume}: {path} does not exist; give a step-N folder "
                                      f"such as {self.root / 'step-100'}, or checkpoint.resume=auto")
            self.verify(path)
            return path
        candidates = [path for _, path in self.checkpoints()]
        latest = self._latest()
        if latest in candidates:  # normally the newest; older when a save crashed before updating it
            candidates.remove(latest)
            candidates.insert(0, latest)
        elif latest is not None:
            self._say(f"checkpoint.resume=auto: {self.root / LATEST} names {latest.name}, which does not exist")
        if not candidates:
            partial = sorted(p.name for p in self.root.glob("step-*.tmp")) if self.root.is_dir() else []
            note = f" (ignoring unfinished saves: {', '.join(partial)})" if partial else ""
            self._say(f"checkpoint.resume=auto: no checkpoint in {self.root}{note}; starting from scratch")
            return None
        problems = []
        for i, path in enumerate(candidates):
            problem = self._main_verdict(path)
            if problem is None:
                if i:
                    self._say(f"checkpoint.resume=auto: falling back to {path}, the newest complete checkpoint")
                return path
            problems.append(problem)
            self._say(f"checkpoint.resume=auto: skipping {path}: {problem}")
        raise CheckpointError(f"checkpoint.resume=auto: no usable checkpoint in {self.root}: {'; '.join(problems)}. "
                              "Restore or delete the damaged folders, or start from scratch with checkpoint.resume=''")

    def verify(self, path: Path) -> None:
        """Raise CheckpointError naming the file when `path` is partial or corrupted."""
        problem = self._main_verdict(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}. Resume from another step-N folder "
                                  "or with checkpoint.resume=auto (the newest complete one)")

    def _main_verdict(self, path: Path) -> str | None:
        """The main rank checks the manifest; every rank gets its verdict (the text only on the main rank)."""
        problem = None
        if self.ps.is_main and path not in self._verified:
            problem = manifest_problem(path)
        if self._agree_failed(problem is not None):
            return problem or "rejected by the main rank"
        self._verified.add(path)
        return None

    def _latest(self) -> Path | None:
        pointer = self.root / LATEST
        return self.root / pointer.read_text().strip() if pointer.is_file() else None

    def _say(self, text: str) -> None:
        if self.ps.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------------------------------------ loading

    def load(self, path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Load model, optimizer and (same world size) this rank's RNG states from `path`; return meta.json."""
        path = Path(path)
        self.verify(path)
        meta = json.loads((path / META).read_text())
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        shards = _shards(model, self.ps)
        tensors = {**_model_tensors(model), **_optim_templates(model, optimizer, stored, shards)}
        views = _saved_views(tensors, model, shards, self.ps.device, gather=False)
        self._check_shapes(path, meta, views, stored)
        try:
            with _dcp_quiet():
                dcp.load(views, storage_reader=dcp.FileSystemReader(path), no_dist=not is_distributed())
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"reading checkpoint {path} failed: {_describe(e)}") from e
        for key, view in views.items():  # full tensors of chunked slices; DTensor.from_local may have copied
            spec = shards.get(_owner(key))
            local = (view.to_local() if hasattr(view, "to_local") else
                     spec.local_slice(view) if spec is not None and view.shape != tensors[key].shape else view)
            if local.data_ptr() != tensors[key].data_ptr():
                tensors[key].copy_(local)
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_optim(model, optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")})
        rng_file = path / f"rng-{self.ps.rank}.json"
        if meta["layout"]["world_size"] == self.ps.world_size and rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        else:
            self._say(f"checkpoint: saved with {meta['layout']['world_size']} processes, running with "
                      f"{self.ps.world_size}: RNG states start fresh (the run continues, not bit-identically)")
        self._say(f"checkpoint: resumed from {path} at step {meta['step']}")
        return meta

    def _check_shapes(self, path, meta, views, stored) -> None:
        problems = []
        for key, t in views.items():
            if key not in stored:
                problems.append(f"{key} is missing from the checkpoint")
            elif tuple(getattr(stored[key], "size", ())) != tuple(t.shape):
                problems.append(f"{key} is {list(stored[key].size)} in the checkpoint but {list(t.shape)} here")
        extra = [k for k in stored if k.startswith("model.") and k not in views]
        if extra:
            problems.append(f"the checkpoint holds tensors this model lacks: {', '.join(extra[:4])}")
        if problems:
            diff = _config_diff(meta.get("config", {}), self.config, ("model", "moe"))
            hint = f"; the saved config differs in {diff}" if diff else ""
            raise CheckpointError(f"checkpoint {path} does not fit this model: {'; '.join(problems[:4])}{hint}. "
                                  f"Use the model and moe sections saved in {path / META}")


# ---------------------------------------------------------------------------------------------- state dicts

@contextlib.contextmanager
def _dcp_quiet():
    """DCP warns that it runs in one process even when told so (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def _param_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) in the optimizer's numbering (the order of its param_groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"]]


def _optim_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in _param_order(model, optimizer):
        for k, v in optimizer.state.get(p, {}).items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"optimizer state {name}.{k} is a {type(v).__name__}; only tensors are saved")
            out[f"optim.{name}.{k}"] = v
    return out


def _optim_templates(model, optimizer, stored: dict, shards: dict[str, ShardSpec]) -> dict[str, torch.Tensor]:
    """Empty tensors for the optimizer states the checkpoint holds: parameter-shaped ones take the local
    parameter's shape and device (resharded on load), the rest (step counters) the stored shape."""
    by_param = {}
    for key, md in stored.items():
        if key.startswith("optim."):
            by_param.setdefault(_owner(key), []).append((key, md))
    out = {}
    for name, p in _param_order(model, optimizer):
        spec = shards.get(name)
        saved = spec.full_shape(p.shape) if spec is not None else tuple(p.shape)
        for key, md in by_param.get(name, []):
            out[key] = (torch.empty_like(p, dtype=md.properties.dtype) if tuple(md.size) == saved
                        else torch.empty(md.size, dtype=md.properties.dtype))
    return out


def _load_optim(model, optimizer, state: dict[str, torch.Tensor]) -> None:
    """Load optim.<name>.<state> entries; hyperparameters stay the current config's."""
    by_param = {}
    for key, v in state.items():
        by_param.setdefault(_owner(key), {})[key.rsplit(".", 1)[1]] = v
    per_param = {i: by_param[name] for i, (name, _) in enumerate(_param_order(model, optimizer)) if name in by_param}
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})


def _shards(model: torch.nn.Module, ps: ParallelState) -> dict[str, ShardSpec]:
    """The tensors split over more than one rank: the model's checkpoint_shards() or the parallel layers' tags."""
    hook = getattr(model, "checkpoint_shards", None)
    if hook is not None:
        specs = hook()
    else:
        specs = {name: spec for name, p in model.named_parameters() if (spec := _tagged(p, ps)) is not None}
    return {name: spec for name, spec in specs.items() if spec.size() > 1}


def _tagged(p: torch.Tensor, ps: ParallelState) -> ShardSpec | None:
    if getattr(p, "expert_parallel", False):
        return ShardSpec(0, ps.ep_group)
    if getattr(p, "tensor_model_parallel", False):
        return ShardSpec(p.partition_dim, ps.tp_group, p.partition_stride)
    return None


def _owner(key: str) -> str:
    """The parameter or buffer name of a state entry: model.<name> or optim.<name>.<state>."""
    return key[len("model."):] if key.startswith("model.") else key[len("optim."):].rsplit(".", 1)[0]


def _saved_views(state: dict[str, torch.Tensor], model, shards: dict[str, ShardSpec], device: torch.device,
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
        name = _owner(key)
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


# ---------------------------------------------------------------------------------------------- RNG

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


# ---------------------------------------------------------------------------------------------- files

def manifest_problem(path: Path) -> str | None:
    """What is wrong with checkpoint folder `path` (missing, truncated or altered files), or None."""
    manifest = path / MANIFEST
    if not path.is_dir():
        return f"{path} does not exist"
    if not manifest.is_file():
        return f"{manifest} is missing (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f} has {size} bytes but the manifest says {want['bytes']} (truncated or overwritten)"
        if _sha256(f) != want["sha256"]:
            return f"{f} does not match its checksum in the manifest (corrupted)"
    for required in (META, ".metadata"):
        if required not in files:
            return f"{path / required} is not in the manifest (not a complete checkpoint)"
    return None


def _describe(error: BaseException) -> str:
    """One line: DCP's CheckpointException (a BaseException) carries each failed rank's exception and traceback."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {r}: {_describe(e)}" for r, (e, _) in error.failures.items())
    return f"{type(error).__name__}: {error}"


def _config_diff(saved: dict, current: dict, sections) -> str:
    diffs = [f"{s}.{k}: {saved[s][k]!r} saved, {current[s].get(k)!r} now" for s in sections
             for k in sorted(saved.get(s, {})) if s in current and saved[s][k] != current[s].get(k)]
    return ", ".join(diffs[:6])


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    with path.open("w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
