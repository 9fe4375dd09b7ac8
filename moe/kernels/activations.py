"""The activations of the Triton kernels' epilogues, written once: GELU (tanh approximation) and its gradient.

GELU(h) = 0.5 h (1 + tanh(u)), u = sqrt(2/pi) (h + 0.044715 h^3), computed as h * sigmoid(2u)
(0.5 (1 + tanh(u)) = sigmoid(2u)), the same function as torch's F.gelu(approximate="tanh").
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gelu_sigmoid(h):
    """s = sigmoid(2u): gelu(h) = h * s."""
    return tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))


@triton.jit
def gelu_tanh_approx(h):
    """gelu(h) with the GPU's tanh.approx.f32, one special-function op where the sigmoid takes an exp and a
    reciprocal (relative error ~5e-4, under bf16's 4e-3): for 16-bit epilogues on the GPU only."""
    t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.7978845608028654 * (h + 0.044715 * h * h * h)],
                                  dtype=tl.float32, is_pure=True, pack=1)
    return 0.5 * h * (1.0 + t)


@triton.jit
def gelu_grad(h, s, act):
    """gelu'(h) from s = gelu_sigmoid(h) and act = h * s."""
    return s + act * (1.0 - s) * 1.5957691216057308 * (1.0 + 3.0 * 0.044715 * h * h)
