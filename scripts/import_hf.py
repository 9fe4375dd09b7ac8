#!/usr/bin/env python
"""Turn a Hugging Face model folder into a moetron checkpoint, optionally upcycled into an MoE:

    python scripts/import_hf.py hf/tiny runs/from-hf                         # GPT-2 / StableLM / moetron export
    python scripts/import_hf.py hf/tiny runs/upcycled --experts 8 --top-k 2  # every expert a copy of the MLP
    python scripts/import_hf.py runs/dense/checkpoints/step-500 runs/upcycled --experts 8   # a dense checkpoint

Writes <out>/config.yaml and <out>/checkpoints/step-0; `python pretrain.py --config <out>/config.yaml` then trains
on from it (fresh optimizer; add parallel.* and train.* overrides as usual). --config gives the other sections
(train, data, ...; default: the defaults, or the checkpoint's own). Supported: what interop/hf_import.py says;
anything else fails naming what is unsupported. An upcycled model is checked to give the dense model's logits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from errors import ConfigError  # noqa: E402
from interop.hf_import import HFImportError  # noqa: E402
from train.checkpoint_storage import META, CheckpointError  # noqa: E402

TOLERANCE = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a Hugging Face model folder, or a moetron step-N checkpoint folder")
    parser.add_argument("out", help="the run folder to write (config.yaml, checkpoints/step-0)")
    parser.add_argument("--config", default=None, help="a moetron YAML for the sections the source does not give")
    parser.add_argument("--experts", type=int, default=0, help="upcycle: experts per MoE layer (0: keep dense)")
    parser.add_argument("--top-k", type=int, default=1, help="upcycle: experts per token (default 1)")
    parser.add_argument("--moe-layers", default="all", help="upcycle: which blocks, as moe.layers (default all)")
    parser.add_argument("--no-renormalize", action="store_true", help="upcycle: do not rescale the top-k gates to "
                        "sum to 1 (then the MoE's output starts scaled by the chosen probability mass)")
    parser.add_argument("--seed", type=int, default=0, help="upcycle: the router's initialisation seed")
    args = parser.parse_args(argv)

    import torch

    from interop.checkpoints import load_checkpoint_model, save_checkpoint_model
    from interop.hf_import import import_folder, upcycle
    try:
        base = yaml.safe_load(Path(args.config).read_text()) if args.config else None
        source = Path(args.source)
        moe = {}
        if (source / META).is_file():
            model, cfg, saved = load_checkpoint_model(source)
            if base is not None:
                raise HFImportError("--config applies to Hugging Face folders; a checkpoint brings its own config "
                                    "(override its sections when you train)")
            moe = {k: saved["moe"][k] for k in ("backend", "capacity", "router") if k in saved.get("moe", {})}
        else:
            model, cfg = import_folder(source, base)
            moe = {k: v for k, v in (base or {}).get("moe", {}).items() if k not in ("num_experts", "top_k", "layers")}
        what = "imported"
        if args.experts:
            dense = model
            model, cfg = upcycle(dense, cfg, args.experts, args.top_k, args.moe_layers, not args.no_renormalize,
                                 args.seed, moe)
            what = f"upcycled into {args.experts} experts, top-{args.top_k}"
            if not args.no_renormalize:
                x = torch.randint(model.vocab_size, (2, min(16, model.seq_length)))
                diff = (model.logits(x) - dense.logits(x)).abs().max().item()
                what += f" (logits within {diff:.1e} of the dense model's)"
                if diff > TOLERANCE:
                    raise HFImportError(f"the upcycled model's logits differ from the dense model's by {diff}")
        step = save_checkpoint_model(model, cfg, args.out)
    except (HFImportError, CheckpointError, ConfigError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{what}: wrote {step}; train on with: python pretrain.py --config {Path(args.out) / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
