"""Launching Triton kernels with little host time, and autotuning them: the one launch path of every kernel.

Host time bounds small MoE layers: `fn[grid](...)` spends several times more Python per launch building
triton's cache key from every argument than the compiled kernel's own launcher does (measured in
benchmarks/host_overhead.py; benchmarks/results/ README). `launch` keeps the compiled kernel under the
constexprs, the options and what triton specializes on, and replays it.

`autotune` + `launch_tuned`: triton.autotune picks a config per key on a GPU the first time a key is seen;
after that the pick is replayed through `launch`, skipping the autotuner's per-call work too. The interpreter
cannot time kernels, so there the kernel is left plain and launched with the call site's `interpret` config.
"""
from __future__ import annotations

import functools
import os

import triton
from triton import knobs
from triton.runtime.autotuner import Autotuner

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_COMPILED: dict[tuple, tuple] = {}  # (id(fn), device, constexprs, options, specialization) -> compiled, constexprs
_PICKED: dict[tuple, tuple] = {}  # (kernel, key) -> the options (all_kwargs) of the config triton.autotune picked


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host: triton.cdiv is a constexpr function, several microseconds a call from Python."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for the host: triton.next_power_of_2 is a constexpr function,
    several microseconds a call."""
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


def autotune(configs: list[triton.Config], key: list[str], prune=None):
    """triton.autotune over `configs` (keyed on the named arguments `key`; `prune` an early_config_prune
    function), or, under the interpreter, the plain kernel."""
    if INTERPRET:
        return lambda kernel: kernel
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune} if prune else None)


def launch_tuned(kernel, grid, key: tuple, tensors: tuple, ints: tuple, constexprs: dict,
                 config: triton.Config | None = None, interpret: triton.Config | None = None) -> None:
    """Launch an `autotune`d kernel with the config triton.autotune picked for `key` (tuning it on first sight),
    or with `config` (a sweep's), or under the interpreter with `interpret`. `key` must distinguish what the
    kernel's autotune key does, with the operand dtypes; arguments as for `launch`."""
    tuned = isinstance(kernel, Autotuner)  # a plain kernel: `autotune` under the interpreter
    config = config or (None if tuned else interpret)
    if config is not None:
        launch(kernel.fn if tuned else kernel, grid, tensors, ints, constexprs, tuple(config.all_kwargs().items()))
        return
    options = _PICKED.get((kernel, key))
    if options is None:
        kernel[grid](*tensors, *ints, **constexprs)
        _PICKED[(kernel, key)] = tuple(kernel.best_config.all_kwargs().items())
        return
    launch(kernel.fn, grid, tensors, ints, constexprs, options)
