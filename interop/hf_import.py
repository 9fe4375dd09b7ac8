"""The way back: a Hugging Face folder (GPT-2, StableLM, or one this project exported) as a moetron GPT, and
sparse upcycling of a dense moetron GPT into an MoE.

What imports exactly is what interop/export.py exports: GPT-2 with zero linear biases (moetron's linears have
none; a GPT-2 trained elsewhere has biases, which fail with the layer named) and a GELU with the tanh
approximation; StableLM with full rotary dimensions, no q|k|v bias, no q/k LayerNorm, no parallel residual and as
many key/value heads as heads; the moetron class, dense or MoE. Llama and the RMSNorm families fail naming
RMSNorm (moetron's blocks use LayerNorm). The folder is read as files (config.json, safetensors): no model code
of the folder runs.

Upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling"): every expert of an MoE layer starts as a copy of the
dense block's MLP and the router is freshly initialised. With the top-k gates renormalised to sum to 1, each
token's output is sum_j g_j MLP(x) = MLP(x): the upcycled model computes the dense model's logits at step 0.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from interop.export import layer_norm, rotate_half_order
from model.gpt import GPT
from train.config import Config, config_from_tree

GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")  # the same function: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
RMSNORM_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "olmoe", "gemma",
                    "phi3")


class HFImportError(ValueError):
    """The folder holds a model moetron cannot compute exactly; the message names what is unsupported."""


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HFImportError(f"{folder} has no config.json; give a Hugging Face model folder (save_pretrained's) or "
                            "a moetron step-N checkpoint folder")
    return json.loads((folder / "config.json").read_text())


def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, in fp32."""
    from safetensors.torch import load_file
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    if not all((folder / f).is_file() for f in files):
        raise HFImportError(f"{folder} has no model.safetensors (or the files its index names); save the model "
                            "with safetensors (save_pretrained's default)")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(folder / f)))
    return {k: v.float() for k, v in tensors.items()}


def _require(checks: list[tuple[bool, str]], what: str) -> None:
    bad = [problem for ok, problem in checks if not ok]
    if bad:
        raise HFImportError(f"{what} is unsupported: {'; '.join(bad)}")


def model_section(hf: dict) -> tuple[dict, int]:
    """The model: section (and the sequence length) of a moetron config for the folder's config.json, or
    HFImportError naming what moetron cannot compute."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        d = hf["n_embd"]
        _require([(hf.get("activation_function") in GELU_TANH,
                   f"activation_function={hf.get('activation_function')} (moetron's GELU is the tanh approximation, "
                   f"{GELU_TANH[0]})"),
                  (hf.get("scale_attn_weights", True), "scale_attn_weights=false"),
                  (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true")],
                 "this GPT-2")
        section = dict(num_layers=hf["n_layer"], hidden_size=d, num_heads=hf["n_head"],
                       ffn_hidden_size=hf.get("n_inner") or 4 * d, position="learned", activation="gelu",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        seq = hf["n_positions"]
    elif kind == "stablelm":
        rope = hf.get("rope_parameters") or {}
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
        heads = hf["num_attention_heads"]
        _require([(partial == 1.0, f"partial_rotary_factor={partial} (moetron rotates every dimension: 1.0)"),
                  (rope.get("rope_type", "default") == "default", f"rope_type={rope.get('rope_type')}"),
                  (not hf.get("use_qkv_bias"), "use_qkv_bias=true (moetron's linears have no bias)"),
                  (not hf.get("qk_layernorm"), "qk_layernorm=true"),
                  (not hf.get("use_parallel_residual"), "use_parallel_residual=true"),
                  (hf.get("num_key_value_heads", heads) == heads, "grouped key/value heads"),
                  (hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')} (SwiGLU needs silu)")],
                 "this StableLM")
        section = dict(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_heads=heads,
                       ffn_hidden_size=hf["intermediate_size"], position="rope", activation="swiglu",
                       norm_eps=hf.get("layer_norm_eps", 1e-5), rope_base=float(rope.get("rope_theta", 10000.0)))
        seq = hf["max_position_embeddings"]
    elif kind == "moetron":
        section = dict(num_layers=hf["num_layers"], hidden_size=hf["hidden_size"], num_heads=hf["num_heads"],
                       ffn_hidden_size=hf["ffn_hidden_size"], position=hf["position"], activation=hf["activation"],
                       norm_eps=hf["norm_eps"], rope_base=hf["rope_base"])
        seq = hf["max_position_embeddings"]
    elif kind in RMSNORM_FAMILIES:
        raise HFImportError(f"model_type={kind} is unsupported: it normalises with RMSNorm, moetron's blocks with "
                           "LayerNorm (mean removed, with bias), so its logits cannot be reproduced; moetron imports "
                           "gpt2, stablelm and its own exports")
    else:
        raise HFImportError(f"model_type={kind} is unsupported; moetron imports gpt2, stablelm (Llama's blocks with "
                           "LayerNorm) and its own exports")
    section.update(vocab_size=hf["vocab_size"], tie_embeddings=hf.get("tie_word_embeddings", True))
    return section, seq


def moe_section(hf: dict) -> dict:
    """The moe: section for a moetron export (dense: no experts)."""
    if hf.get("model_type") != "moetron" or not hf.get("num_experts"):
        return {"num_experts": 0}
    layers = hf["moe_layers"]
    return {"num_experts": hf["num_experts"], "top_k": hf["num_experts_per_tok"],
            "ffn_hidden_size": hf["moe_ffn_hidden_size"],
            "layers": "all" if layers == list(range(hf["num_layers"])) else ",".join(map(str, layers)),
            "router": {"type": hf["router_type"], "renormalize": hf["renormalize"], "jitter_eps": hf["jitter_eps"],
                       "expert_bias_rate": hf["expert_bias_rate"]}}


def project_weights(hf: dict, tensors: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """The GPT state dict for the folder's tensors (the inverse of interop/export.py's maps)."""
    kind, m = hf["model_type"], cfg.model
    if kind == "moetron":
        return {("head.weight" if k == "lm_head.weight" else k[len("model."):]): v for k, v in tensors.items()}
    sd = {}
    if kind == "gpt2":
        t = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in tensors.items()}
        sd.update({"embed.weight": t["wte.weight"], "pos.weight": t["wpe.weight"], **layer_norm(t, "ln_f", "ln_f")})
        for i in range(m.num_layers):
            src, dst = f"h.{i}", f"blocks.{i}"
            for a, b in (("ln_1", "ln1"), ("ln_2", "ln2")):
                sd.update(layer_norm(t, f"{src}.{a}", f"{dst}.{b}"))
            for name, key in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc1"),
                              ("mlp.c_proj", "mlp.fc2")):
                bias = t.get(f"{src}.{name}.bias")
                if bias is not None and bias.abs().max() > 0:
                    raise HFImportError(f"this GPT-2 is unsupported: {src}.{name} has a non-zero bias (moetron's "
                                       "linears have none; GPT-2 checkpoints trained elsewhere have them)")
                sd[f"{dst}.{key}.weight"] = t[f"{src}.{name}.weight"].t().contiguous()
        head = t.get("lm_head.weight")
    else:  # stablelm
        d, H = m.hidden_size, m.num_heads
        back = torch.argsort(rotate_half_order(d // H))  # rotate-half order -> moetron's interleaved pairs
        sd.update({"embed.weight": tensors["model.embed_tokens.weight"], **layer_norm(tensors, "model.norm", "ln_f")})
        for i in range(m.num_layers):
            src, dst = f"model.layers.{i}", f"blocks.{i}"
            for a, b in (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")):
                sd.update(layer_norm(tensors, f"{src}.{a}", f"{dst}.{b}"))
            q, k = (tensors[f"{src}.self_attn.{p}_proj.weight"].view(H, -1, d)[:, back].reshape(d, d) for p in "qk")
            sd[f"{dst}.attn.qkv.weight"] = torch.cat([q, k, tensors[f"{src}.self_attn.v_proj.weight"]])
            sd[f"{dst}.attn.proj.weight"] = tensors[f"{src}.self_attn.o_proj.weight"]
            for name, key in (("gate_proj", "fc1"), ("up_proj", "fc3"), ("down_proj", "fc2")):
                sd[f"{dst}.mlp.{key}.weight"] = tensors[f"{src}.mlp.{name}.weight"]
        head = tensors.get("lm_head.weight")
    if not m.tie_embeddings:
        sd["head.weight"] = head
    return sd


def import_folder(folder: str | Path, base: dict | None = None) -> tuple[GPT, Config]:
    """A Hugging Face folder -> (a one-process GPT with its weights, the config: `base`'s sections with the
    model, moe and sequence length of the folder, its tokenizer as data.tokenizer when it has one)."""
    folder = Path(folder)
    hf = read_config(folder)
    section, seq = model_section(hf)  # refuses what moetron cannot compute before reading any weight
    tree = copy.deepcopy(base or {})
    tree["model"] = section
    moe, found = tree.setdefault("moe", {}), moe_section(hf)
    router = found.pop("router", None)
    moe.update(found)
    if router:
        moe.setdefault("router", {}).update(router)
    data = tree.setdefault("data", {})
    if section["position"] == "learned" or "seq_length" not in data:  # a rotary model may train shorter
        data["seq_length"] = seq
    if (folder / "tokenizer.model").is_file():
        data.update(tokenizer=str(folder / "tokenizer.model"), tokenizer_type="sentencepiece")
    elif (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        data.update(tokenizer=str(folder), tokenizer_type="hf")
    cfg = config_from_tree(tree)
    model = GPT(cfg.model, cfg.moe, cfg.model.vocab_size, cfg.data.seq_length)
    sd = project_weights(hf, read_tensors(folder), cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise HFImportError(f"{folder}: the weights do not fit its config.json: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}")
    return model.eval(), cfg


def upcycle(dense: GPT, cfg: Config, num_experts: int, top_k: int, layers: str = "all", renormalize: bool = True,
            seed: int = 0, moe: dict | None = None) -> tuple[GPT, Config]:
    """The MoE GPT whose MoE layers (`layers`, as moe.layers) hold `num_experts` copies of the dense block's MLP
    and a fresh router (drawn from `seed`); everything else is the dense model's. `moe`: further moe.* settings
    (backend, router losses, ...). -> (the MoE, its config)."""
    if dense.moe_layers():
        raise HFImportError("upcycling starts from a dense model; this one already has MoE layers")
    tree = cfg.to_dict()
    for key, value in (moe or {}).items():
        tree["moe"][key] = {**tree["moe"][key], **value} if isinstance(value, dict) else value
    tree["moe"].update(num_experts=num_experts, top_k=top_k, layers=layers, ffn_hidden_size=0)
    tree["moe"]["router"]["renormalize"] = renormalize
    moe_cfg = config_from_tree(tree)
    torch.manual_seed(seed)
    moe = GPT(moe_cfg.model, moe_cfg.moe, dense.vocab_size, dense.seq_length)
    dense_sd, sd = dense.state_dict(), moe.state_dict()
    moe_blocks = set(moe_cfg.moe.moe_layer_indices(moe_cfg.model.num_layers))
    for key in sd:
        block = int(key.split(".")[1]) if key.startswith("blocks.") else None
        if block not in moe_blocks or ".mlp." not in key:
            sd[key] = dense_sd[key]
    for i in moe_blocks:
        # nn.Linear holds [out, in]; the experts [E, in, out] (moe/experts/base.py)
        for expert, linear in (("w1", "fc1"), ("w3", "fc3"), ("w2", "fc2")):
            name = f"blocks.{i}.mlp.{linear}.weight"
            if name in dense_sd:
                sd[f"blocks.{i}.mlp.experts.{expert}"] = dense_sd[name].t().expand(num_experts, -1, -1).clone()
    moe.load_state_dict(sd)
    return moe.eval(), moe_cfg
