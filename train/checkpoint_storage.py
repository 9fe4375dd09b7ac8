"""Checkpoint storage: the folders on disk, written so that a crash never leaves a half checkpoint in use.

Layout under <run_dir>/checkpoints/:

    latest                "step-12 <run id>": the newest complete checkpoint and the run that wrote it; replaced
                          atomically, after everything else
    lineage.json          {run id: the (run id, step) it resumed from, or null}: how the runs in this folder descend
    step-12/              one complete checkpoint; a save is written to step-12.tmp/ and renamed when complete
      ...                 the files of train/checkpoint_state.py and the checkpointer's meta.json
      manifest.json       size and sha256 of every other file; written last, checked before anything is read

`CheckpointFolders` knows nothing of what the files hold: it prepares the temporary folder, commits it (manifest,
rename, `latest`, pruning to the newest `keep`), lists and verifies folders. Only the main rank touches the
file system here; the checkpointer (train/checkpoint.py) makes the ranks agree.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

STEP_DIR = re.compile(r"step-(\d+)")
MANIFEST, META, LATEST, LINEAGE = "manifest.json", "meta.json", "latest", "lineage.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the fix."""


class CheckpointFolders:
    def __init__(self, root: str | Path, keep: int):
        self.root, self.keep = Path(root), keep

    def tmp(self, step: int) -> Path:
        return self.root / f"step-{step}.tmp"

    def prepare(self, step: int) -> Path:
        """An empty step-<step>.tmp/, after removing the unfinished saves a crash left."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("step-*.tmp"):
            shutil.rmtree(stale)
        tmp = self.tmp(step)
        tmp.mkdir()
        return tmp

    def commit(self, step: int, run_id: str, parent: dict | None) -> Path:
        """Write the manifest of step-<step>.tmp/, rename it to step-<step>/, record the run in the lineage,
        point `latest` at it, prune."""
        tmp, final = self.tmp(step), self.root / f"step-{step}"
        files = {str(p.relative_to(tmp)): _file_entry(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / MANIFEST, {"step": step, "files": files})
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
        lineage = self.lineage()
        if run_id not in lineage:  # a run's parent is set when it starts: recorded at its first save
            _write_atomic(self.root / LINEAGE, json.dumps({**lineage, run_id: parent}))
        _write_atomic(self.root / LATEST, f"{final.name} {run_id}\n")
        self._prune(final)
        return final

    def discard(self, step: int) -> None:
        shutil.rmtree(self.tmp(step), ignore_errors=True)

    def _prune(self, current: Path) -> None:
        """Keep `current` and the newest keep - 1 others."""
        others = [path for _, path in self.checkpoints() if path != current]
        for path in others[self.keep - 1:]:
            shutil.rmtree(path)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of the complete-looking step-N folders, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.fullmatch(p.name))]
        return sorted(found, reverse=True)

    def latest(self) -> tuple[Path, str | None] | None:
        """The folder `latest` names (which may not exist) and the run that wrote it (None in the format of
        earlier versions), or None."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        try:
            name, *run = pointer.read_text().split()
        except (UnicodeDecodeError, ValueError):
            return None
        return self.root / name, (run[0] if run else None)

    def lineage(self) -> dict:
        """{run id: {"run_id", "step"} it resumed from, or None}; {} when absent or unreadable."""
        try:
            found = json.loads((self.root / LINEAGE).read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def unfinished(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("step-*.tmp")) if self.root.is_dir() else []


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
        return f"{manifest} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(files, dict):
        return f"{manifest} lists its files as a {type(files).__name__}, not a mapping"
    for name, want in files.items():
        if not (isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)):
            return f"{manifest} has an entry for {name!r} that is not {{bytes, sha256}}: {want!r}"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{manifest} names {name!r}, outside the checkpoint folder"
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


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
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
