"""Checkpoints that never lose a run: the training state (train/checkpoint_state.py: DCP shards, optimizer
states, RNG) in atomically committed folders (train/checkpoint_storage.py: manifest, `latest`, pruning),
verified against the manifest before anything is loaded.

    step-N/meta.json   step, consumed_samples, lr of the next step, skipped_in_row, world layout, the resolved config,
                       the id of the run that wrote it and the (run id, step) that run resumed from

A checkpoint is used only when every file the loader reads is what a save writes (`checkpoint_problem`: the
manifest's sizes and checksums, meta.json's fields, the RNG files' JSON, DCP's metadata through a restricted
unpickler); otherwise resume=auto skips it as incomplete and a given path fails, each with one line naming the
file. resume=auto falls back only along the lineage of `latest` (checkpoints of the run that wrote it up to its
step, then of the run it resumed from up to the step it resumed at, and so on), never to a folder another run
left there, nor forward of `latest`.

Every rank calls every method of `Checkpointer` (they are collective): the main rank writes the shared files
and the folders, all ranks write their DCP shards and RNG states, and each outcome is agreed by an all-reduce,
so a failure on any rank raises CheckpointError on every rank, leaving earlier checkpoints and `latest` intact.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from parallel.comm import all_reduce_sum, is_distributed
from parallel.shards import shard_specs
from parallel.state import ParallelState
from train.checkpoint_state import (
    SafeReader,
    dcp_quiet,
    load_optim,
    model_tensors,
    optim_templates,
    optim_tensors,
    owner,
    rng_state,
    saved_views,
    set_rng_state,
)
from train.checkpoint_storage import META, STEP_DIR, CheckpointError, CheckpointFolders, manifest_problem, write_json
from train.config import CheckpointConfig

__all__ = ["CheckpointError", "Checkpointer"]


class Checkpointer:
    """Saves and loads the training state of one run."""

    def __init__(self, root: str | Path, cfg: CheckpointConfig, ps: ParallelState, config: dict):
        self.folders = CheckpointFolders(root, cfg.keep)
        self.root, self.cfg, self.ps, self.config = Path(root), cfg, ps, config
        self.run_id = uuid.uuid4().hex  # this run's; the main rank's is the one recorded
        self.parent: dict | None = None  # the checkpoint this run resumed from: {"run_id", "step"}
        self._pending = None  # (future, step) of an async save not yet committed
        self._verified: set[Path] = set()
        # an async save's collectives run in a background thread: give them their own group, so they never
        # interleave with the training's collectives on the default one
        self._async_group = (torch.distributed.new_group(backend="gloo")
                             if cfg.async_save and cfg.save and is_distributed() else None)

    def due(self, step: int, last: bool) -> bool:
        """Whether step `step` (the run's last when `last`) is saved: every checkpoint.interval steps and at the end."""
        return self.cfg.save and (last or bool(self.cfg.interval and step % self.cfg.interval == 0))

    # ------------------------------------------------------------------------------------------ saving

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
        """Write step-<step>/ (DCP + meta + RNG + manifest), point `latest` at it, drop all but the newest `keep`.
        Raises CheckpointError on any failure, leaving earlier checkpoints and `latest` untouched."""
        self.wait()
        if not self.cfg.save:
            return
        tmp = self.folders.tmp(step)
        error = None
        try:
            if self.ps.is_main:
                self.folders.prepare(step)
            self._agree_failed(False)  # barrier: the folder is clean before anyone writes
            state = saved_views({**model_tensors(model), **optim_tensors(model, optimizer)}, model,
                                shard_specs(model, self.ps), self.ps.device, gather=True)
            writer = dcp.FileSystemWriter(tmp)
            with dcp_quiet():
                if self.cfg.async_save:
                    future = dcp.async_save(state, storage_writer=writer, process_group=self._async_group,
                                            no_dist=not is_distributed())
                else:
                    dcp.save(state, storage_writer=writer, no_dist=not is_distributed())
            write_json(tmp / f"rng-{self.ps.rank}.json", rng_state())
            if self.ps.is_main:
                layout = {"world_size": self.ps.world_size, **self.config.get("parallel", {})}
                write_json(tmp / META, {**meta, "step": step, "layout": layout, "run_id": self.run_id,
                                        "parent": self.parent, "config": self.config})
        except (Exception, CheckpointException) as e:  # re-raised below as CheckpointError on every rank
            _reraise_interrupt(e)
            error = e
        if self._agree_failed(error is not None):
            self._fail(step, error)
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
            _reraise_interrupt(e)
            error = e
        if self._agree_failed(error is not None):
            self._fail(step, error)
        self._commit(step)

    def _commit(self, step: int) -> None:
        error = None
        if self.ps.is_main:
            try:
                print(f"checkpoint: saved {self.folders.commit(step, self.run_id, self.parent)}", flush=True)
            except (Exception, CheckpointException) as e:
                error = e
        if self._agree_failed(error is not None):
            self._fail(step, error)

    def _fail(self, step: int, error: BaseException | None):
        tmp = self.folders.tmp(step)
        if self.ps.is_main:
            self.folders.discard(step)
        where = f"{tmp}: {_describe(error)}" if error is not None else f"{tmp} on another rank"
        previous = self.folders.checkpoints()
        kept = f"the previous checkpoint {previous[0][1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"saving the checkpoint of step {step} failed writing {where}; {kept}. Free disk "
                              f"space or make {self.root} writable, then resume with checkpoint.resume=auto") from error

    def _agree_failed(self, failed: bool) -> bool:
        """True on every rank when any rank failed (an all-reduce, so also a barrier)."""
        if not is_distributed():
            return failed
        return all_reduce_sum(torch.tensor([float(failed)], device=self.ps.device)).item() > 0

    # ------------------------------------------------------------------------------------------ finding

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: None for a fresh run (resume="", or auto with no checkpoint at all).
        auto takes `latest`, falling back (and saying so) past damaged checkpoints along its lineage only."""
        if not resume:
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.resume={resume}: {path} does not exist; give a step-N folder "
                                      f"such as {self.root / 'step-100'}, or checkpoint.resume=auto")
            if not STEP_DIR.fullmatch(path.name):
                raise CheckpointError(f"checkpoint.resume={resume}: {path.name} is not a step-N folder (a .tmp "
                                      "folder is a save that did not finish); give a step-N folder or auto")
            self.verify(path)
            return path
        candidates, why = self._lineage_candidates()
        if not candidates:
            partial = self.folders.unfinished()
            note = f" (ignoring unfinished saves: {', '.join(partial)})" if partial else ""
            self._say(f"checkpoint.resume=auto: no checkpoint in {self.root}{note}; starting from scratch")
            return None
        problems = []
        for i, path in enumerate(candidates):
            problem = self._main_verdict(path)
            if problem is None:
                self._say(f"checkpoint.resume=auto: resuming from {path}, {why}" if not i else
                          f"checkpoint.resume=auto: falling back to {path}, the newest usable checkpoint along "
                          "the lineage of latest")
                return path
            problems.append(problem)
            self._say(f"checkpoint.resume=auto: skipping {path}: {problem}")
        raise CheckpointError(f"checkpoint.resume=auto: no usable checkpoint along the lineage of latest in "
                              f"{self.root}: {'; '.join(problems)}. Restore or delete the damaged folders, resume "
                              "from a given step-N folder, or start from scratch with checkpoint.resume=''")

    def _lineage_candidates(self) -> tuple[list[Path], str]:
        """The folders resume=auto may take, in order, and why the first: `latest`, then the older checkpoints of
        its lineage, newest first (without lineage records, from earlier versions: every older checkpoint)."""
        found = self.folders.checkpoints()  # newest first
        latest = self.folders.latest()
        if latest is None:
            return [path for _, path in found], "the newest checkpoint (no latest pointer)"
        latest_path, run_id = latest
        steps = {path: step for step, path in found}
        if latest_path not in steps:
            self._say(f"checkpoint.resume=auto: {self.root / 'latest'} names {latest_path.name}, which does not "
                      "exist; using the newest checkpoint")
            return [path for _, path in found], "the newest checkpoint"
        bound = steps[latest_path]
        older = [path for step, path in found if step < bound]
        if run_id is None:
            return [latest_path] + older, "the one latest names"
        chain, lineage, run, limit = [], self.folders.lineage(), run_id, bound
        while run is not None and all(r != run for r, _ in chain):  # (run, highest step of it on the chain)
            chain.append((run, limit))
            parent = lineage.get(run)
            run, limit = (parent.get("run_id"), parent.get("step", -1)) if isinstance(parent, dict) else (None, 0)
        allowed = [path for path in older if self._written_by(path, chain)]
        return [latest_path] + allowed, "the one latest names"

    def _written_by(self, path: Path, chain: list[tuple[str, int]]) -> bool:
        """Whether `path` holds a checkpoint of a run of `chain` at or below that run's step there (read from its
        meta.json; an unreadable one counts as on the chain, to be reported as damaged)."""
        try:
            meta = json.loads((path / META).read_text())
            run, step = meta["run_id"], meta["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return True
        return any(run == r and step <= limit for r, limit in chain)

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
            problem = checkpoint_problem(path)
        if self._agree_failed(problem is not None):
            return problem or "rejected by the main rank"
        self._verified.add(path)
        return None

    def _say(self, text: str) -> None:
        if self.ps.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------------------------------------ loading

    def load(self, path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Load model, optimizer and (same world size) this rank's RNG states from `path`; return meta.json.
        optimizer=None loads the model's tensors only (export, inference)."""
        path = Path(path)
        self.verify(path)
        meta = json.loads((path / META).read_text())  # checked by checkpoint_problem
        self.parent = {"run_id": meta.get("run_id"), "step": meta["step"]}
        stored = SafeReader(path).read_metadata().state_dict_metadata
        shards = shard_specs(model, self.ps)
        tensors = model_tensors(model)
        if optimizer is not None:
            tensors.update(optim_templates(model, optimizer, stored, shards))
        views = saved_views(tensors, model, shards, self.ps.device, gather=False)
        self._check_shapes(path, meta, views, stored)
        try:
            with dcp_quiet():
                dcp.load(views, storage_reader=SafeReader(path), no_dist=not is_distributed())
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"reading checkpoint {path} failed: {_describe(e)}") from e
        for key, view in views.items():  # full tensors of chunked slices; DTensor.from_local may have copied
            spec = shards.get(owner(key))
            local = (view.to_local() if hasattr(view, "to_local") else
                     spec.local_slice(view) if spec is not None and view.shape != tensors[key].shape else view)
            if local.data_ptr() != tensors[key].data_ptr():
                tensors[key].copy_(local)
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        if optimizer is None:
            return meta
        load_optim(model, optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")})
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


def _reraise_interrupt(error: BaseException) -> None:
    """DCP wraps what its writers raise, a KeyboardInterrupt (the second Ctrl-C) among them: that one stays an
    interrupt, not a failed save."""
    if isinstance(error, CheckpointException) and any(
            isinstance(e, KeyboardInterrupt) for e, _ in error.failures.values()):
        raise KeyboardInterrupt from error


def _describe(error: BaseException) -> str:
    """One line: DCP's CheckpointException (a BaseException) carries each failed rank's exception and traceback."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {r}: {_describe(e)}" for r, (e, _) in error.failures.items())
    return f"{type(error).__name__}: {error}"


def _config_diff(saved: dict, current: dict, sections) -> str:
    """The first dotted keys of `sections` whose values differ, as 'key: saved, now'."""
    def flat(tree, prefix=""):
        for k, v in tree.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    old, new = (dict(flat({s: tree.get(s, {}) for s in sections})) for tree in (saved, current))
    diffs = [f"{k}: {old[k]!r} saved, {new.get(k)!r} now" for k in old if old[k] != new.get(k)]
    return ", ".join(diffs[:6])


META_FIELDS = {"step": int, "layout": dict}  # what the checkpointer writes; the trainer checks what it adds
RNG_FIELDS = ("python", "numpy", "torch", "cuda")


def checkpoint_problem(path: Path) -> str | None:
    """What makes `path` other than a complete checkpoint this code wrote, naming the file, or None: the manifest
    (sizes and checksums of every file), then the content of each file the loader reads."""
    problem = manifest_problem(path)
    if problem is not None:
        return problem
    meta = _json_problem(path / META, dict)
    if isinstance(meta, str):
        return meta
    for key, kind in META_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"{path / META} has no valid {key!r} ({meta.get(key)!r})"
    if not isinstance(meta["layout"].get("world_size"), int):
        return f"{path / META} has no valid layout.world_size ({meta['layout'].get('world_size')!r})"
    for rng in sorted(path.glob("rng-*.json")):
        state = _json_problem(rng, dict)
        if isinstance(state, str):
            return state
        if any(k not in state for k in RNG_FIELDS):
            return f"{rng} lacks the generator states {[k for k in RNG_FIELDS if k not in state]}"
    try:
        SafeReader(path).read_metadata()
    except CheckpointError as e:
        return str(e)
    return None


def _json_problem(path: Path, kind: type):
    """The parsed JSON of `path` when it is a `kind`, else a one-line problem naming the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:80]})"
    return value if isinstance(value, kind) else f"{path} holds a {type(value).__name__}, not a {kind.__name__}"
