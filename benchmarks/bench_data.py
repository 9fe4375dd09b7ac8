#!/usr/bin/env python
"""Data throughput on CPU: preprocessing (tokens/s with 1 and N workers) and the GPT loader (tokens/s at a given
sequence length, warm page cache).

    python benchmarks/bench_data.py                       # uses the embedded corpus (scripts/prepare_corpus.py)
    python benchmarks/bench_data.py --copies 4 --workers 1 2 --seq-length 1024 --samples 20000
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.config import DataConfig  # noqa: E402
from data.loader import GPTData  # noqa: E402
from data.preprocess import tokenize_to_indexed  # noqa: E402
from data.readers import read_records  # noqa: E402

ACCUMULATION = 8  # micro-batches per global batch


def bench_preprocess(jsonl: str, tokenizer: str, copies: int, workers: int, out: str) -> tuple[float, int, float]:
    summary = tokenize_to_indexed(read_records([jsonl] * copies), out, tokenizer, workers=workers, progress=False)
    return summary.tokens / summary.seconds, summary.tokens, summary.num_bytes / 1e6 / summary.seconds


def bench_loader(prefix: str, tokenizer: str, seq_length: int, samples: int, micro_batch: int, prefetch: int,
                 cache_dir: str) -> float:
    cfg = DataConfig(paths=[prefix], tokenizer=tokenizer, seq_length=seq_length, split="100,0,0",
                     cache_dir=cache_dir, prefetch=prefetch)
    data = GPTData(cfg, seed=1, train_samples=samples, valid_samples=0)
    for _ in data.train_batches(0, micro_batch, ACCUMULATION):  # warm the page cache: one pass
        pass
    start, tokens = time.perf_counter(), 0
    for batch in data.train_batches(0, micro_batch, ACCUMULATION):
        tokens += batch.numel()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", default="corpus/shakespeare.jsonl")
    parser.add_argument("--tokenizer", default="corpus/tokenizer.model")
    parser.add_argument("--copies", type=int, default=4, help="times the jsonl is read, for a longer measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}")
    tmp = tempfile.mkdtemp(prefix="bench-data-")
    try:
        prefix = os.path.join(tmp, "bench")
        for workers in args.workers:
            rate, tokens, mb_rate = bench_preprocess(args.jsonl, args.tokenizer, args.copies, workers, prefix)
            print(f"preprocess workers={workers}: {rate:,.0f} tokens/s ({mb_rate:.1f} MB/s input, {tokens:,} tokens)")
        for prefetch in (0, 2):
            rate = bench_loader(prefix, args.tokenizer, args.seq_length, args.samples, args.micro_batch, prefetch,
                                os.path.join(tmp, "cache"))
            print(f"loader seq={args.seq_length} micro_batch={args.micro_batch} prefetch={prefetch}: "
                  f"{rate:,.0f} tokens/s")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
