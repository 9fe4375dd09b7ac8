"""A moetron GPT as a Hugging Face model folder (safetensors, config.json, tokenizer files), logits unchanged.

Which transformers architecture holds a model exactly (every block: pre-LayerNorm with weight and bias,
attention and MLP without biases, softmax(q k^T / sqrt(head_dim)), causal):

    dense, learned positions, GELU (tanh)   -> gpt2       GPT2LMHeadModel; its linear biases are written as zeros
                                                          and its activation is gelu_pytorch_tanh
    dense, rotary positions, SwiGLU         -> stablelm   StableLmForCausalLM: Llama's attention and MLP with
                                                          LayerNorm (Llama itself uses RMSNorm: not the same
                                                          logits); partial_rotary_factor 1, no qkv bias, no
                                                          parallel residual; q and k rows reordered from
                                                          moetron's interleaved rotary pairs to rotate-half
    MoE in every block, rotary, SwiGLU,     -> phimoe     PhimoeForCausalLM: LayerNorm with bias, SparseMixer
    SparseMixer top-2 (router.type=                       top-2 routing whose evaluation rule is moetron's
    sparsemixer, top_k=2, layers=all)                     (moe/sparsemixer.py follows the PhiMoE code); its
                                                          router runs in the model's dtype, moetron's in fp32
                                                          (the same in fp32, not bit-equal in bf16)
    anything else (softmax-routed MoE,      -> moetron    the small model in interop/remote/, copied into the
    rope + GELU, learned + SwiGLU)                        folder (trust_remote_code=True)

No softmax-routed MoE architecture of transformers 5.23 matches a moetron MoE: Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, Granite-MoE and JetMoE normalise with RMSNorm, DBRX with a LayerNorm without bias, and PhiMoE (the one
MoE with moetron's LayerNorm) routes with SparseMixer only. `UNMATCHED` says why for each, so asking for one
fails with the reason. Inference in any of these has no expert capacity: a model trained with the padded
backend's capacity factor dropped tokens over capacity in training; the export computes every token (the
reference backend's logits).
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.gpt import GPT
from train.config import Config

ARCHS = ("auto", "gpt2", "stablelm", "phimoe", "moetron")
# architectures one may expect a moetron model to become, and why none reproduces its logits
UNMATCHED = {
    "llama": "LlamaForCausalLM normalises with RMSNorm; moetron's blocks use LayerNorm (mean removed, with bias)",
    "mixtral": "Mixtral normalises with RMSNorm; moetron's blocks use LayerNorm (mean removed, with bias)",
    "qwen2_moe": "Qwen2-MoE normalises with RMSNorm and adds a shared expert; moetron uses LayerNorm and none",
    "qwen3_moe": "Qwen3-MoE normalises with RMSNorm (also q and k); moetron's blocks use LayerNorm with bias",
    "olmoe": "OLMoE normalises with RMSNorm (also q and k); moetron's blocks use LayerNorm with bias",
    "dbrx": "DBRX's LayerNorms have no bias and it clips q|k|v; moetron's LayerNorms have a trained bias",
}


class ExportError(ValueError):
    """The checkpoint cannot become the requested architecture; the message names what is unsupported."""


# what each architecture holds: (model.position, model.activation, MoE?, in words)
SHAPES = {"gpt2": ("learned", "gelu", False, "GPT-2 has learned positions, a GELU MLP and no experts"),
          "stablelm": ("rope", "swiglu", False, "StableLM has rotary positions, a SwiGLU MLP and no experts"),
          "phimoe": ("rope", "swiglu", True, "PhiMoE routes every block with SparseMixer top-2 over rotary, SwiGLU "
                     "blocks")}


def arch_problems(cfg: Config, arch: str) -> list[str]:
    """The settings of `cfg` that `arch` (one of SHAPES) cannot hold; empty when it holds the model exactly."""
    m, moe = cfg.model, cfg.moe
    position, activation, is_moe, _ = SHAPES[arch]
    problems = [f"model.position={m.position}"] * (m.position != position) + \
               [f"model.activation={m.activation}"] * (m.activation != activation)
    if not is_moe:
        return problems + [f"moe.num_experts={moe.num_experts} (an MoE)"] * (moe.num_experts > 0)
    if not moe.num_experts:
        return problems + [f"moe.num_experts={moe.num_experts} (a dense model)"]
    dense_blocks = len(moe.moe_layer_indices(m.num_layers)) < m.num_layers
    return problems + [f"moe.router.type={moe.router.type}"] * (moe.router.type != "sparsemixer") + \
        [f"moe.top_k={moe.top_k}"] * (moe.top_k != 2) + [f"moe.layers={moe.layers} (dense blocks)"] * dense_blocks


def choose_arch(cfg: Config, requested: str = "auto") -> str:
    """The architecture for `cfg` (auto: the first of SHAPES that holds it, else moetron); ExportError naming
    what the requested one cannot hold."""
    if requested in UNMATCHED:
        raise ExportError(f"--arch {requested} is unsupported: {UNMATCHED[requested]}, so the logits would differ; "
                          "use --arch auto (the moetron class reproduces any moetron model)")
    if requested not in ARCHS:
        raise ExportError(f"--arch {requested!r} is unknown; use one of {list(ARCHS)}")
    if requested == "auto":
        return next((arch for arch in SHAPES if not arch_problems(cfg, arch)), "moetron")
    problems = arch_problems(cfg, requested) if requested in SHAPES else []
    if problems:
        raise ExportError(f"--arch {requested} cannot hold {', '.join(problems)}: {SHAPES[requested][3]}; use "
                          "--arch auto (moetron's own class holds any combination)")
    return requested


def to_hf(model: GPT, cfg: Config, arch: str, bos_id: int | None = None, eos_id: int | None = None):
    """The transformers model of `arch` holding `model`'s weights (fp32, eval mode)."""
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    build = {"gpt2": _gpt2, "stablelm": _stablelm, "phimoe": _phimoe, "moetron": _moetron}[arch]
    special = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}  # padding: generate's
    hf, weights = build(sd, cfg, model.vocab_size, model.seq_length, special)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{arch} mapping is incomplete: missing {sorted(set(missing) - tied)}, unexpected "
                           f"{sorted(unexpected)}")
    if cfg.model.tie_embeddings:
        hf.tie_weights()
    return hf.float().eval()


def layer_norm(sd: dict, src: str, dst: str) -> dict:
    """The LayerNorm `src` of state dict `sd` under the name `dst`."""
    return {f"{dst}.weight": sd[f"{src}.weight"], f"{dst}.bias": sd[f"{src}.bias"]}


def _gpt2(sd, cfg, vocab, seq, special):
    from transformers import GPT2Config, GPT2LMHeadModel
    m = cfg.model
    conf = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=m.hidden_size, n_layer=m.num_layers,
                      n_head=m.num_heads, n_inner=m.ffn, activation_function="gelu_pytorch_tanh",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=m.norm_eps,
                      tie_word_embeddings=m.tie_embeddings, **special)
    w = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos.weight"],
         **layer_norm(sd, "ln_f", "transformer.ln_f")}
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}", f"transformer.h.{i}"
        w.update(layer_norm(sd, f"{src}.ln1", f"{dst}.ln_1"))
        w.update(layer_norm(sd, f"{src}.ln2", f"{dst}.ln_2"))
        # GPT-2's Conv1D stores [in, out] and adds a bias: the transposes, and zeros
        for name, key in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc1"),
                          ("mlp.c_proj", "mlp.fc2")):
            weight = sd[f"{src}.{key}.weight"]
            w[f"{dst}.{name}.weight"] = weight.t().contiguous()
            w[f"{dst}.{name}.bias"] = weight.new_zeros(weight.shape[0])
    if not m.tie_embeddings:
        w["lm_head.weight"] = sd["head.weight"]
    return GPT2LMHeadModel(conf), w


def rotate_half_order(head_dim: int) -> torch.Tensor:
    """Feature order within a head that turns moetron's rotary pairs (2i, 2i+1) into rotate-half's (i, i + hd/2):
    [0, 2, 4, ..., 1, 3, 5, ...]. Permuting q and k alike leaves every q.k, so attention, unchanged."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _stablelm(sd, cfg, vocab, seq, special):
    from transformers import StableLmConfig, StableLmForCausalLM
    m = cfg.model
    d, H = m.hidden_size, m.num_heads
    conf = StableLmConfig(vocab_size=vocab, intermediate_size=m.ffn, hidden_size=d, num_hidden_layers=m.num_layers,
                          num_attention_heads=H, num_key_value_heads=H, hidden_act="silu",
                          max_position_embeddings=seq, layer_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                          rope_parameters={"rope_type": "default", "rope_theta": m.rope_base,
                                           "partial_rotary_factor": 1.0},
                          use_qkv_bias=False, qk_layernorm=False, use_parallel_residual=False,
                          hidden_dropout=0.0, attention_dropout=0.0, **special)
    w = _llama_layout(sd, m)
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}", f"model.layers.{i}"
        w[f"{dst}.mlp.gate_proj.weight"] = sd[f"{src}.mlp.fc1.weight"]
        w[f"{dst}.mlp.up_proj.weight"] = sd[f"{src}.mlp.fc3.weight"]
        w[f"{dst}.mlp.down_proj.weight"] = sd[f"{src}.mlp.fc2.weight"]
    if not m.tie_embeddings:
        w["lm_head.weight"] = sd["head.weight"]
    return StableLmForCausalLM(conf), w


def _llama_layout(sd: dict, m) -> dict:
    """What StableLM and PhiMoE name alike: the embedding, the final norm, and each layer's two norms and
    attention (Llama's layout); the callers add the MLP or the experts."""
    w = {"model.embed_tokens.weight": sd["embed.weight"], **layer_norm(sd, "ln_f", "model.norm")}
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}", f"model.layers.{i}"
        w.update(layer_norm(sd, f"{src}.ln1", f"{dst}.input_layernorm"))
        w.update(layer_norm(sd, f"{src}.ln2", f"{dst}.post_attention_layernorm"))
        w.update(_attention_rotate_half(sd, f"{src}.attn", f"{dst}.self_attn", m.hidden_size, m.num_heads))
    return w


def _attention_rotate_half(sd: dict, src: str, dst: str, d: int, H: int) -> dict:
    """q, k (rows reordered for rotate-half), v, o of moetron's attention `src` under Llama's names at `dst`."""
    order = rotate_half_order(d // H)
    q, k, v = sd[f"{src}.qkv.weight"].chunk(3)
    return {f"{dst}.q_proj.weight": q.view(H, -1, d)[:, order].reshape(d, d),
            f"{dst}.k_proj.weight": k.view(H, -1, d)[:, order].reshape(d, d),
            f"{dst}.v_proj.weight": v.contiguous(), f"{dst}.o_proj.weight": sd[f"{src}.proj.weight"]}


def _phimoe(sd, cfg, vocab, seq, special):
    from transformers import PhimoeConfig, PhimoeForCausalLM
    m, moe = cfg.model, cfg.moe
    d, H = m.hidden_size, m.num_heads
    conf = PhimoeConfig(vocab_size=vocab, hidden_size=d, intermediate_size=moe.ffn_hidden_size or m.ffn,
                        num_hidden_layers=m.num_layers, num_attention_heads=H, num_key_value_heads=H,
                        hidden_act="silu", max_position_embeddings=seq, rms_norm_eps=m.norm_eps,
                        tie_word_embeddings=m.tie_embeddings, sliding_window=None,
                        rope_parameters={"rope_type": "default", "rope_theta": m.rope_base},
                        num_experts_per_tok=2, num_local_experts=moe.num_experts,
                        router_jitter_noise=moe.router.jitter_eps, input_jitter_noise=0.0, attention_bias=False,
                        lm_head_bias=False, attention_dropout=0.0, **special)
    w = _llama_layout(sd, m)
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}", f"model.layers.{i}"
        w[f"{dst}.mlp.router.weight"] = sd[f"{src}.mlp.router.weight"]
        # PhiMoE's experts hold [E, 2f, d] (gate rows, then up rows) and [E, d, f]: moetron's [E, d, f] transposed
        w1, w3, w2 = (sd[f"{src}.mlp.experts.{n}"] for n in ("w1", "w3", "w2"))
        w[f"{dst}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], 2).transpose(1, 2).contiguous()
        w[f"{dst}.mlp.experts.down_proj"] = w2.transpose(1, 2).contiguous()
    if not m.tie_embeddings:
        w["lm_head.weight"] = sd["head.weight"]
    return PhimoeForCausalLM(conf), w


def moetron_config(cfg: Config, vocab: int, seq: int, special: dict):
    from interop.remote.configuration_moetron import MoetronConfig
    m, moe = cfg.model, cfg.moe
    return MoetronConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
        ffn_hidden_size=m.ffn, position=m.position, activation=m.activation, norm_eps=m.norm_eps,
        rope_base=m.rope_base, max_position_embeddings=seq, num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        moe_layers=moe.moe_layer_indices(m.num_layers), moe_ffn_hidden_size=moe.ffn_hidden_size or m.ffn,
        router_type=moe.router.type, renormalize=moe.router.renormalize,
        expert_bias_rate=moe.router.expert_bias_rate, jitter_eps=moe.router.jitter_eps,
        tie_word_embeddings=m.tie_embeddings, **special)


def _moetron(sd, cfg, vocab, seq, special):
    from interop.remote.modeling_moetron import MoetronForCausalLM
    w = {("lm_head.weight" if k == "head.weight" else f"model.{k}"): v for k, v in sd.items()}
    return MoetronForCausalLM(moetron_config(cfg, vocab, seq, special)), w


def save_hf(hf, out: Path) -> None:
    """save_pretrained; for the moetron class also its two source files and config.json's auto_map."""
    if hf.config.model_type == "moetron":
        type(hf.config).register_for_auto_class()
        type(hf).register_for_auto_class("AutoModelForCausalLM")
    hf.save_pretrained(out)


def sample_tokens(vocab: int, seq: int, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (batch, min(length, seq)), generator=torch.Generator().manual_seed(seed))


def export_checkpoint(checkpoint: str | Path, out: str | Path, arch: str = "auto", check: bool = True,
                      tokenizer: str | None = None) -> dict:
    """Write the Hugging Face folder `out` for the moetron checkpoint (a step-N folder), with the tokenizer
    `tokenizer` (default: the config's data.tokenizer). With `check`, reload `out` with AutoModelForCausalLM and
    compare its fp32 logits with the project's on random tokens. Returns {"arch", "max_abs_diff" (when checked),
    "notes"}."""
    from interop.checkpoints import load_checkpoint_model
    from interop.tokenizer import write_tokenizer
    model, cfg, saved = load_checkpoint_model(checkpoint)
    arch = choose_arch(cfg, arch)
    notes = []
    saved_moe = saved.get("moe", {})
    if cfg.moe.num_experts and saved_moe.get("backend") == "padded" and saved_moe.get("capacity", {}).get("factor"):
        notes.append("trained with the padded backend's capacity factor: tokens over capacity were dropped in "
                     "training; the exported model computes every token (dropless)")
    bos = eos = None
    out = Path(out)
    try:
        write_tokenizer(tokenizer or cfg.data.tokenizer, cfg.data.tokenizer_type, out)
        from transformers import AutoTokenizer
        loaded = AutoTokenizer.from_pretrained(out)  # before config.json exists: no remote code asked for
        bos, eos = loaded.bos_token_id, loaded.eos_token_id
    except (OSError, ValueError) as e:
        notes.append(f"no tokenizer written ({e}); copy the tokenizer files into {out} yourself")
    hf = to_hf(model, cfg, arch, bos, eos)
    save_hf(hf, out)
    report = {"arch": arch, "notes": notes}
    if check:
        from transformers import AutoModelForCausalLM
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=arch == "moetron").float().eval()
        tokens = sample_tokens(model.vocab_size, model.seq_length)
        with torch.no_grad():
            got = reloaded(tokens).logits
        report["max_abs_diff"] = (got - model.logits(tokens)).abs().max().item()
    return report
