#!/usr/bin/env python
"""Train a sentencepiece tokenizer from the inputs scripts/preprocess_data.py reads.

    python scripts/train_tokenizer.py --input corpus/shakespeare.jsonl --model corpus/tokenizer.model --vocab-size 8000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.readers import InputError, read_hub_dataset, read_records, record_text, resolve_inputs  # noqa: E402
from data.tokenizer import train_sentencepiece  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="jsonl[.gz|.zst] or parquet files, folders of them, "
                        "or folders written by datasets' save_to_disk")
    source.add_argument("--hf-dataset", help="a dataset name for datasets.load_dataset (streamed)")
    parser.add_argument("--hf-config", default=None, help="the dataset's configuration name")
    parser.add_argument("--hf-split", default="train", help="the split of a dataset (default train)")
    parser.add_argument("--text-key", default="text", help="the field holding the text (default text)")
    parser.add_argument("--model", required=True, help="where to write the .model file")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--max-sentences", type=int, default=10_000_000,
                        help="lines sampled for training (default 10M); every input is read, so give a few "
                        "shards, not all of a Pile-sized corpus")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.input:
            records = read_records(resolve_inputs(args.input), args.text_key, args.hf_split)
        else:
            records = read_hub_dataset(args.hf_dataset, args.text_key, args.hf_config, args.hf_split)
        texts = (text for text, _ in (record_text(r, args.text_key) for r in records) if text is not None)
        start = time.perf_counter()
        tokenizer = train_sentencepiece(texts, args.model, args.vocab_size, args.model_type, args.max_sentences)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.model}: {args.model_type}, vocab {tokenizer.vocab_size}, eod id {tokenizer.eod_id}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
