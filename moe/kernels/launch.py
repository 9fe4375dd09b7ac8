"""Launching Triton kernels with little host time: the compiled kernel is kept and launched directly.

Host time bounds small MoE layers (S1 of benchmarks/bench_moe.py): `fn[grid](...)` spends about 50 us of
Python per launch on an H100 host building triton's cache key from every argument, against about 10 us in the
compiled kernel's own launcher (benchmarks/results/2026-11-22-h100-scatter-v3.md). `launch` keeps the compiled
kernel under the constexprs, the options and what triton specializes on, and replays it.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
from triton import knobs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_COMPILED: dict[tuple, tuple] = {}  # (id(fn), device, constexprs, options, specialization) -> compiled, constexprs


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host: triton.cdiv is a constexpr function, 3 us a call from Python."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for the host: triton.next_power_of_2 takes 6 us a call."""
    return 1 << max(n - 1, 0).bit_length()


def _specialization(tensors: tuple, ints: tuple) -> tuple:
    """What triton compiles a kernel apart for: a tensor's dtype and 16-byte alignment; an integer's being 1,
    divisible by 16, and its type (int32, int64, uint64)."""
    return (*[t.dtype for t in tensors], *[t.data_ptr() & 15 == 0 for t in tensors],
            *[4 if i == 1 else (i & 15 == 0) + (0 if -2**31 <= i < 2**31 else 2 if i < 2**63 else 6) for i in ints])


@functools.cache
def _driver() -> tuple:
    """triton's current-device and current-stream functions (each attribute of triton's lazy driver proxy
    costs a lookup)."""
    driver = triton.runtime.driver.active
    return driver.get_current_device, driver.get_current_stream


def _hook(hook):
    """A triton launch hook, or None where it is unset or an empty chain: the launcher then calls nothing and
    needs no launch metadata."""
    return hook if getattr(hook, "calls", hook) else None


def launch(fn, grid, tensors: tuple, ints: tuple, constexprs: dict, options: tuple = ()) -> None:
    """fn[grid](*tensors, *ints, **constexprs, **dict(options)) for a @triton.jit `fn` whose parameters are its
    tensors, then its integers, then its constexprs. `grid` is a tuple, or a function of the constexprs (a
    config's block sizes among them); `options` a triton.Config's all_kwargs().items() as a tuple."""
    # fn is module-level (its id lives on); compiled kernels are per device, like triton's cache
    spec = (id(fn), tensors[0].get_device(), tuple(constexprs.values()), options, _specialization(tensors, ints))
    hit = _COMPILED.get(spec)
    if hit is None:
        compiled = fn[grid](*tensors, *ints, **constexprs, **dict(options))
        if not INTERPRET:  # the interpreter compiles nothing
            merged = {**constexprs, **dict(options)}
            meta = {name: merged[name] for name in fn.arg_names[len(tensors) + len(ints):]}  # in parameter order
            _COMPILED[spec] = (compiled, meta, tuple(meta.values()))
        return
    # what JITFunction.run does once the kernel is compiled, without rebuilding its key
    compiled, meta, consts = hit
    grid = grid(meta) if callable(grid) else grid
    current_device, current_stream = _driver()
    stream = current_stream(current_device())
    enter, exit_ = _hook(knobs.runtime.launch_enter_hook), _hook(knobs.runtime.launch_exit_hook)
    args = (*tensors, *ints, *consts)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata,
                 None if enter is None else compiled.launch_metadata(grid, stream, *args), enter, exit_, *args)
