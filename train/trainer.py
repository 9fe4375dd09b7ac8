"""The training loop: gradient accumulation, clipping, AdamW, LR schedule, validation, metrics.

One optimizer step consumes `train.global_batch_size` sequences: each of the data-parallel ranks takes its
shard and runs it as `plan.accumulation` micro-batches of `train.micro_batch_size`.

What the trainer asks of the model: `model(tokens, targets) -> (loss, {"lm_loss", "aux_loss", "z_loss"})`,
`model.end_step(applied)` after every optimizer step (`applied` a device flag), and
`model.moe_stats.reduce_and_reset()` once per log interval (a collective; never on the skip path).

No host synchronisation inside a step: a step whose loss or gradient norm is not finite is skipped on the device
(AdamW's found_inf, as with a GradScaler), and the host reads that flag one step later, when the next step is
already queued behind it, so the GPU never waits for the host to launch the next step. The skip report, the
train.max_skipped stop and the skipped_in_row of checkpoints are settled before every checkpoint, log line and
the end of the run.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from errors import ConfigError
from parallel.grads import GradSync
from parallel.state import ParallelState
from train.checkpoint import Checkpointer, CheckpointError
from train.config import TrainConfig
from train.flops import peak_flops
from train.metrics import MetricsLogger
from train.optim import build_optimizer, lr_at
from train.plan import RunPlan
from train.precision import MasterWeights
from train.signals import StopRequest


class TrainingDiverged(RuntimeError):
    """train.max_skipped non-finite steps in a row: the run stops without saving."""


class Trainer:
    def __init__(self, cfg: TrainConfig, plan: RunPlan, model: torch.nn.Module, data, ps: ParallelState,
                 logger: MetricsLogger, grad_sync: GradSync, checkpointer: Checkpointer | None = None,
                 stop: StopRequest | None = None):
        """`grad_sync`: the dp / expert-dp gradient reduction and global clip; `checkpointer` None: never save;
        `stop` None: preemption signals are ignored."""
        self.cfg, self.plan, self.model, self.data, self.ps, self.logger = cfg, plan, model, data, ps, logger
        self.grad_sync, self.checkpointer, self.stop = grad_sync, checkpointer, stop
        self.accumulation = plan.accumulation
        self.optimizer = build_optimizer(model, cfg)
        self.device = ps.device
        bf16 = resolve_dtype(cfg.dtype, self.device) == "bf16"
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.weights = None  # fp32 weights (under bf16 autocast where bf16)
        if bf16 and cfg.master_weights:
            self.weights = MasterWeights([p for g in self.optimizer.param_groups for p in g["params"]])
            grad_sync.read_grads_with(self.weights.fold)
        self.peak = peak_flops(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None)
        self.step = 0
        self.skipped_in_row = 0
        self.unsettled = None  # (step, finite flag, loss parts, MoE losses) of the last step, not yet read

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cfg.cuda_graphs:  # the graphs' outputs of the previous call are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        batch = batch.to(self.device, non_blocking=True)
        with self.autocast():
            return self.model(batch[:, :-1], batch[:, 1:])

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        """One optimizer step over `accumulation` micro-batches. Returns device tensors (no host sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        sums = {}
        for i in range(self.accumulation):
            loss, parts = self.forward(next(batches))
            self.grad_sync.begin_backward(last=i == self.accumulation - 1)  # reduce overlapped with the last
            (loss / self.accumulation).backward()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0) + v / self.accumulation
        sums = self.grad_sync.average(sums)  # means over the data-parallel ranks: every rank skips alike
        # wait for the reduction; the clipping factor (1 when train.clip_grad=0), applied by AdamW as its
        # grad_scale (no separate pass over the gradients)
        grad_norm, factor = self.grad_sync.finish(self.cfg.clip_grad, scale=False)
        sums["grad_norm"] = grad_norm
        finite = torch.isfinite(sums["loss"]) & torch.isfinite(grad_norm)
        with self.master_weights():
            # fused AdamW divides the gradients by grad_scale, and where found_inf is set leaves the parameters,
            # its states and its step count as they were
            self.optimizer.grad_scale = factor.reciprocal()
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        moe_losses = self.model.moe_stats.step_losses.clone()  # for the skip report; end_step clears them
        self.model.end_step(finite)  # per-step state of the MoE layers (expert bias, global aux counts)
        self.step += 1
        previous, self.unsettled = self.unsettled, (self.step, finite, sums, moe_losses)
        if previous is not None:
            self.settle(previous)
        return sums

    def settle(self, pending=None) -> None:
        """Read a step's finite flag on the host (default: the last step's): count and report a skipped step;
        stop the run with TrainingDiverged after train.max_skipped in a row."""
        if pending is None:
            pending, self.unsettled = self.unsettled, None
            if pending is None:
                return
        step, finite, sums, moe_losses = pending
        if bool(finite):  # the host sync, one step behind the queue
            self.skipped_in_row = 0
            return
        self.skipped_in_row += 1
        vals = {k: float(v) for k, v in sums.items()}
        suspects = [f"{k}={v}" for k, v in vals.items() if not math.isfinite(v)]
        suspects += self.model.moe_stats.nonfinite(moe_losses)
        if self.ps.is_main:
            print(f"step {step}: non-finite loss or gradient, step skipped ({self.skipped_in_row} in a row): "
                  f"{vals}; suspects: {'; '.join(suspects) or 'none found'}", flush=True)
        if self.skipped_in_row >= self.cfg.max_skipped:
            raise TrainingDiverged(f"{self.skipped_in_row} non-finite steps in a row (train.max_skipped="
                                   f"{self.cfg.max_skipped}) up to step {step}; stopping without saving. Lower "
                                   "train.lr, or check the data, then resume from the last checkpoint.")

    def master_weights(self):
        """The parameters as fp32 masters (train/precision.py) for the optimizer and checkpoints; as they are
        without master weights."""
        return self.weights.masters() if self.weights is not None else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        t = self.cfg
        losses = [self.forward(b)[1]["lm_loss"] for b in self.data.valid_batches(t.micro_batch_size,
                                                                                   t.eval_batches)]
        self.model.train()
        return self.grad_sync.average({"val": torch.stack(losses).mean()})["val"].item()  # over dp shards

    def run(self) -> list[dict]:
        t = self.cfg
        self.logger.start(self.step)  # continues the sinks after the resumed step (train/metrics.py)
        batches = self.data.train_batches(self.step * t.global_batch_size, t.micro_batch_size, self.accumulation)
        self.model.train()
        history, window, tick = [], [], time.perf_counter()
        self.started = tick
        try:
            while self.step < t.steps:
                window.append(self.train_step(batches))
                if self.step % t.log_interval == 0 or self.step == t.steps:
                    self.settle()
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
                    if self.ps.is_main:
                        print(f"stopping at step {self.step} on {self.stop.received or 'a signal to another rank'}, "
                              "saving; resume with checkpoint.resume=auto", flush=True)
                    self.save_checkpoint()
                    break
                if self.checkpointer is not None and self.checkpointer.due(self.step, last=self.step == t.steps):
                    self.save_checkpoint()
                    tick = time.perf_counter()
        finally:
            batches.close()  # stops the data prefetch thread
        if self.checkpointer is not None:
            self.checkpointer.wait()
        return history

    def checkpoint_meta(self) -> dict:
        """What meta.json records besides the step: the data position and LR follow from it (kept to check)."""
        return {"consumed_samples": self.step * self.cfg.global_batch_size,
                "lr": lr_at(self.step, self.cfg), "skipped_in_row": self.skipped_in_row}

    def save_checkpoint(self) -> None:
        self.settle()  # a run that diverged by now stops without saving; skipped_in_row is current
        if self.checkpointer is not None:
            with self.master_weights():
                self.checkpointer.save(self.step, self.model, self.optimizer, self.checkpoint_meta())

    def load_checkpoint(self, path) -> None:
        """Restore model, optimizer, RNG and step from a step-N folder (see train/checkpoint.py)."""
        with self.master_weights():
            meta = self.checkpointer.load(path, self.model, self.optimizer)
        for key, kind in (("consumed_samples", int), ("skipped_in_row", int), ("lr", (int, float))):
            if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
                raise CheckpointError(f"checkpoint {path}: meta.json has no valid {key!r} ({meta.get(key)!r}); it was "
                                      "not written by this trainer. Resume from another step-N folder")
        gbs = self.cfg.global_batch_size
        if meta["consumed_samples"] != meta["step"] * gbs:
            raise CheckpointError(f"checkpoint {path}: {meta['consumed_samples']} samples consumed in "
                                  f"{meta['step']} steps, but train.global_batch_size={gbs} would place step "
                                  f"{meta['step']} at sample {meta['step'] * gbs}; resume with the saved global "
                                  "batch size")
        self.step, self.skipped_in_row = meta["step"], meta["skipped_in_row"]
        if self.ps.is_main and meta["lr"] != lr_at(self.step, self.cfg):
            print(f"checkpoint: the LR schedule changed (train.* differs from the saved run): step {self.step} "
                  f"gets lr {lr_at(self.step, self.cfg):.3e}, the saved run would use {meta['lr']:.3e}",
                  flush=True)

    def record(self, window: list[dict], elapsed: float) -> dict:
        n, plan = len(window), self.plan
        mean = dict(zip(window[0], torch.stack([torch.stack([w[k] for w in window]).float().mean()
                                                for k in window[0]]).tolist()))
        seqs_per_s = n * plan.global_batch_size / elapsed
        tflops = seqs_per_s * plan.flops_per_sequence / plan.world_size / 1e12
        rec = {"step": self.step, **mean, "lr": self.optimizer.param_groups[0]["lr"],
               "tokens_per_s": seqs_per_s * plan.seq_length, "tflops": tflops,
               "mfu": tflops * 1e12 / self.peak if self.peak else None,
               "mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None,
               "step_time_s": elapsed / n, "total_steps": self.cfg.steps,
               "elapsed_s": time.perf_counter() - self.started,
               "eta_s": (self.cfg.steps - self.step) * elapsed / n}  # at this interval's pace
        return {**rec, **self.model.moe_stats.reduce_and_reset()}


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device", "is cuda but no CUDA device is visible; use train.device=cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
