"""The training loop: gradient accumulation, clipping, AdamW, LR schedule, validation, metrics.

One optimizer step consumes `train.global_batch_size` sequences: each of the `dp_size` data-parallel ranks
takes its shard and runs it as `accumulation` micro-batches of `train.micro_batch_size`.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from parallel.grads import GradSync
from parallel.state import ParallelState
from train.checkpoint import CheckpointError, Checkpointer
from train.config import Config
from train.flops import flops_per_sequence, peak_flops
from train.metrics import MetricsLogger
from train.optim import build_optimizer, lr_at
from train.signals import StopRequest


class TrainingDiverged(RuntimeError):
    """train.max_skipped non-finite steps in a row: the run stops without saving."""


class Trainer:
    def __init__(self, cfg: Config, model: torch.nn.Module, data, ps: ParallelState, logger: MetricsLogger,
                 checkpointer: Checkpointer | None = None, stop: StopRequest | None = None):
        self.cfg, self.model, self.data, self.ps, self.logger = cfg, model, data, ps, logger
        self.checkpointer, self.stop = checkpointer, stop  # saving (None: never) and preemption (None: ignored)
        t = cfg.train
        self.accumulation = t.global_batch_size // (t.micro_batch_size * ps.dp_size)
        self.optimizer = build_optimizer(model, t)
        self.grad_sync = GradSync(model, ps, cfg.parallel.bucket_mb)  # dp / expert-dp reduction, global clip
        self.device = ps.device
        self.autocast_dtype = torch.bfloat16 if resolve_dtype(t.dtype, self.device) == "bf16" else None
        self.flops_per_seq = flops_per_sequence(cfg.model, cfg.moe, model.vocab_size, cfg.data.seq_length)
        self.peak = peak_flops(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None)
        self.step = 0
        self.skipped_in_row = 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = batch.to(self.device, non_blocking=True)
        with self.autocast():
            return self.model(batch[:, :-1], batch[:, 1:])

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        """One optimizer step over `accumulation` micro-batches. Returns device tensors (no host sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg.train)
        sums = {}
        for i in range(self.accumulation):
            loss, parts = self.forward(next(batches))
            self.grad_sync.begin_backward(last=i == self.accumulation - 1)  # reduce overlapped with the last
            (loss / self.accumulation).backward()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0) + v / self.accumulation
        sums = self.grad_sync.average(sums)  # means over the data-parallel ranks: every rank skips alike
        grad_norm = self.grad_sync.finish(self.cfg.train.clip_grad)  # wait for the reduction, clip (0: off)
        sums["grad_norm"] = grad_norm
        applied = bool(torch.isfinite(sums["loss"]) and torch.isfinite(grad_norm))  # the step's one host sync
        if applied:
            self.optimizer.step()
            self.skipped_in_row = 0
        for m in self.model.modules():  # per-step state of the MoE layers (expert bias, global aux counts)
            if hasattr(m, "after_step"):
                m.after_step(applied)
        if not applied:
            self.skipped_in_row += 1
            self.report_skip(sums)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return sums

    def report_skip(self, sums: dict) -> None:
        """Print the skipped step and its suspects; stop the run with TrainingDiverged after train.max_skipped
        in a row."""
        vals = {k: float(v) for k, v in sums.items()}
        suspects = self.skip_suspects(vals)  # on every rank: reading the MoE metrics is a collective
        if self.ps.is_main:
            print(f"step {self.step + 1}: non-finite loss or gradient, step skipped ({self.skipped_in_row} in a "
                  f"row): {vals}; suspects: {'; '.join(suspects) or 'none found'}", flush=True)
        if self.skipped_in_row >= self.cfg.train.max_skipped:
            raise TrainingDiverged(f"{self.skipped_in_row} non-finite steps in a row (train.max_skipped="
                                   f"{self.cfg.train.max_skipped}) up to step {self.step + 1}; stopping without "
                                   "saving. Lower train.lr, or check the data, then resume from the last checkpoint.")

    def skip_suspects(self, vals: dict[str, float]) -> list[str]:
        """The non-finite loss parts and grad norm, and each MoE layer's non-finite aux or z loss (read_metrics,
        which also resets the layer's interval metrics)."""
        out = [f"{k}={v}" for k, v in vals.items() if not math.isfinite(v)]
        for name, m in self.model.named_modules():
            if hasattr(m, "read_metrics"):
                out += [f"{name} {k}={v.item()}" for k, v in m.read_metrics().items()
                        if k in ("aux_loss", "z_loss") and not torch.isfinite(v)]
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        t = self.cfg.train
        losses = [self.forward(b)[1]["lm"] for b in self.data.valid_batches(t.micro_batch_size, t.eval_batches)]
        self.model.train()
        return self.grad_sync.average({"val": torch.stack(losses).mean()})["val"].item()  # over dp shards

    def run(self) -> list[dict]:
        t = self.cfg.train
        batches = self.data.train_batches(self.step * t.global_batch_size, t.micro_batch_size, t.global_batch_size)
        self.model.train()
        history, window, tick = [], [], time.perf_counter()
        while self.step < t.steps:
            window.append(self.train_step(batches))
            if self.step % t.log_interval == 0 or self.step == t.steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                record = self.record(window, elapsed)
                if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                    record["val_loss"] = self.evaluate()
                self.logger.log(record)
                history.append(record)
                window = []
                tick = time.perf_counter()  # validation and logging stay out of the throughput
            if self.stop is not None and self.stop.agreed():
                self.save_checkpoint()
                if self.ps.is_main:
                    print(f"stopping at step {self.step} on {self.stop.received or 'a signal to another rank'}; "
                          "resume with checkpoint.resume=auto", flush=True)
                break
            ckpt = self.cfg.checkpoint.interval
            if self.step == t.steps or (ckpt and self.step % ckpt == 0):
                self.save_checkpoint()
                tick = time.perf_counter()
        if self.checkpointer is not None:
            self.checkpointer.wait()
        return history

    def checkpoint_meta(self) -> dict:
        """What meta.json records besides the step: the data position and LR follow from it (kept to check)."""
        return {"consumed_samples": self.step * self.cfg.train.global_batch_size,
                "lr": lr_at(self.step, self.cfg.train), "skipped_in_row": self.skipped_in_row}

    def save_checkpoint(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(self.step, self.model, self.optimizer, self.checkpoint_meta())

    def load_checkpoint(self, path) -> None:
        """Restore model, optimizer, RNG and step from a step-N folder (see train/checkpoint.py)."""
        meta = self.checkpointer.load(path, self.model, self.optimizer)
        gbs = self.cfg.train.global_batch_size
        if meta["consumed_samples"] != meta["step"] * gbs:
            raise CheckpointError(f"checkpoint {path}: {meta['consumed_samples']} samples consumed in "
                                  f"{meta['step']} steps, but train.global_batch_size={gbs} would place step "
                                  f"{meta['step']} at sample {meta['step'] * gbs}; resume with the saved global "
                                  "batch size")
        self.step, self.skipped_in_row = meta["step"], meta["skipped_in_row"]
        if self.ps.is_main and meta["lr"] != lr_at(self.step, self.cfg.train):
            print(f"checkpoint: the LR schedule changed (train.* differs from the saved run): step {self.step} "
                  f"gets lr {lr_at(self.step, self.cfg.train):.3e}, the saved run would use {meta['lr']:.3e}",
                  flush=True)

    def record(self, window: list[dict], elapsed: float) -> dict:
        t, n = self.cfg.train, len(window)
        mean = {k: torch.stack([w[k] for w in window]).float().mean().item() for k in window[0]}
        seqs_per_s = n * t.global_batch_size / elapsed
        tflops = seqs_per_s * self.flops_per_seq / self.ps.world_size / 1e12
        rec = {"step": self.step, "loss": mean["loss"], "lm_loss": mean["lm"], "aux_loss": mean["aux"],
               "z_loss": mean["z"], "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": mean["grad_norm"],
               "tokens_per_s": seqs_per_s * self.cfg.data.seq_length, "tflops": tflops,
               "mfu": tflops * 1e12 / self.peak if self.peak else None,
               "mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None,
               "step_time_s": elapsed / n}
        for i, layer in enumerate(self.model.moe_layers()):
            for k, v in layer.read_metrics().items():
                rec[f"moe/{i}/{k}"] = v.item()
        return rec


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
