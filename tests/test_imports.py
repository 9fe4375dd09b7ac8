"""The import rule of the library, checked on the source of every module (function-level imports included).

Imports run downhill: pretrain.py (and scripts/, benchmarks/) -> interop -> train -> model -> moe -> parallel;
data beside (train and interop may import it; it imports none of them); moe/kernels are leaves (they import only
each other); errors.py, the error type, imports nothing of the project and everyone may import it. Nothing imports
pretrain.py. interop (Hugging Face export and import) sits on top of train: it reads and writes checkpoints
through train's checkpointer and builds models from train's config; nothing of the training imports it, so
training never needs transformers. interop/remote/ (the model class copied into exported folders) imports nothing
of the project. And no module imports itself through a chain of others (no cycle), at module or function level.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("interop", "train", "model", "moe", "parallel", "data")
PROJECT = set(PACKAGES) | {"errors", "pretrain"}
DOWNHILL = ["interop", "train", "model", "moe", "parallel"]  # each may import those after it


def allowed(src: str, dst: str) -> bool:
    """Whether module `src` may import module `dst` (dotted names of project modules)."""
    src_top, dst_top = src.split(".")[0], dst.split(".")[0]
    if src.startswith("interop.remote"):  # copied into exported folders, where no project module exists
        return False
    if dst_top == "errors":
        return src_top != "errors"
    if dst_top == "pretrain":
        return False
    if src.startswith("moe.kernels"):
        return dst.startswith("moe.kernels")
    if src_top == "data":
        return dst_top == "data"
    if dst_top == "data":
        return src_top in ("data", "train", "interop")
    if src_top == "errors":
        return False
    return src_top == dst_top or DOWNHILL.index(dst_top) > DOWNHILL.index(src_top)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a project module in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from moe.kernels import scatter` imports the module moe.kernels.scatter
            names = [f"{node.module}.{alias.name}" if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py")
                     .exists() else node.module for alias in node.names]
        else:
            continue
        out += [(node.lineno, name) for name in names if name.split(".")[0] in PROJECT]
    return out


def library_modules() -> dict[str, Path]:
    files = [ROOT / "errors.py"] + [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return {module_name(p): p for p in files}


def test_the_library_is_found():
    modules = library_modules()
    assert {"errors", "moe.dispatch", "moe.kernels.sort", "parallel.shards", "train.dryrun"} <= set(modules)


def test_every_import_runs_downhill():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {dst}"
           for src, path in library_modules().items() for line, dst in project_imports(path) if not allowed(src, dst)]
    assert not bad, "imports against the rule (tests/test_imports.py docstring):\n" + "\n".join(bad)


def test_no_import_cycle():
    modules = library_modules()
    graph = {src: {dst for _, dst in project_imports(path) if dst in modules and dst != src}
             for src, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_the_rule_itself():
    """The rule rejects what it must (so the walk above can fail)."""
    assert not allowed("parallel.layers", "train.checkpoint")  # upward
    assert not allowed("moe.kernels.topology", "moe.positions")  # a kernel leaf importing its package
    assert not allowed("data.config", "train.config")  # data beside
    assert not allowed("model.gpt", "data.loader")  # only train reads data
    assert not allowed("train.trainer", "pretrain")
    assert not allowed("train.checkpoint", "interop.export")  # nothing of the training needs transformers
    assert not allowed("interop.remote.modeling_moetron", "errors")  # shipped alone in exported folders
    assert allowed("train.plan", "data.tokenizer") and allowed("moe.layer", "parallel.state")
    assert allowed("data.loader", "errors") and allowed("moe.kernels.scatter", "moe.kernels.launch")
