#!/usr/bin/env python
"""Tokenize documents into a Megatron-compatible <prefix>.bin/.idx (plus <prefix>.meta.json naming the tokenizer).

    python scripts/preprocess_data.py --input data/pile/*.jsonl.zst --output-prefix data/pile_text_document \\
        --tokenizer corpus/tokenizer.model --workers 8

Inputs: jsonl, jsonl.gz, jsonl.zst, parquet, folders of these, folders written by datasets' save_to_disk, or
--hf-dataset NAME (datasets.load_dataset, streamed). Each document gets the tokenizer's EOD token appended.
Bad records (invalid JSON, missing text key, undecodable bytes, empty text) are skipped and counted; --strict
stops at the first one instead. The output appears only when complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.preprocess import check_output, tokenize_to_indexed  # noqa: E402
from data.readers import InputError, read_hub_dataset, read_records, resolve_inputs  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="input files or folders")
    source.add_argument("--hf-dataset", help="a dataset name for datasets.load_dataset")
    parser.add_argument("--hf-config", default=None, help="the dataset's configuration name")
    parser.add_argument("--hf-split", default="train", help="the split of a dataset (default train)")
    parser.add_argument("--no-streaming", action="store_true", help="download a --hf-dataset fully first")
    parser.add_argument("--text-key", default="text", help="the field holding the text (default text)")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, .idx and .meta.json")
    parser.add_argument("--tokenizer", required=True, help="a sentencepiece .model file or a HF tokenizer folder")
    parser.add_argument("--tokenizer-type", default="sentencepiece", choices=["sentencepiece", "hf"])
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    parser.add_argument("--batch-size", type=int, default=256, help="documents per work item (default 256)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record, naming file and line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.input:
            inputs = resolve_inputs(args.input)
            check_output(args.output_prefix)
            records = read_records(inputs, args.text_key, args.hf_split)
        else:
            check_output(args.output_prefix)
            records = read_hub_dataset(args.hf_dataset, args.text_key, args.hf_config, args.hf_split,
                                       streaming=not args.no_streaming)
        summary = tokenize_to_indexed(records, args.output_prefix, args.tokenizer, args.tokenizer_type,
                                      args.text_key, max(1, args.workers), args.strict, args.batch_size,
                                      progress=not args.quiet)
    except (InputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx")
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
