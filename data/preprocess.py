"""Tokenize documents into a Megatron `<prefix>.bin/.idx` (megatron-core's IndexedDatasetBuilder), each document
followed by the EOD token (unless append_eod is off, as Megatron-LM without --append-eod), with `<prefix>.meta.json`
naming the tokenizer.

Records are parsed and tokenized in batches, by `workers` processes when there is more than one; the main process
writes them in input order. Output goes to temporary names that are renamed only once complete, the .idx last,
so an interrupted run leaves nothing loadable."""
from __future__ import annotations

import itertools
import multiprocessing
import os
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from data.readers import EMPTY_DOCUMENT, InputError, Record, record_text
from data.tokenizer import META_SUFFIX, Tokenizer, load_tokenizer, write_meta

NUM_EXAMPLES = 3  # bad records shown per reason


@dataclass
class Encoded:
    """One tokenized batch: the documents' tokens back to back (EOD included) and their lengths."""

    tokens: np.ndarray
    lengths: list[int]
    num_bytes: int
    skipped: list[tuple[str, str, int]]  # (reason, source, line)


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add_skip(self, reason: str, source: str, line: int) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < NUM_EXAMPLES:
            shown.append(f"{source}:{line}")

    def format(self) -> str:
        seconds = max(self.seconds, 1e-9)
        lines = [f"documents {self.documents:,}  tokens {self.tokens:,}  input {self.num_bytes / 1e6:,.1f} MB  "
                 f"time {self.seconds:.1f} s  ({self.tokens / seconds:,.0f} tokens/s, "
                 f"{self.documents / seconds:,.0f} documents/s, {self.num_bytes / 1e6 / seconds:,.1f} MB/s)"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values()):,}:")
            for reason, count in sorted(self.skipped.items()):
                lines.append(f"  {reason}: {count:,}  e.g. {', '.join(self.examples[reason])}")
        else:
            lines.append("skipped 0")
        return "\n".join(lines)


def encode_batch(records: list[Record], tokenizer: Tokenizer, text_key: str, dtype: type,
                 append_eod: bool = True) -> Encoded:
    texts, kept, skipped, num_bytes = [], [], [], 0
    for record in records:
        text, reason = record_text(record, text_key)
        num_bytes += len(record.raw) if record.raw is not None else len(text or "")
        if reason:
            skipped.append((reason, record.source, record.line))
        else:
            texts.append(text)
            kept.append(record)
    eod = [tokenizer.eod_id] if append_eod else []
    docs = []
    for record, ids in zip(kept, tokenizer.encode_batch(texts) if texts else []):
        if ids:
            docs.append(ids + eod)
        else:  # text that encodes to no token: no document (Megatron-LM gives it no EOD either)
            skipped.append((EMPTY_DOCUMENT, record.source, record.line))
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype)
    return Encoded(tokens, [len(doc) for doc in docs], num_bytes, skipped)


_worker: dict = {}


def _init_worker(tokenizer_args: tuple, text_key: str, dtype: type, append_eod: bool) -> None:
    _worker.update(tokenizer=load_tokenizer(*tokenizer_args), text_key=text_key, dtype=dtype, append_eod=append_eod)


def _encode_in_worker(records: list[Record]) -> Encoded:
    return encode_batch(records, _worker["tokenizer"], _worker["text_key"], _worker["dtype"], _worker["append_eod"])


def _batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(records)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _encode_in_pool(pool, batches: Iterator[list[Record]], in_flight: int) -> Iterator[Encoded]:
    """Encoded batches in input order, with at most `in_flight` batches read ahead (Pool.imap would read the whole
    input into memory when the workers fall behind)."""
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode_in_worker, (batch,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def check_output(path_prefix: str) -> None:
    """Fail at once, before reading anything, if the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path_prefix))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = f"{path_prefix}.tmp-probe-{os.getpid()}"
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as error:
        raise InputError(f"cannot write output {path_prefix}.bin/.idx: {error}; choose a writable "
                         "--output-prefix") from error


def _commit(tmp_prefix: str, path_prefix: str) -> None:
    """Rename the finished temporary files into place. The old .idx goes first and the new one comes last, so at
    no moment does a loadable pair mix old and new files."""
    for suffix in (".idx", META_SUFFIX):
        if os.path.exists(path_prefix + suffix):
            os.remove(path_prefix + suffix)
    for suffix in (".bin", META_SUFFIX, ".idx"):
        os.replace(tmp_prefix + suffix, path_prefix + suffix)


def tokenize_to_indexed(records: Iterable[Record], path_prefix: str, tokenizer_path: str,
                        tokenizer_type: str = "sentencepiece", text_key: str = "text", workers: int = 1,
                        strict: bool = False, batch_size: int = 256, progress: bool = True, merge_file: str = "",
                        special_tokens: bool = False, append_eod: bool = True) -> Summary:
    """Tokenize `records` into `<path_prefix>.bin/.idx/.meta.json`. Bad records are skipped and counted, or with
    `strict` raise InputError naming file and line (nothing is written then). The tokenizer is
    load_tokenizer(tokenizer_path, tokenizer_type, merge_file, special_tokens); each document ends with its EOD token
    when `append_eod`."""
    from tqdm import tqdm

    tokenizer_args = (tokenizer_path, tokenizer_type, merge_file, special_tokens)
    tokenizer = load_tokenizer(*tokenizer_args)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    check_output(path_prefix)
    tmp_prefix = f"{path_prefix}.tmp-{os.getpid()}"
    summary, start = Summary(), time.perf_counter()
    pool = None
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    try:
        batches = _batched(records, batch_size)
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(
                workers, _init_worker, (tokenizer_args, text_key, dtype, append_eod))
            encoded = _encode_in_pool(pool, batches, in_flight=4 * workers)
        else:
            encoded = (encode_batch(batch, tokenizer, text_key, dtype, append_eod) for batch in batches)
        with tqdm(unit=" docs", disable=not progress, desc=os.path.basename(path_prefix)) as bar:
            for enc in encoded:
                for reason, source, line in enc.skipped:
                    if strict:
                        raise InputError(f"{source}:{line}: {reason.replace('_', ' ')} (run without --strict to "
                                         "skip such records)")
                    summary.add_skip(reason, source, line)
                offset = 0
                for length in enc.lengths:
                    builder.add_document(enc.tokens[offset:offset + length], [length])
                    offset += length
                summary.documents += len(enc.lengths)
                summary.tokens += offset
                summary.num_bytes += enc.num_bytes
                bar.update(len(enc.lengths))
                bar.set_postfix_str(f"{summary.num_bytes / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s",
                                    refresh=False)
        if summary.documents == 0:
            raise InputError(f"no documents to write ({sum(summary.skipped.values())} records skipped); "
                             "check the inputs and --text-key (--json-keys)")
        builder.finalize(tmp_prefix + ".idx")
        summary.seconds = time.perf_counter() - start
        write_meta(tmp_prefix, tokenizer.info, documents=summary.documents, tokens=summary.tokens,
                   text_key=text_key, append_eod=append_eod, special_tokens=special_tokens)
        _commit(tmp_prefix, path_prefix)
    finally:
        if pool is not None:
            pool.terminate()
        builder.data_file.close()
        for suffix in (".bin", ".idx", META_SUFFIX):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
    return summary
