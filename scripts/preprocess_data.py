#!/usr/bin/env python
"""Tokenize documents into a Megatron-compatible <prefix>.bin/.idx (plus <prefix>.meta.json naming the tokenizer).

    python scripts/preprocess_data.py --input data/pile/*.jsonl.zst --output-prefix data/pile_text_document \\
        --tokenizer corpus/tokenizer.model --workers 8

Inputs: jsonl, jsonl.gz, jsonl.zst, parquet, folders of these, folders written by datasets' save_to_disk, or
--hf-dataset NAME (datasets.load_dataset, streamed). Each document gets the tokenizer's EOD token appended.
Bad records (invalid JSON, missing text key, undecodable bytes, empty text) are skipped and counted; --strict
stops at the first one instead. The output appears only when complete.

Megatron-LM's command lines run as they are, with Megatron-LM's semantics:

    python scripts/preprocess_data.py --input my-corpus.json --output-prefix my-gpt2 --vocab-file gpt2-vocab.json \\
        --tokenizer-type GPT2BPETokenizer --merge-file gpt2-merges.txt --append-eod

writes my-gpt2_text_document.bin/.idx. Called with one of Megatron-LM's --tokenizer-type names (GPT2BPETokenizer,
SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer, HuggingFaceTokenizer), the script writes one
<output-prefix>_<key>_document per --json-keys key (default text), appends the EOD token only with --append-eod,
and a HuggingFaceTokenizer adds its own special tokens (a BOS, say) unless --tokenizer-hf-no-include-special-tokens,
as Megatron-LM's tools/preprocess_data.py does.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.preprocess import check_output, tokenize_to_indexed  # noqa: E402
from data.readers import InputError, read_hub_dataset, read_records, resolve_inputs  # noqa: E402
from data.tokenizer import MEGATRON_TOKENIZER_TYPES, TOKENIZER_TYPES  # noqa: E402

# Megatron-LM flags of tools/preprocess_data.py (and its tokenizer arguments) that have no meaning here: each is one
# clear error naming it, instead of argparse's "unrecognized arguments" or a silent difference in the output.
UNSUPPORTED = {
    "--split-sentences": "sentence splitting (NLTK) is for BERT and T5 data; GPT documents stay whole",
    "--keep-newlines": "it belongs to --split-sentences",
    "--lang": "it belongs to --split-sentences",
    "--find-optimal-num-workers": "time a few --workers values instead",
    "--workers-to-check": "it belongs to --find-optimal-num-workers",
    "--max-documents": "it belongs to --find-optimal-num-workers",
    "--performance-dir": "it belongs to --find-optimal-num-workers",
    "--vocab-size": "the vocabulary comes from the tokenizer's files",
    "--vocab-extra-ids": "T5 sentinel tokens are not supported",
    "--special-tokens": "extra special tokens are not supported; add them to the tokenizer itself",
    "--tokenizer-special-tokens": "extra special tokens are not supported; add them to the tokenizer itself",
    "--tokenizer-sentencepiece-legacy": "the legacy special-token splitting of sentencepiece is not supported",
    "--legacy-tokenizer": "Megatron-LM's legacy tokenizers are not supported (its current ones are)",
    "--tiktoken-pattern": "TikTokenizer is not supported",
    "--tiktoken-num-special-tokens": "TikTokenizer is not supported",
    "--trust-remote-code": "tokenizers load from local files and run no code from them",
    "--tokenizer-hf-no-use-fast": "the fast (Rust) Hugging Face tokenizer is always used",
    "--metadata-path": "tokenizer metadata files are not supported",
    "--tokenizer-metadata": "tokenizer metadata files are not supported",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="input files, folders or quoted glob patterns")
    source.add_argument("--hf-dataset", help="a dataset name for datasets.load_dataset")
    parser.add_argument("--hf-config", default=None, help="the dataset's configuration name")
    parser.add_argument("--hf-split", default="train", help="the split of a dataset (default train)")
    parser.add_argument("--no-streaming", action="store_true", help="download a --hf-dataset fully first")
    parser.add_argument("--text-key", "--json-keys", dest="text_keys", nargs="+", default=["text"], metavar="KEY",
                        help="the field holding the text (default text); Megatron-LM's --json-keys may name several")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>.bin, .idx and .meta.json (<prefix>_<key>_document.* Megatron's way)")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer",
                        help="a sentencepiece .model file or a HF tokenizer folder (or GPT-2's vocab.json)")
    parser.add_argument("--tokenizer-type", default="sentencepiece", metavar="TYPE",
                        help=f"one of {', '.join(TOKENIZER_TYPES)} (default sentencepiece)")
    parser.add_argument("--vocab-file", help="GPT2BPETokenizer: GPT-2's vocab.json")
    parser.add_argument("--merge-file", help="GPT2BPETokenizer (gpt2bpe): GPT-2's merges.txt")
    parser.add_argument("--append-eod", action="store_true",
                        help="end each document with the EOD token (always so unless called Megatron's way)")
    specials = parser.add_mutually_exclusive_group()
    specials.add_argument("--tokenizer-hf-no-include-special-tokens", dest="hf_special_tokens",
                          action="store_false", default=None,
                          help="HuggingFaceTokenizer: do not add the tokenizer's special tokens (Megatron's default "
                               "adds them)")
    specials.add_argument("--tokenizer-hf-include-special-tokens", dest="hf_special_tokens", action="store_true",
                          help="HF tokenizers: add the tokenizer's special tokens (a BOS, say) to each document")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    parser.add_argument("--batch-size", type=int, default=256, help="documents per work item (default 256)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record, naming file and line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    # Megatron-LM's, accepted without effect: one pass over the inputs with --workers processes, in input order
    no_effect = "Megatron-LM's, no effect here (one pass, --workers processes, documents in input order)"
    parser.add_argument("--partitions", type=int, default=1, help=no_effect)
    parser.add_argument("--keep-sequential-samples", action="store_true", help=no_effect)
    parser.add_argument("--log-interval", type=int, default=1000, help=no_effect)
    parser.add_argument("--dataset-impl", choices=["mmap"], default="mmap", help="Megatron-LM's; mmap is the format")
    for flag in UNSUPPORTED:
        parser.add_argument(flag, nargs="*", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@dataclass
class Job:
    tokenizer: str
    tokenizer_type: str
    merge_file: str
    special_tokens: bool
    append_eod: bool
    outputs: list[tuple[str, str]]  # (text key, output prefix)


def plan_job(args: argparse.Namespace) -> Job:
    """What to write, from our flags or Megatron-LM's; InputError for a combination that cannot work."""
    for flag in UNSUPPORTED:
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            raise InputError(f"{flag} (a Megatron-LM flag) is not supported here: {UNSUPPORTED[flag]}; drop it")
    kind = TOKENIZER_TYPES.get(args.tokenizer_type)
    if kind is None:
        raise InputError(f"--tokenizer-type {args.tokenizer_type} is not supported; use one of "
                         f"{', '.join(TOKENIZER_TYPES)}")
    megatron = args.tokenizer_type in MEGATRON_TOKENIZER_TYPES
    if kind == "gpt2bpe":
        if args.vocab_file and args.tokenizer:
            raise InputError("give GPT-2's vocab.json once: --vocab-file or --tokenizer, not both")
        tokenizer = args.vocab_file or args.tokenizer
        if not tokenizer or not args.merge_file:
            raise InputError(f"--tokenizer-type {args.tokenizer_type} needs --vocab-file gpt2-vocab.json and "
                             "--merge-file gpt2-merges.txt")
    else:
        if args.vocab_file or args.merge_file:
            raise InputError(f"--vocab-file and --merge-file go with GPT2BPETokenizer; --tokenizer-type "
                             f"{args.tokenizer_type} reads its files from --tokenizer-model (--tokenizer)")
        tokenizer = args.tokenizer
        if not tokenizer:
            raise InputError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model (or --tokenizer): "
                             "a sentencepiece .model file or a Hugging Face tokenizer folder")
    if args.hf_special_tokens is not None and kind == "sentencepiece":
        raise InputError("--tokenizer-hf-(no-)include-special-tokens goes with Hugging Face tokenizers, not "
                         f"--tokenizer-type {args.tokenizer_type}")
    if megatron:  # Megatron-LM's naming and semantics (tools/preprocess_data.py, Encoder.encode)
        special = kind == "hf" and args.hf_special_tokens is not False
        outputs = [(key, f"{args.output_prefix}_{key}_document") for key in args.text_keys]
        return Job(tokenizer, kind, args.merge_file or "", special, args.append_eod, outputs)
    if len(args.text_keys) > 1:
        raise InputError(f"{len(args.text_keys)} text keys need one output each: call the script Megatron's way "
                         "(--tokenizer-type SentencePieceTokenizer, HuggingFaceTokenizer or GPT2BPETokenizer), which "
                         "writes <output-prefix>_<key>_document per key")
    return Job(tokenizer, kind, args.merge_file or "", bool(args.hf_special_tokens), True,
               [(args.text_keys[0], args.output_prefix)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = plan_job(args)
        inputs = resolve_inputs(args.input) if args.input else None
        for _, prefix in job.outputs:
            check_output(prefix)
        if not job.append_eod:
            print("note: without --append-eod the documents get no end-of-document token (as in Megatron-LM)",
                  file=sys.stderr)
        for key, prefix in job.outputs:  # one pass over the inputs per key
            if inputs is not None:
                records = read_records(inputs, key, args.hf_split)
            else:
                records = read_hub_dataset(args.hf_dataset, key, args.hf_config, args.hf_split,
                                           streaming=not args.no_streaming)
            summary = tokenize_to_indexed(records, prefix, job.tokenizer, job.tokenizer_type, key,
                                          max(1, args.workers), args.strict, args.batch_size,
                                          progress=not args.quiet, merge_file=job.merge_file,
                                          special_tokens=job.special_tokens, append_eod=job.append_eod)
            print(f"wrote {prefix}.bin/.idx")
            print(summary.format())
    except (InputError, OSError, ValueError) as error:  # tokenizer files missing or unusable included
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
