"""Hugging Face export and import (interop/, scripts/export_hf.py, scripts/import_hf.py): tiny random models of
each kind saved through the project's checkpoint code (one also under tensor and expert parallelism over gloo),
exported, reloaded with AutoModelForCausalLM: fp32 logits within 1e-4 of the project's, generation with the
key/value cache equal to generation without; the tokenizer encodes as sentencepiece does; unsupported
requests fail naming what is unsupported."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from data.config import DataConfig
from interop.checkpoints import load_checkpoint_model, save_checkpoint_model
from interop.export import ExportError, choose_arch, export_checkpoint
from interop.hf_import import HFImportError, import_folder
from model.config import ModelConfig
from model.gpt import GPT
from moe.config import MoEConfig, RouterConfig
from parallel.state import ParallelState
from train.config import Config

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "corpus" / "tokenizer.model"
V, S = 8192, 32  # the corpus tokenizer's 8000 pieces, padded; sequence length
TOL = 1e-4


def make_config(moe: MoEConfig | None = None, **model) -> Config:
    model = {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "vocab_size": V, **model}
    cfg = Config(model=ModelConfig(**model), moe=moe or MoEConfig(),
                 data=DataConfig(seq_length=S, tokenizer=str(TOKENIZER)))
    cfg.validate()
    return cfg


def make_model(cfg: Config, seed: int = 0) -> GPT:
    """A random GPT whose LayerNorms and expert biases are not at their initial values (so that a mapping that
    dropped them would show)."""
    torch.manual_seed(seed)
    model = GPT(cfg.model, cfg.moe, V, S)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if ".ln" in name or name.startswith("ln_f") or name.endswith("expert_bias"):
                t.add_(torch.randn_like(t) * 0.2)
            if name.endswith("omega"):
                t.mul_(1 + torch.randn_like(t) * 0.2)
    return model.eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(V, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_load(out: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).float().eval()


def check_logits_and_generate(hf, model: GPT) -> None:
    x = tokens()
    with torch.no_grad():
        got, want = hf(x).logits, model.logits(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL
    prompt = x[:, :5]
    cached = hf.generate(prompt, max_new_tokens=4, do_sample=False)
    plain = hf.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.shape == (2, 9) and torch.equal(cached, plain)
    # greedy continuation = the project model's argmax, token by token
    seq = prompt
    for _ in range(4):
        seq = torch.cat([seq, model.logits(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)


KINDS = {  # name: (config, the architecture auto picks)
    "gpt2": (dict(), "gpt2"),
    "gpt2_untied": (dict(tie_embeddings=False, ffn_hidden_size=48, norm_eps=1e-6), "gpt2"),
    "stablelm": (dict(position="rope", activation="swiglu", tie_embeddings=False, rope_base=500.0), "stablelm"),
    "dense_rope_gelu": (dict(position="rope"), "moetron"),
    "moe_paper_top1": (dict(moe=MoEConfig(num_experts=4, top_k=1)), "moetron"),
    "moe_rope_swiglu_top2_renorm_odd": (dict(num_layers=3, position="rope", activation="swiglu", moe=MoEConfig(
        num_experts=4, top_k=2, layers="odd", ffn_hidden_size=24, router=RouterConfig(renormalize=True))), "moetron"),
    "moe_expert_bias_top2": (dict(moe=MoEConfig(num_experts=4, top_k=2, router=RouterConfig(expert_bias_rate=0.01))),
                             "moetron"),
    "sparsemixer_top1": (dict(moe=MoEConfig(num_experts=4, top_k=1, router=RouterConfig(type="sparsemixer",
                                                                                       jitter_eps=0.3))), "moetron"),
    "sparsemixer_top2": (dict(moe=MoEConfig(num_experts=4, top_k=2, router=RouterConfig(type="sparsemixer",
                                                                                       jitter_eps=0.3))), "moetron"),
    "phimoe": (dict(position="rope", activation="swiglu", tie_embeddings=False, moe=MoEConfig(
        num_experts=4, top_k=2, router=RouterConfig(type="sparsemixer", jitter_eps=0.3))), "phimoe"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_reproduces_logits(kind, tmp_path):
    kw, arch = KINDS[kind]
    cfg = make_config(**kw)
    model = make_model(cfg)
    step = save_checkpoint_model(model, cfg, tmp_path / "run")
    report = export_checkpoint(step, tmp_path / "hf", check=False)
    assert report["arch"] == arch
    hf = hf_load(tmp_path / "hf")
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "stablelm": "StableLmForCausalLM",
                                 "phimoe": "PhimoeForCausalLM", "moetron": "MoetronForCausalLM"}[arch]
    check_logits_and_generate(hf, model)


def test_padded_generation_and_tokenizer(tmp_path):
    """Batched, left-padded generation from text gives each prompt the continuation it gets alone (learned
    positions: a padded prompt's positions must start at 0 too)."""
    if not TOKENIZER.is_file():
        pytest.skip("no corpus tokenizer (scripts/prepare_corpus.py makes it)")
    from transformers import AutoTokenizer
    cfg = make_config(moe=MoEConfig(num_experts=4, top_k=2))
    step = save_checkpoint_model(make_model(cfg), cfg, tmp_path / "run")
    export_checkpoint(step, tmp_path / "hf", check=False)
    hf, tok = hf_load(tmp_path / "hf"), AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    prompts = ["ROMEO: O, she doth", "To be"]
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    together = hf.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for i, prompt in enumerate(prompts):
        alone = tok(prompt, return_tensors="pt")
        want = hf.generate(**alone, max_new_tokens=5, do_sample=False)[0, alone["input_ids"].shape[1]:]
        assert torch.equal(together[i], want), prompt


def test_tokenizer_encodes_like_sentencepiece(tmp_path):
    if not TOKENIZER.is_file():
        pytest.skip("no corpus tokenizer (scripts/prepare_corpus.py makes it)")
    from transformers import AutoTokenizer

    from data.tokenizer import SentencePieceTokenizer
    from interop.tokenizer import write_tokenizer
    write_tokenizer(str(TOKENIZER), "sentencepiece", tmp_path)
    hf, sp = AutoTokenizer.from_pretrained(tmp_path), SentencePieceTokenizer(str(TOKENIZER))
    texts = [" leading space", "  two  spaces\nafter a newline\n\nend ", "\nstarts with a newline", "ünï 😀 42",
             "tab\there", ""]
    corpus = ROOT / "corpus" / "shakespeare.jsonl"
    if corpus.is_file():
        texts += [json.loads(line)["text"][:2000] for line in corpus.read_text().splitlines()[:20]]
    for text in texts:
        ids = sp.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:40]
        assert hf.decode(ids) == sp.decode(ids) == text, text[:40]
    assert (hf.eos_token_id, hf.pad_token_id) == (sp.eod_id, sp.eod_id)
    write_tokenizer(str(tmp_path), "hf", tmp_path / "again")  # data.tokenizer_type=hf: saved as it is
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert all(again(text, add_special_tokens=False)["input_ids"] == sp.encode(text) for text in texts)


def test_unsupported_requests_name_the_problem():
    rope_dense = make_config(position="rope", activation="swiglu")
    with pytest.raises(ExportError, match="cannot hold model.position=rope, model.activation=swiglu"):
        choose_arch(rope_dense, "gpt2")
    moe = make_config(moe=MoEConfig(num_experts=4, top_k=2), position="rope", activation="swiglu")
    with pytest.raises(ExportError, match=r"moe.num_experts=4 \(an MoE\)"):
        choose_arch(moe, "stablelm")
    with pytest.raises(ExportError, match="Mixtral normalises with RMSNorm"):
        choose_arch(moe, "mixtral")
    assert choose_arch(moe, "moetron") == choose_arch(moe) == "moetron"
    with pytest.raises(ExportError, match="cannot hold moe.router.type=softmax"):
        choose_arch(moe, "phimoe")
    mixed = make_config(moe=MoEConfig(num_experts=4, top_k=2, layers="1", router=RouterConfig(
        type="sparsemixer", jitter_eps=0.1)), position="rope", activation="swiglu")
    with pytest.raises(ExportError, match=r"moe.layers=1 \(dense blocks\)"):
        choose_arch(mixed, "phimoe")
    assert choose_arch(mixed) == "moetron"


def run_script(name: str, args: list[str]) -> int:
    """scripts/<name>.py's main(args), in this process (the scripts are thin: their work is interop's)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args)


def test_export_cli(tmp_path, capsys):
    cfg = make_config()
    step = save_checkpoint_model(make_model(cfg), cfg, tmp_path / "run")
    assert run_script("export_hf", [str(step), str(tmp_path / "x"), "--arch", "stablelm"]) == 1
    assert "cannot hold model.position=learned, model.activation=gelu" in capsys.readouterr().err
    assert not (tmp_path / "x" / "config.json").exists()
    assert run_script("export_hf", [str(step), str(tmp_path / "hf")]) == 0
    assert "as gpt2; reloaded, fp32 logits differ" in capsys.readouterr().out


# ------------------------------------------------------------------------- a checkpoint saved split over ranks

LAYOUT_KINDS = {(2, 1): dict(position="rope", activation="swiglu", tie_embeddings=False),  # tp=2: a StableLM
                (1, 2): dict(moe=MoEConfig(num_experts=4, top_k=2, layers="1"))}  # ep=2: experts split


def _save_split(rank: int, size: int, tmp: str, port: int) -> None:
    from parallel.factory import build_layers
    from parallel.state import build_state
    from train.checkpoint import Checkpointer
    from train.config import CheckpointConfig
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    try:
        for (tp, ep), kw in LAYOUT_KINDS.items():
            ps: ParallelState = build_state(tp, ep, torch.device("cpu"))
            cfg = make_config(**kw)
            torch.manual_seed(0)
            model = GPT(cfg.model, cfg.moe, V, S, build_layers(ps))
            tree = cfg.to_dict()
            tree["parallel"].update(tensor=tp, expert=ep)
            from train.optim import build_optimizer
            Checkpointer(Path(tmp) / f"tp{tp}-ep{ep}", CheckpointConfig(), ps, tree).save(
                1, model, build_optimizer(model, cfg.train), {})
    finally:
        torch.distributed.destroy_process_group()


def test_export_of_a_checkpoint_saved_under_tensor_and_expert_parallelism(tmp_path):
    """Saved by 2 gloo ranks (tp=2 for a dense rope model, ep=2 for an MoE), exported by one process: the
    logits of the one-process model built from the same seed (tests/test_checkpoint.py shows those weights equal)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_save_split, args=(2, str(tmp_path), port), nprocs=2)
    for (tp, ep), kw in LAYOUT_KINDS.items():
        step = tmp_path / f"tp{tp}-ep{ep}" / "step-1"
        assert json.loads((step / "meta.json").read_text())["layout"]["world_size"] == 2
        cfg = make_config(**kw)
        torch.manual_seed(0)
        reference = GPT(cfg.model, cfg.moe, V, S).eval()
        loaded, _, _ = load_checkpoint_model(step)
        x = tokens()
        assert torch.equal(loaded.logits(x), reference.logits(x))
        export_checkpoint(step, tmp_path / f"hf-tp{tp}-ep{ep}", check=False)
        check_logits_and_generate(hf_load(tmp_path / f"hf-tp{tp}-ep{ep}"), reference)


# ------------------------------------------------------------------------------------ import and upcycling

def hf_model(kind: str, **overrides):
    """A random transformers GPT-2 or StableLM of the shapes moetron computes, LayerNorms perturbed."""
    from transformers import GPT2Config, GPT2LMHeadModel, StableLmConfig, StableLmForCausalLM
    torch.manual_seed(0)
    if kind == "gpt2":
        conf = GPT2Config(vocab_size=V, n_positions=S, n_embd=32, n_layer=2, n_head=2, n_inner=48,
                          activation_function="gelu_pytorch_tanh", **overrides)
        hf = GPT2LMHeadModel(conf)
    else:
        conf = StableLmConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=S,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                               "partial_rotary_factor": 1.0}, **overrides)
        hf = StableLmForCausalLM(conf)
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            if "ln" in name or "norm" in name:
                t.add_(torch.randn_like(t) * 0.2)
            elif name.endswith(".bias"):  # GPT-2's linear biases: zero, as moetron's (absent) ones
                t.zero_()
    return hf.eval()


@pytest.mark.parametrize("kind", ["gpt2", "stablelm"])
def test_import_reproduces_hf_logits_and_round_trips(kind, tmp_path):
    """transformers model -> moetron (logits equal) -> moetron checkpoint -> exported again (logits equal)."""
    hf = hf_model(kind, tie_word_embeddings=kind == "gpt2")
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = import_folder(tmp_path / "hf")
    assert (cfg.model.position, cfg.model.tie_embeddings) == (("learned", True) if kind == "gpt2" else ("rope", False))
    x = tokens()
    with torch.no_grad():
        want = hf(x).logits
    assert (model.logits(x) - want).abs().max().item() <= TOL
    step = save_checkpoint_model(model, cfg, tmp_path / "run")
    assert export_checkpoint(step, tmp_path / "back", check=False)["arch"] == kind
    with torch.no_grad():
        assert (hf_load(tmp_path / "back")(x).logits - want).abs().max().item() <= TOL


def test_import_of_a_moetron_moe_export(tmp_path):
    cfg = make_config(moe=MoEConfig(num_experts=4, top_k=2, layers="0", router=RouterConfig(expert_bias_rate=0.01)))
    model = make_model(cfg)
    export_checkpoint(save_checkpoint_model(model, cfg, tmp_path / "run"), tmp_path / "hf", check=False)
    back, back_cfg = import_folder(tmp_path / "hf")
    assert (back_cfg.moe.num_experts, back_cfg.moe.top_k, back_cfg.moe.layers) == (4, 2, "0")
    assert back_cfg.moe.router.expert_bias_rate == 0.01
    x = tokens()
    assert torch.equal(back.logits(x), model.logits(x))


def test_import_refuses_what_moetron_cannot_compute(tmp_path):
    hf = hf_model("gpt2")
    with torch.no_grad():
        hf.transformer.h[1].attn.c_attn.bias[3] = 0.5
    hf.save_pretrained(tmp_path / "biased")
    with pytest.raises(HFImportError, match="h.1.attn.c_attn has a non-zero bias"):
        import_folder(tmp_path / "biased")
    cases = {"llama": ({"model_type": "llama"}, "it normalises with RMSNorm"),
             "partial": ({"model_type": "stablelm", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                          "intermediate_size": 48, "max_position_embeddings": S, "vocab_size": V,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                              "partial_rotary_factor": 0.25}}, "partial_rotary_factor=0.25"),
             "bert": ({"model_type": "bert"}, "model_type=bert is unsupported")}
    for name, (config, words) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(HFImportError, match=words):
            import_folder(tmp_path / name)


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_moe_starts_as_the_dense_model(top_k, tmp_path):
    """A dense checkpoint upcycled by scripts/import_hf.py: every expert a copy of the dense MLP, the router fresh,
    the top-k gates renormalised: the MoE's logits are the dense model's, though tokens go to several experts;
    without renormalisation they are not. The written run trains on (resume=auto finds step-0)."""
    from train.checkpoint import Checkpointer
    from train.config import load_config
    from train.optim import build_optimizer
    cfg = make_config(position="rope", activation="swiglu", num_layers=3)
    dense = make_model(cfg)
    step = save_checkpoint_model(dense, cfg, tmp_path / "dense")
    assert run_script("import_hf", [str(step), str(tmp_path / "moe"), "--experts", "4", "--top-k", str(top_k),
                                    "--moe-layers", "0,2"]) == 0
    moe, moe_cfg, _ = load_checkpoint_model(tmp_path / "moe" / "checkpoints" / "step-0")
    assert (moe_cfg.moe.num_experts, moe_cfg.moe.top_k, moe_cfg.moe.router.renormalize) == (4, top_k, True)
    assert [i for i, b in enumerate(moe.blocks) if b.mlp in moe.moe_layers()] == [0, 2]
    for i in (0, 2):
        experts, mlp = moe.blocks[i].mlp.experts, dense.blocks[i].mlp
        for e in range(4):
            assert torch.equal(experts.w1[e], mlp.fc1.weight.t()) and torch.equal(experts.w2[e], mlp.fc2.weight.t())
            assert torch.equal(experts.w3[e], mlp.fc3.weight.t())
    x = tokens()
    assert (moe.logits(x) - dense.logits(x)).abs().max().item() <= 1e-5
    router = moe.blocks[0].mlp.router
    chosen = router(dense.blocks[0].ln2(dense.embed(x)).reshape(-1, 32)).expert_ids
    assert chosen.unique().numel() > 1  # a fresh router, not one that sends everything to one expert
    if top_k == 2:
        from interop.hf_import import upcycle
        plain, _ = upcycle(dense, cfg, 4, 2, renormalize=False)
        assert (plain.logits(x) - dense.logits(x)).abs().max().item() > 1e-3
    run = load_config(tmp_path / "moe" / "config.yaml")
    checkpointer = Checkpointer(Path(run.logging.run_dir) / "checkpoints", run.checkpoint, ParallelState(),
                                run.to_dict())
    found = checkpointer.resolve(run.checkpoint.resume)
    assert found is not None and found.name == "step-0"
    fresh = GPT(run.model, run.moe, V, S)
    assert checkpointer.load(found, fresh, build_optimizer(fresh, run.train))["step"] == 0
    assert torch.equal(fresh.logits(x), moe.logits(x))
