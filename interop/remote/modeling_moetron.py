"""A moetron GPT (dense or MoE) as a Hugging Face causal LM, in plain PyTorch.

Shipped inside an exported folder for the models no transformers architecture reproduces exactly (such as the
MegaBlocks paper's MoE: learned positions, GELU, LayerNorm, top-1), loaded with `trust_remote_code=True`. It
imports only torch and transformers, and computes what moetron's model/gpt.py and moe/ compute at inference:

    tokens -> embedding (+ learned positions) -> N x [x + Attn(LN(x)); x + MLP-or-MoE(LN(x))] -> LN -> head

- attention: one fused q|k|v projection, no biases, softmax(q k^T / sqrt(head_dim)), rotary positions rotating
  the pairs (x[2i], x[2i+1]) of each head (the interleaved convention, not Llama's rotate-half);
- MLP: GELU with the tanh approximation, or SwiGLU silu(x W1) * (x W3) then W2; no biases;
- MoE: the router's logits in fp32; softmax top-k (optionally renormalised; the aux-loss-free bias only picks
  the experts) or SparseMixer's evaluation rule; no capacity, so no token is dropped (a model trained with
  the padded backend's capacity factor dropped tokens over capacity in training; here every token is computed).
  The experts run one after another over the tokens routed to them.
- generation keeps a key/value cache (transformers' DynamicCache).
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_moetron import MoetronConfig


def rotate_pairs(x, cos, sin):
    """Rotate the pairs (x[2i], x[2i+1]) of x [B, H, S, hd] by cos/sin [B, 1, S, hd/2]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def activate(h1, h3, activation):
    return F.silu(h1) * h3 if activation == "swiglu" else F.gelu(h1, approximate="tanh")


class MoetronAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.layer_idx = config.num_heads, layer_idx
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x, rope, mask, cache):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, S, hd] each
        if rope is not None:
            q, k = rotate_pairs(q, *rope), rotate_pairs(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, S, -1))


class MoetronMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        self.activation = config.activation
        self.fc1 = nn.Linear(d, f, bias=False)
        self.fc3 = nn.Linear(d, f, bias=False) if config.activation == "swiglu" else None
        self.fc2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.fc2(activate(self.fc1(x), self.fc3(x) if self.fc3 is not None else None, self.activation))


class MoetronRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        E, d = config.num_experts, config.hidden_size
        self.config = config
        self.weight = nn.Parameter(torch.empty(E, d))
        self.register_buffer("expert_bias", torch.zeros(E))
        sparsemixer_v1 = config.router_type == "sparsemixer" and config.num_experts_per_tok == 1
        self.omega = nn.Parameter(torch.ones(d)) if sparsemixer_v1 else None  # channel scale after the combine

    def forward(self, x):
        """x [T, d] -> (expert ids [T, k], gate weights [T, k] fp32)."""
        cfg = self.config
        logits = F.linear(x.float(), self.weight.float())  # [T, E] in fp32 whatever the model's dtype
        if cfg.router_type == "sparsemixer":
            return sparsemixer_eval(logits, cfg.num_experts_per_tok, cfg.jitter_eps)
        probs = logits.softmax(-1)
        if cfg.expert_bias_rate > 0:  # the bias picks the experts; the gates stay the unbiased probabilities
            ids = torch.topk(probs + self.expert_bias, cfg.num_experts_per_tok, dim=-1).indices
            weights = probs.gather(1, ids)
        else:
            weights, ids = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
        if cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights


def sparsemixer_eval(logits, top_k, eps):
    """SparseMixer at inference: at each of the k stages, mask the experts whose logit trails the best remaining
    one by more than 2*eps relative to max(|logit|, best), take the best, gate it by its probability under the
    softmax of the unmasked logits; the second stage excludes the first choice."""
    ids, weights, excluded = [], [], torch.zeros_like(logits, dtype=torch.bool)
    for _ in range(top_k):
        remaining = logits.masked_fill(excluded, float("-inf"))
        best = remaining.max(-1, keepdim=True).values
        far = (best - remaining) > 2 * eps * torch.maximum(remaining.abs(), best)
        masked = remaining.masked_fill(far | excluded, float("-inf"))
        probs, choice = masked.softmax(-1), masked.argmax(-1, keepdim=True)
        ids.append(choice)
        weights.append(probs.gather(1, choice))
        excluded = excluded.scatter(1, choice, True)
    return torch.cat(ids, 1), torch.cat(weights, 1)


class MoetronExperts(nn.Module):
    """w1 [E, d, f] (the gate projection for SwiGLU), w3 [E, d, f] (SwiGLU's up projection), w2 [E, f, d]."""

    def __init__(self, config):
        super().__init__()
        E, d, f = config.num_experts, config.hidden_size, config.moe_ffn_hidden_size
        self.activation = config.activation
        self.w1 = nn.Parameter(torch.empty(E, d, f))
        self.w3 = nn.Parameter(torch.empty(E, d, f)) if config.activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(E, f, d))

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            token, slot = (ids == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            rows = x[token]
            h3 = rows @ self.w3[e] if self.w3 is not None else None
            y = activate(rows @ self.w1[e], h3, self.activation) @ self.w2[e]
            out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out


class MoetronMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = MoetronRouter(config)
        self.experts = MoetronExperts(config)

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        y = self.experts(x_TD, *self.router(x_TD))
        if self.router.omega is not None:
            y = y * self.router.omega.to(y.dtype)
        return y.view_as(x)


class MoetronBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        d, eps = config.hidden_size, config.norm_eps
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.attn = MoetronAttention(config, layer_idx)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MoetronMoE(config) if layer_idx in config.moe_layers else MoetronMLP(config)

    def forward(self, x, rope, mask, cache):
        x = x + self.attn(self.ln1(x), rope, mask, cache)
        return x + self.mlp(self.ln2(x))


class MoetronPreTrainedModel(PreTrainedModel):
    config_class = MoetronConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoetronBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(std=std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, MoetronRouter):
            module.weight.normal_(std=std)
            module.expert_bias.zero_()
            if module.omega is not None:
                module.omega.fill_(1.0)
        elif isinstance(module, MoetronExperts):
            for w in (module.w1, module.w2, module.w3):
                if w is not None:
                    w.normal_(std=std)


class MoetronModel(MoetronPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.max_position_embeddings, d) if config.position == "learned" else None
        self.blocks = nn.ModuleList(MoetronBlock(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(d, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        B, S = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=input_ids.device).expand(B, S)
        x = self.embed(input_ids)
        if self.pos is not None:
            x = x + self.pos(position_ids)
        rope = None
        if self.config.position == "rope":
            # computed here, not held in a buffer: from_pretrained would leave a non-persistent buffer uninitialised
            head_dim = self.config.hidden_size // self.config.num_heads
            inv_freq = 1.0 / self.config.rope_base ** (torch.arange(0, head_dim, 2, device=x.device,
                                                                     dtype=torch.float32) / head_dim)
            angles = position_ids[:, None, :, None].float() * inv_freq  # [B, 1, S, hd/2]
            rope = (angles.cos(), angles.sin())
        mask = attention_mask_for(attention_mask, S, past, x.device)
        for block in self.blocks:
            x = block(x, rope, mask, past_key_values)
        return self.ln_f(x)


def attention_mask_for(attention_mask, S, past, device):
    """None (plain causal attention) when there is neither a cache nor padding; else a boolean [B or 1, 1, S, K]
    mask: causal over the K = past + S keys, padded keys (attention_mask 0) excluded. A query at a padded position
    keeps its own key, so no row is empty (an empty row would give NaN, which would reach the other rows)."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded:
        return None
    K = past + S
    query = torch.arange(past, K, device=device)[:, None]
    key = torch.arange(K, device=device)[None, :]
    mask = (key <= query)[None, None]  # [1, 1, S, K]
    if padded:
        mask = mask & attention_mask[:, None, None, -K:].bool()
        mask = mask | (key == query)[None, None]
    return mask


class MoetronForCausalLM(MoetronPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MoetronModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        hidden = self.model(input_ids, attention_mask, position_ids, past_key_values if use_cache else None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
