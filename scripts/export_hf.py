#!/usr/bin/env python
"""Write a Hugging Face model folder (model.safetensors, config.json, tokenizer files) from a moetron checkpoint,
saved under any parallel layout:

    python scripts/export_hf.py runs/tiny/checkpoints/step-120 hf/tiny

Dense models become GPT-2 (learned positions, GELU) or StableLM (rotary, SwiGLU: Llama's blocks with LayerNorm),
a SparseMixer top-2 MoE in every block with rotary SwiGLU blocks becomes PhiMoE; every other model (softmax-routed
MoEs among them) becomes moetron's own small transformers class, copied into the folder (load it with
trust_remote_code=True). The folder is then reloaded and its fp32 logits compared with the
project's on random tokens (--no-check skips that). interop/export.py says why each architecture was chosen.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interop.export import ARCHS, UNMATCHED, ExportError, export_checkpoint  # noqa: E402
from train.checkpoint_storage import CheckpointError  # noqa: E402

TOLERANCE = 1e-4  # fp32 logits: the exported model computes the same operations, in a slightly different order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step-N checkpoint folder")
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--arch", default="auto", choices=[*ARCHS, *UNMATCHED],
                        help="auto (default) picks gpt2, stablelm, phimoe or moetron; the others fail, saying why")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer to write (default: the checkpoint "
                        "config's data.tokenizer)")
    parser.add_argument("--no-check", action="store_true", help="skip reloading the folder to compare logits")
    args = parser.parse_args(argv)
    try:
        report = export_checkpoint(args.checkpoint, args.out, args.arch, check=not args.no_check,
                                   tokenizer=args.tokenizer)
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in report["notes"]:
        print(f"note: {note}")
    line = f"wrote {args.out} as {report['arch']}"
    if "max_abs_diff" in report:
        line += f"; reloaded, fp32 logits differ from the checkpoint's by at most {report['max_abs_diff']:.1e}"
    print(line)
    if report.get("max_abs_diff", 0.0) > TOLERANCE:
        print(f"error: the logits differ by more than {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
