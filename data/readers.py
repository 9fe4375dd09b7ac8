"""Reading documents for preprocessing and tokenizer training: jsonl (plain, .gz, .zst), parquet, and Hugging Face
datasets (a folder written by `save_to_disk`, a folder of data files, or a hub name).

Readers yield `Record`s cheaply (a jsonl line stays raw bytes) so that parsing can run in worker processes;
`record_text` turns a record into its text or the reason it is skipped."""
from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from typing import NamedTuple

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
# Why a record is skipped (counted in the summary; an error with --strict).
INVALID_JSON = "invalid_json"
MISSING_TEXT_KEY = "missing_text_key"
UNDECODABLE_BYTES = "undecodable_bytes"
INVALID_UNICODE = "invalid_unicode"  # a JSON escape of a lone surrogate (\ud800): no UTF-8 for the tokenizer
EMPTY_DOCUMENT = "empty_document"


class InputError(ValueError):
    """An input that cannot be read at all (missing, unknown format, corrupt), or a bad record under --strict."""


class Record(NamedTuple):
    source: str  # file path or dataset name
    line: int  # 1-based line (jsonl) or row number
    raw: bytes | None  # an unparsed jsonl line, or None for formats that give the text field directly
    value: object  # the text field of a parquet or dataset row (None when raw is set or the row lacks it)


def record_text(record: Record, text_key: str) -> tuple[str | None, str | None]:
    """(text, None) for a good record, (None, reason) for one to skip."""
    if record.raw is not None:
        try:
            line = record.raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, UNDECODABLE_BYTES
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return None, INVALID_JSON
        value = obj.get(text_key) if isinstance(obj, dict) else None
    else:
        value = record.value
    if not isinstance(value, str):
        return None, MISSING_TEXT_KEY
    if not value.strip():
        return None, EMPTY_DOCUMENT
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, INVALID_UNICODE
    return value, None


def _is_saved_dataset(path: str) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def _format_of(path: str) -> str | None:
    if _is_saved_dataset(path):
        return "saved_dataset"
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def resolve_inputs(paths: list[str]) -> list[str]:
    """Check that every input exists, expand glob patterns (quoted, as Megatron-LM's --input takes them) and plain
    folders into the files they hold with a known format (sorted), and fail at once on anything missing or
    unreadable."""
    resolved = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) and not os.path.exists(pattern) else [pattern]
        if not matches:
            raise InputError(f"input pattern {pattern} matches no file")
        for path in matches:
            resolved.extend(_resolve_input(path))
    return resolved


def _resolve_input(path: str) -> list[str]:
    if not os.path.exists(path):
        raise InputError(f"input {path} does not exist")
    if os.path.isdir(path) and not _is_saved_dataset(path):
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if _format_of(os.path.join(root, name)))
        if not found:
            raise InputError(f"input folder {path} holds no {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} "
                             "files and is not a saved Hugging Face dataset")
        return found
    if _format_of(path) is None:
        raise InputError(f"input {path}: unknown format; use one of "
                         f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}, a folder written by datasets' "
                         "save_to_disk, or --hf-dataset NAME")
    return [path]


def _zstd_lines(path: str) -> Iterator[bytes]:
    """The lines of a .zst file, frame after frame; InputError when the last frame ends early (a truncated file
    otherwise reads as a shorter one without a word) or the bytes are not zstd."""
    import zstandard

    decompressor, pending, tail = zstandard.ZstdDecompressor().decompressobj(), False, b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                out = []
                while chunk:
                    out.append(decompressor.decompress(chunk))
                    pending = not decompressor.eof
                    chunk = b""
                    if decompressor.eof:  # a frame ended: the next one starts in what is left
                        chunk, decompressor = decompressor.unused_data, zstandard.ZstdDecompressor().decompressobj()
                *lines, tail = (tail + b"".join(out)).split(b"\n")
                yield from (line + b"\n" for line in lines)
    except zstandard.ZstdError as error:
        raise InputError(f"{path} is not valid zstd data ({error})") from error
    if pending:
        raise InputError(f"{path} is truncated: its last zstd frame ends early (re-download or re-create it)")
    if tail:
        yield tail


def _lines(path: str) -> Iterator[bytes]:
    if path.endswith(".zst"):
        yield from _zstd_lines(path)
        return
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        yield from f


def _read_jsonl(path: str) -> Iterator[Record]:
    for number, line in enumerate(_lines(path), start=1):
        if line.strip():  # blank lines (a trailing newline, say) are not documents
            yield Record(path, number, line, None)


def _read_parquet(path: str, text_key: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if text_key not in columns:
        raise InputError(f"{path} has no column {text_key!r} (columns: {', '.join(columns)}); pass --text-key")
    number = 0
    for batch in parquet.iter_batches(columns=[text_key]):
        for value in batch.column(0).to_pylist():
            number += 1
            yield Record(path, number, None, value)


def _read_dataset_rows(dataset, name: str, text_key: str) -> Iterator[Record]:
    columns = getattr(dataset, "column_names", None)  # None for some streaming datasets: checked per row then
    if columns is not None and text_key not in columns:
        raise InputError(f"dataset {name} has no column {text_key!r} (columns: {', '.join(columns)}); "
                         "pass --text-key")
    for number, row in enumerate(dataset, start=1):
        yield Record(name, number, None, row.get(text_key))


def _load_saved_dataset(path: str, split: str):
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"saved dataset {path} has splits {', '.join(loaded)}, not {split!r}; pass --hf-split")
        loaded = loaded[split]
    return loaded


def _read_file(path: str, text_key: str, split: str) -> Iterator[Record]:
    kind = _format_of(path)
    if kind == "saved_dataset":
        yield from _read_dataset_rows(_load_saved_dataset(path, split), path, text_key)
    elif kind == "jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_parquet(path, text_key)


def read_records(paths: list[str], text_key: str = "text", split: str = "train") -> Iterator[Record]:
    """Every record of the (already resolved) input paths, in order. A file that cannot be read (corrupt archive,
    bad parquet) raises InputError naming it."""
    for path in paths:
        try:
            yield from _read_file(path, text_key, split)
        except (OSError, EOFError, ValueError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"cannot read {path}: {error}") from error


def read_hub_dataset(name: str, text_key: str, config: str | None = None, split: str = "train",
                     streaming: bool = True) -> Iterator[Record]:
    """Rows of a dataset by name through `datasets.load_dataset` (streamed by default, for Pile-sized data)."""
    import datasets

    dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
    yield from _read_dataset_rows(dataset, name, text_key)
