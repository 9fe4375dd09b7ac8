"""FLOPs accounting: one formula, used for TFLOP/s and MFU.

Per token, forward, per layer (h hidden, s sequence, f expert/MLP width, k active experts, m = 2 matrices for
GELU or 3 for SwiGLU): attention projections 8h^2, attention scores and values 4sh, MLP 2mhfk (dense: k = 1);
plus the LM head 2hV once. Backward costs twice the forward, so per sequence

    flops = 3 * s * [ sum over layers (8h^2 + 4sh + 2mhfk) + 2hV ].

For the MegaBlocks/Narayanan setting (f = 4h, GELU, top-1) this is exactly 72 s l h^2 (1 + s/6h + V/12lh):
316 / 879 / 2,487 GFLOPs per sequence for XS / Small / Medium. The router (2hE per token) is left out, as in the paper.
"""
from __future__ import annotations

from model.config import ModelConfig
from moe.config import MoEConfig

# dense bf16 peak FLOP/s by device name fragment (datasheet, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
             "A10G": 125e12, "B200": 2250e12}


def flops_per_sequence(model: ModelConfig, moe: MoEConfig, vocab_size: int, seq_length: int) -> float:
    h, s = model.hidden_size, seq_length
    m = 3 if model.activation == "swiglu" else 2
    moe_layers = set(moe.moe_layer_indices(model.num_layers))
    per_token = 2 * h * vocab_size
    for i in range(model.num_layers):
        f, k = (moe.ffn_hidden_size or model.ffn, moe.top_k) if i in moe_layers else (model.ffn, 1)
        per_token += 8 * h * h + 4 * s * h + 2 * m * h * f * k
    return 3.0 * s * per_token


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak of the named device, None where unknown (or on CPU: no MFU)."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16.items():
        if key in device_name:
            return peak
    return None
