"""A GPT whose blocks hold a dense MLP or an MoE layer.

    tokens [B, S] -> embedding (+ learned positions) -> N x Block -> LayerNorm -> LM head + cross-entropy -> loss
    Block: x + Attention(LN(x)), then x + MLP(LN(x)) or x + MoE(LN(x))

The LM head and the cross-entropy are one fused, chunked operation (parallel/cross_entropy.py): the logits
[B*S, V] are never materialised whole, nor in fp32.

Pre-norm blocks, causal attention through torch's scaled_dot_product_attention, learned or rotary positions,
GELU or SwiGLU MLPs, tied or untied head. The MoE layer (moe/layer.py) returns its load-balance and z losses,
which `GPT.forward` averages over MoE layers and adds, weighted, to the language-model loss. All MoE layers
record their statistics into the model's one `moe_stats` (moe/stats.py), which the trainer reads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.config import ModelConfig
from moe.config import MoEConfig
from moe.experts.base import activate, compute_dtype
from moe.layer import MoELayer
from moe.stats import MoEStats
from parallel.layers import Layers


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # [S, hd/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, H, S, hd] by position-dependent angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, H, S, hd/2] each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# scaled_dot_product_attention's kernels, in the order tried. auto puts cuDNN first: on Hopper its fused attention
# runs the causal forward+backward of the paper configs' heads (64 wide) faster than flash (measured alone and in
# the compiled block: benchmarks/results/, README). Recent torch already prefers it there when cuDNN is new
# enough; auto makes that choice independent of torch's heuristic, and the other names force one kernel (flash,
# say, where a cuDNN version misbehaves).
SDPA_BACKENDS = {"auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH],
                 "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
                 "efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH]}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, output_std: float, layers: Layers | None = None):
        super().__init__()
        layers = layers or Layers()
        self.backends = SDPA_BACKENDS[cfg.attention_backend]
        d = cfg.hidden_size
        self.num_heads, self.rope = cfg.num_heads // layers.tp_size, cfg.position == "rope"  # heads held here
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        nn.init.normal_(self.proj.weight, std=output_std)
        self.qkv, self.proj = layers.column(self.qkv, chunks=3), layers.row(self.proj)  # tp: q|k|v heads split

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, S, d = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, S, hd] each
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        with sdpa_kernel(self.backends, set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, hd]
        return self.proj(y.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, output_std: float, layers: Layers | None = None):
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn
        self.activation = cfg.activation
        self.fc1 = nn.Linear(d, f, bias=False)
        self.fc3 = nn.Linear(d, f, bias=False) if cfg.activation == "swiglu" else None
        self.fc2 = nn.Linear(f, d, bias=False)
        for lin in (self.fc1, self.fc3):
            if lin is not None:
                nn.init.normal_(lin.weight, std=cfg.init_std)
        nn.init.normal_(self.fc2.weight, std=output_std)
        layers = layers or Layers()
        self.fc1, self.fc2 = layers.column(self.fc1), layers.row(self.fc2)
        self.fc3 = layers.column(self.fc3) if self.fc3 is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h3 = self.fc3(x) if self.fc3 is not None else None
        return self.fc2(activate(self.fc1(x), h3, self.activation))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig | None, layers: Layers | None = None,
                 moe_stats: MoEStats | None = None, moe_index: int = 0):
        """With `moe_cfg` the MLP is an MoE layer, recording into row `moe_index` of `moe_stats`."""
        super().__init__()
        layers = layers or Layers()
        output_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-2 / Megatron scaled output init
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg, output_std, layers)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = (MoELayer(moe_cfg, cfg.hidden_size, cfg.ffn, cfg.activation, cfg.init_std, output_std,
                             layers.ps, moe_stats, moe_index)
                    if moe_cfg is not None else MLP(cfg, output_std, layers))

    def forward(self, x, rope=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = x + self.attn(self.ln1(x), rope)
        if isinstance(self.mlp, MoELayer):
            y, aux, z = self.mlp(self.ln2(x))
            return x + y, aux, z
        return x + self.mlp(self.ln2(x)), None, None


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, vocab_size: int, seq_length: int,
                 layers: Layers | None = None):
        """`layers` (parallel/layers.py) shards the modules for this rank; the default keeps them whole."""
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.layers = layers = layers or Layers()
        self.vocab_size, self.seq_length = vocab_size, seq_length
        d = cfg.hidden_size
        self.embed = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.embed = layers.vocab_embedding(self.embed)
        self.pos = None
        if cfg.position == "learned":
            self.pos = nn.Embedding(seq_length, d)
            nn.init.normal_(self.pos.weight, std=cfg.init_std)
        moe_blocks = moe_cfg.moe_layer_indices(cfg.num_layers)
        self.moe_stats = MoEStats(len(moe_blocks), moe_cfg.num_experts, layers.ps.dp_group)
        self.blocks = nn.ModuleList(
            Block(cfg, moe_cfg, layers, self.moe_stats, moe_blocks.index(i)) if i in moe_blocks
            else Block(cfg, None, layers) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = None
        if not cfg.tie_embeddings:
            self.head = nn.Linear(d, vocab_size, bias=False)
            nn.init.normal_(self.head.weight, std=cfg.init_std)
            self.head = layers.column(self.head)  # tp: vocabulary rows split like the embedding's
        if cfg.position == "rope":
            cos, sin = rope_tables(seq_length, d // cfg.num_heads, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def compile_blocks(self, cuda_graphs: bool = False) -> None:
        """torch.compile each block (`cuda_graphs`: replayed as CUDA graphs, mode reduce-overhead). The MoE
        kernels are custom ops, opaque inside the graph; the group bounds that the reference and the CPU grouped
        backends read to the host are traced as symbolic sizes (capture_scalar_outputs) instead of breaking the
        graph."""
        torch._dynamo.config.capture_scalar_outputs = True
        for block in self.blocks:
            block.compile(mode="reduce-overhead" if cuda_graphs else None)

    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoELayer)]

    def end_step(self, applied: torch.Tensor | bool) -> None:
        """After each optimizer step (`applied`, a device flag or a bool: False for a skipped, non-finite step):
        the expert-bias update from the step's loads, which a skipped step leaves out; the step's counts are
        cleared either way."""
        if self.moe_cfg.router.expert_bias_rate > 0:
            loads = self.moe_stats.step_loads()  # [L, E] over the data-parallel group
            for i, layer in enumerate(self.moe_layers()):
                layer.router.update_bias(loads[i], applied)
        self.moe_stats.end_step()

    def features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """tokens [B, S] -> (final-norm hidden states [B, S, d], the MoE layers' aux and z losses)."""
        S = tokens.shape[1]
        x = self.embed(tokens)  # [B, S, d]
        if self.pos is not None:
            x = x + self.pos.weight[:S]
        rope = (self.rope_cos[:S], self.rope_sin[:S]) if self.cfg.position == "rope" else None
        aux_terms, z_terms = [], []
        for block in self.blocks:
            x, aux, z = block(x, rope)
            if aux is not None:
                aux_terms.append(aux)
                z_terms.append(z)
        return self.ln_f(x), aux_terms, z_terms

    def head_weight(self) -> torch.Tensor:
        """The LM head [V / tp, d]: the embedding when tied."""
        return self.head.weight if self.head is not None else self.embed.weight

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V / tp] in the activations' dtype, materialised whole: for inference
        and checks (export, tests), not for training."""
        return F.linear(self.features(tokens)[0], self.head_weight())

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens, targets [B, S] -> (total loss, {"lm_loss", "aux_loss", "z_loss"}), aux and z averaged over
        MoE layers."""
        B, S = tokens.shape
        x, aux_terms, z_terms = self.features(tokens)
        weight = self.head_weight()  # [V / tp, d]
        # the logits [B*S, V / tp] are computed chunk by chunk inside the loss, never whole; the label names the
        # phase in profiles (benchmarks/profile_step.py)
        with torch.profiler.record_function("lm_loss"):
            lm = self.layers.lm_loss(x.view(B * S, -1), weight, targets.reshape(-1), compute_dtype(x))
        zero = lm.new_zeros(())
        aux = torch.stack(aux_terms).mean() if aux_terms else zero
        z = torch.stack(z_terms).mean() if z_terms else zero
        loss = lm + self.moe_cfg.router.aux_loss_weight * aux + self.moe_cfg.router.z_loss_weight * z
        return loss, {"lm_loss": lm.detach(), "aux_loss": aux.detach(), "z_loss": z.detach()}

    def num_params(self) -> dict[str, int]:
        """Total parameters, and those active per token (top-k of the experts)."""
        total = sum(p.numel() for p in self.parameters())
        moe = self.moe_layers()
        expert = sum(p.numel() for m in moe for p in m.experts.parameters())
        held = moe[0].experts.num_experts if moe else 1  # experts of a layer held here (E / ep)
        active = total - expert + expert * self.moe_cfg.top_k // held if moe else total
        return {"total": total, "active": active}
