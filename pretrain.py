"""Pretrain a GPT (dense or MoE) from a YAML config.

    python pretrain.py --config configs/tiny.yaml [dotted.key=value ...]
    torchrun --nproc_per_node=8 pretrain.py --config configs/moe_medium.yaml parallel.expert=8
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from errors import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.lr=3e-4 moe.backend=padded")
    p.add_argument("--dry-run", action="store_true",
                   help="print the rank layout and each rank's parameters and memory estimate, then exit")
    p.add_argument("--world-size", type=int, default=1, help="with --dry-run: the number of processes to plan for")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit codes: 0 done (or stopped by SIGTERM / SIGUSR1, to be requeued), 1 a checkpoint or divergence error,
    2 a configuration error, 130 stopped by Ctrl-C."""
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    from train.signals import StopRequest
    stop = StopRequest()  # first, before anything slow: a signal during start-up stops the run cleanly
    try:
        return train(args, stop)
    except KeyboardInterrupt:
        print("interrupted: a second Ctrl-C stopped the run at once; the checkpoints saved before it are kept and "
              "an unfinished step-N.tmp is ignored by checkpoint.resume=auto", file=sys.stderr, flush=True)
        return 130
    finally:
        stop.restore()


def dry_run(args) -> int:
    from train.config import load_config
    from train.dryrun import report
    from train.plan import plan_run
    try:
        cfg = load_config(args.config, args.overrides, args.world_size)
        print(report(cfg, plan_run(cfg, args.world_size)))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


def train(args, stop) -> int:
    import torch
    import yaml

    from train.config import load_config, save_config
    from train.plan import check_device, plan_run
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides, world_size)
        plan = plan_run(cfg, world_size)  # the derived sizes, computed once
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2

    from data.loader import GPTData
    from model.gpt import GPT
    from parallel.factory import build_layers
    from parallel.grads import GradSync
    from parallel.state import init_parallel, shutdown_parallel
    from train.checkpoint import Checkpointer, CheckpointError
    from train.metrics import MetricsLogger, previous_run, set_aside
    from train.trainer import Trainer, TrainingDiverged, resolve_device

    logger = None
    try:
        run_dir = Path(cfg.logging.run_dir)
        earlier = previous_run(run_dir)
        if earlier and not cfg.checkpoint.resume and not cfg.logging.overwrite:
            raise ConfigError("logging.run_dir", f"is {run_dir}, which holds a previous run ({', '.join(earlier)}); "
                              "continue it with checkpoint.resume=auto, start over with logging.overwrite=true (its "
                              "files move aside), or give another logging.run_dir")
        device = resolve_device(cfg.train.device)
        check_device(cfg, device.type, os.environ.get("TRITON_INTERPRET") == "1")
        ps = init_parallel(cfg.parallel, device)
        stop.device = device = ps.device  # under torchrun on GPUs: cuda:LOCAL_RANK
        if ps.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                if earlier and cfg.logging.overwrite and not cfg.checkpoint.resume:
                    print(f"logging.overwrite: the previous run's files moved to {set_aside(run_dir)}", flush=True)
                save_config(cfg, run_dir / "config.yaml")
            except OSError as e:
                raise ConfigError("logging.run_dir", f"is {run_dir}, which cannot be written ({e.strerror or e}); "
                                  "give a folder you can write to") from e
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), flush=True)

        t = cfg.train
        data = GPTData(cfg.data, t.seed, train_samples=t.steps * t.global_batch_size,
                       valid_samples=max(t.eval_batches * t.micro_batch_size * ps.dp_size, 1),
                       dp_rank=ps.dp_rank, dp_size=ps.dp_size)
        torch.manual_seed(t.seed)
        model = GPT(cfg.model, cfg.moe, plan.vocab_size, cfg.data.seq_length, build_layers(ps)).to(device)
        if t.compile:
            model.compile_blocks(t.cuda_graphs)
        if ps.is_main:
            print(summary(cfg, plan, model, ps, run_dir), flush=True)
        logger = MetricsLogger(run_dir, ps.is_main, cfg.logging.wandb, cfg.logging.wandb_project,
                               cfg.logging.tensorboard, cfg.to_dict())
        checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, ps, cfg.to_dict())
        trainer = Trainer(t, plan, model, data, ps, logger, GradSync(model, ps, cfg.parallel.bucket_mb),
                          checkpointer, stop)
        resume_from = checkpointer.resolve(cfg.checkpoint.resume)
        if resume_from is not None:
            trainer.load_checkpoint(resume_from)
        if stop.agreed():  # a signal during start-up: nothing trained, nothing to save
            if ps.is_main:
                print(f"stopping before the first step on {stop.received or 'a signal to another rank'}", flush=True)
            return stop.exit_code
        trainer.run()
    except ConfigError as e:  # what only shows when the data, tokenizer or device is there
        print(e, file=sys.stderr, flush=True)
        return 2
    except (CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if logger is not None:
            logger.close()
        shutdown_parallel()
    return stop.exit_code


def summary(cfg, plan, model, ps, run_dir: Path) -> str:
    """The start-up summary: what will run, where, how big."""
    n, t, moe = model.num_params(), cfg.train, cfg.moe
    moe_text = (f"MoE {moe.num_experts} experts top-{moe.top_k} in {len(model.moe_layers())} of "
                f"{cfg.model.num_layers} blocks, backend {moe.backend}" if moe.num_experts else "dense")
    resume = f"resuming ({cfg.checkpoint.resume})" if cfg.checkpoint.resume else "fresh"
    return "\n".join([
        f"model: {n['total'] / 1e6:.2f}M parameters, {n['active'] / 1e6:.2f}M active per token; vocab "
        f"{plan.vocab_size}; {moe_text}",
        f"batch: {plan.tokens_per_step:,} tokens per step ({t.global_batch_size} sequences of {plan.seq_length}: "
        f"{plan.accumulation} micro-batches of {t.micro_batch_size} on each of {plan.data_parallel} data-parallel "
        f"ranks); {t.steps:,} steps, {t.steps * plan.tokens_per_step:,} tokens",
        f"layout: world {ps.world_size} = tensor {ps.tp_size} x expert {ps.ep_size} x expert-data {ps.edp_size}; "
        f"device {ps.device}; compile {t.compile}{', CUDA graphs' if t.cuda_graphs else ''}",
        f"run: {run_dir} ({resume})"])


if __name__ == "__main__":
    sys.exit(main())
