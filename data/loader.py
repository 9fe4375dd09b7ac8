"""The GPT sample stream: megatron-core's GPTDataset (blended by megatron-core's BlendedDataset when `data.paths` names
several datasets) turned into deterministic, resumable, data-parallel micro-batches, prepared ahead by a background
thread.

Sample i of the global training stream is `train_dataset[i]`; the global batch at step N is samples
[N * G, (N + 1) * G) for global batch size G, so resuming with consumed_samples = N * G continues exactly. Each global
batch is cut into dp_size contiguous shards, one per data-parallel rank, and each shard into micro-batches.

With torch.distributed initialised, every rank must build GPTData together (rank 0 writes the sample-index cache,
the others read it after a barrier)."""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import queue
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterator

import numpy as np
import torch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

from data.config import DataConfig
from data.tokenizer import TokenizerInfo, check_tokenizer_matches, load_tokenizer, padded_vocab_size
from errors import ConfigError

logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
log = logging.getLogger(__name__)

TRAIN, VALID, TEST = 0, 1, 2


class _TokenizerView:
    """What megatron-core's GPTDatasetConfig reads from a tokenizer: the EOD id, the vocabulary size and an identity
    for its cache key."""

    def __init__(self, info: TokenizerInfo):
        self.eod = info.eod_id
        self.vocab_size = info.vocab_size
        self.unique_identifiers = {"class": info.type, "fingerprint": info.fingerprint}


def _missing_dataset_fix(prefix: str) -> str:
    """How to fix a data.paths entry whose files do not exist."""
    if prefix.endswith((".bin", ".idx")):
        return f"a prefix names the files without their suffix: {prefix[:-4]}"
    made = sorted(glob.glob(glob.escape(prefix) + "_*_document.bin"))
    if made:  # Megatron-LM's naming, <output-prefix>_<key>_document
        return f"did you mean {made[0][:-4]}? (Megatron-style preprocessing names its output <prefix>_<key>_document)"
    return ("build the embedded corpus with `python scripts/prepare_corpus.py`, or tokenize your data with "
            "scripts/preprocess_data.py --output-prefix " + prefix)


def _check_dataset(prefix: str, info: TokenizerInfo, ranges: dict[str, tuple[float, float]],
                   key: str = "data.paths") -> int:
    """Clear errors, before megatron-core's asserts: files present, tokenizer matching, no empty split in use
    (`ranges`: the share of the documents each split in use takes, by name). Returns the dataset's tokens."""
    for suffix in (".bin", ".idx"):
        if not os.path.exists(prefix + suffix):
            raise ConfigError(key, f"names {prefix}, but {prefix + suffix} does not exist; "
                              + _missing_dataset_fix(prefix))
    try:
        if not check_tokenizer_matches(prefix, info):
            log.warning("%s has no .meta.json (made by another tool): cannot check that it was tokenized with %s",
                        prefix, info.path)
    except ValueError as error:
        raise ConfigError("data.tokenizer", f"does not match the data: {error}") from error
    try:  # megatron-core splits by sequence (one per document in data made by scripts/preprocess_data.py)
        dataset = IndexedDataset(prefix)  # its index is a memory map: read it while the dataset lives
        num_documents = len(dataset.sequence_lengths)
        num_tokens = int(dataset.sequence_lengths.sum(dtype=np.int64))
    except (AssertionError, ValueError, OSError) as error:
        raise ConfigError(key, f"names {prefix}, which megatron-core cannot read ({error}); re-create it "
                          "with scripts/preprocess_data.py") from error
    for name, bounds in ranges.items():
        begin, end = (int(round(bound * num_documents)) for bound in bounds)
        if end <= begin and bounds == (0.0, 1.0):
            raise ConfigError(key, f"names {prefix}, which holds no documents; give a dataset with documents")
        if end <= begin:
            raise ConfigError("data.split", f"gives the {name} split none of the {num_documents} documents of "
                              f"{prefix}; give it a larger share, or use a corpus with more documents")
    return num_tokens


def _weights(weights: list[float] | None, sizes: list[int]) -> list[float] | None:
    """The blend weights megatron-core gets: None for one dataset (nothing to blend); for a list without weights,
    the datasets' token counts (Megatron-LM samples an unweighted list in proportion to the datasets' sizes; here by
    tokens, and not capped at one epoch, so that any number of steps can run)."""
    if len(sizes) <= 1:
        return None
    return weights if weights is not None else [float(n) for n in sizes]


def plain_npy_problem(path: str) -> str | None:
    """What makes `path` other than a plain numeric .npy array as numpy writes it, or None: object arrays hold
    pickles (megatron-core loads its index cache with allow_pickle=True, so such a file would run code)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return f"a .npy of format version {version}, which numpy's default writer does not produce"
            shape, _, dtype = read_header(f)  # parsed as a literal, nothing unpickled
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as error:
        return f"not a .npy array ({error})"
    if dtype.hasobject:
        return f"an array of {dtype} (pickled objects)"
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if os.path.getsize(path) != expected:
        return f"{os.path.getsize(path)} bytes where its header promises {expected} (truncated or altered)"
    return None


def distrust_index_cache(cache_dir: str) -> None:
    """Remove every sample-index cache file of `cache_dir` that is not a plain numeric array, with the other files
    of the same dataset (megatron-core then rebuilds them), saying so: a cache is shared and can be tampered with."""
    if not os.path.isdir(cache_dir):
        return
    for name in sorted(os.listdir(cache_dir)):
        path = os.path.join(cache_dir, name)
        if not name.endswith(".npy") or not os.path.exists(path):
            continue
        problem = plain_npy_problem(path)
        if problem is None:
            continue
        stem = name.rsplit("-", 1)[0]  # <hash>-<class>-<split>: the dataset's files
        siblings = [n for n in os.listdir(cache_dir) if n.startswith(stem + "-")]
        log.warning("data: %s is %s; removing %s so that the sample index is rebuilt", path, problem,
                    ", ".join(siblings))
        for sibling in siblings:
            os.remove(os.path.join(cache_dir, sibling))


@contextlib.contextmanager
def _process_group_for_blending() -> Iterator[None]:
    """megatron-core's BlendedDataset asks torch.distributed for the rank: lend it a one-process gloo group when
    none exists, removed again afterwards."""
    if torch.distributed.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            torch.distributed.destroy_process_group()


class GPTData:
    def __init__(self, cfg: DataConfig, seed: int, train_samples: int, valid_samples: int,
                 dp_rank: int = 0, dp_size: int = 1):
        cfg.validate()
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if train_samples <= 0 or valid_samples < 0:
            raise ValueError(f"train_samples ({train_samples}) must be positive and valid_samples "
                             f"({valid_samples}) non-negative")
        try:
            tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_type, cfg.merge_file)
        except (OSError, ValueError) as error:
            raise ConfigError("data.tokenizer", f"cannot be loaded: {error}") from error
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.tokenizer_info = tokenizer.info
        self.eod_id = tokenizer.eod_id
        self.vocab_size = padded_vocab_size(tokenizer.vocab_size, cfg.vocab_divisible_by)

        prefixes, weights = cfg.blend()
        cache_dir = cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:  # rank 0 writes the cache
            distrust_index_cache(cache_dir)
        common = dict(random_seed=seed, sequence_length=cfg.seq_length, path_to_cache=cache_dir,
                      tokenizer=_TokenizerView(tokenizer.info), reset_position_ids=False, reset_attention_mask=False,
                      eod_mask_loss=False, create_attention_mask=False)
        valid = cfg.valid_blend()
        valid_prefixes = valid[0] if valid is not None else []
        if valid is not None:  # a validation set of its own (Megatron-LM's --train-data-path / --valid-data-path)
            sizes = [_check_dataset(prefix, tokenizer.info, {"train": (0.0, 1.0)}) for prefix in prefixes]
            valid_sizes = [_check_dataset(prefix, tokenizer.info, {"valid": (0.0, 1.0)}, "data.valid_paths")
                           for prefix in (valid_prefixes if valid_samples > 0 else [])]
            valid_blend = (valid_prefixes, _weights(valid[1], valid_sizes)) if valid_samples > 0 else None
            config = GPTDatasetConfig(blend_per_split=[(prefixes, _weights(weights, sizes)), valid_blend, None],
                                      **common)
        else:
            # Only train and valid are used; the test share stays held out of both.
            split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
            split_matrix[TEST] = None
            if valid_samples == 0:
                split_matrix[VALID] = None
            ranges = {"train": split_matrix[TRAIN]}
            if valid_samples > 0:
                ranges["valid"] = split_matrix[VALID]
            sizes = [_check_dataset(prefix, tokenizer.info, ranges) for prefix in prefixes]
            config = GPTDatasetConfig(blend=(prefixes, _weights(weights, sizes)), split=cfg.split, **common)
            config.split_matrix = split_matrix

        builder = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_samples, 0], lambda: True, config)
        blended = len(prefixes) > 1 or len(valid_prefixes) > 1
        with _process_group_for_blending() if blended else contextlib.nullcontext():
            self.train_dataset, self.valid_dataset, _ = builder.build()

    def _micro_batches(self, dataset, starts: Iterator[int], micro_batch_size: int) -> Iterator[torch.Tensor]:
        for start in starts:
            batch = np.stack([_raw_sample(dataset, i) for i in range(start, start + micro_batch_size)])
            yield torch.from_numpy(batch)

    def train_batches(self, consumed_samples: int, micro_batch_size: int,
                      accumulation: int) -> Iterator[torch.Tensor]:
        """Micro-batches [micro_batch_size, seq_length + 1] int64 for this data-parallel rank, global batch after
        global batch, starting after `consumed_samples` samples of the global stream. Each global batch of
        micro_batch_size x accumulation x dp_size samples is split into dp_size disjoint shards (rank r takes its
        contiguous share), each shard into `accumulation` micro-batches. The batch at step N is the same with or
        without a restart (consumed_samples = N * global batch). Ends when the training samples run out."""
        if micro_batch_size <= 0 or accumulation <= 0:
            raise ValueError(f"micro_batch_size {micro_batch_size} and accumulation {accumulation} must be positive")
        shard = micro_batch_size * accumulation
        global_batch_size = shard * self.dp_size
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples is {consumed_samples}; it cannot be negative")

        def starts() -> Iterator[int]:
            step_start = consumed_samples
            while step_start + global_batch_size <= len(self.train_dataset):
                shard_start = step_start + self.dp_rank * shard
                yield from range(shard_start, shard_start + shard, micro_batch_size)
                step_start += global_batch_size

        return _prefetch(self._micro_batches(self.train_dataset, starts(), micro_batch_size), self.cfg.prefetch)

    def valid_batches(self, micro_batch_size: int, num_batches: int) -> Iterator[torch.Tensor]:
        """Held-out micro-batches from the validation split, the same every call (deterministic), this rank's
        shard: the k-th micro-batches of all ranks together are validation samples [k * m * dp, (k + 1) * m * dp)."""
        needed = num_batches * micro_batch_size * self.dp_size
        available = 0 if self.valid_dataset is None else len(self.valid_dataset)
        if needed > available:
            raise ValueError(f"{num_batches} validation micro-batches of {micro_batch_size} on {self.dp_size} ranks "
                             f"need {needed} validation samples, but GPTData was built with {available}; "
                             "pass a larger valid_samples")
        step = micro_batch_size * self.dp_size
        starts = (k * step + self.dp_rank * micro_batch_size for k in range(num_batches))
        return _prefetch(self._micro_batches(self.valid_dataset, starts, micro_batch_size), self.cfg.prefetch)


def _raw_sample(dataset, index: int) -> np.ndarray:
    """Sample `index` as its seq_length + 1 tokens (int64): what GPTDataset.__getitem__ returns as tokens and labels,
    read without building its masks and position ids, which would cost ten times the read."""
    if isinstance(dataset, BlendedDataset):
        dataset, index = dataset.datasets[dataset.dataset_index[index]], dataset.dataset_sample_index[index]
    tokens, _ = dataset._query_document_sample_shuffle_indices(index)
    return tokens


_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _prefetch(batches: Iterator[torch.Tensor], depth: int) -> Iterator[torch.Tensor]:
    """Run `batches` in a background thread, started now, `depth` micro-batches ahead (pinned when CUDA is there).
    The thread stops when the returned iterator is exhausted, closed or collected."""
    if depth <= 0:
        return batches
    pin = torch.cuda.is_available()
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not put(batch.pin_memory() if pin else batch):
                    return
            put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failed(error))

    def drain() -> Iterator[torch.Tensor]:
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join(timeout=10)  # no thread left in torch code when the interpreter exits

    thread = threading.Thread(target=work, name="gpt-data-prefetch", daemon=True)
    thread.start()
    iterator = drain()
    weakref.finalize(iterator, stop.set)
    return iterator
