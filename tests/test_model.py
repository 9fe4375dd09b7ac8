"""GPT shapes, initial loss, and the reference MoE layer on a case worked by hand."""
import math

import pytest
import torch

from model.gpt import GPT
from moe.config import MoEConfig
from moe.layer import MoELayer
from train.config import load_config


def gelu_tanh(v: float) -> float:
    return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


@pytest.mark.parametrize("overrides", [
    [],
    ["model.position=rope", "model.activation=swiglu", "model.tie_embeddings=false"],
    ["moe.num_experts=0"],
    ["moe.layers=odd", "moe.top_k=1"],
])
def test_shapes_and_initial_loss(overrides):
    cfg = load_config("configs/tiny.yaml", overrides)
    torch.manual_seed(0)
    V, S = 512, 32
    model = GPT(cfg.model, cfg.moe, V, S)
    tokens = torch.randint(0, V, (3, S + 1))
    loss, parts = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.shape == () and set(parts) == {"lm_loss", "aux_loss", "z_loss"}
    assert parts["lm_loss"].item() == pytest.approx(math.log(V), abs=0.1)  # small init: near-uniform predictions
    expect_moe = len(cfg.moe.moe_layer_indices(cfg.model.num_layers))
    assert len(model.moe_layers()) == expect_moe
    if expect_moe:
        assert parts["aux_loss"].item() == pytest.approx(1.0, abs=0.3)  # about 1 when load is near balanced
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal():
    cfg = load_config("configs/tiny.yaml", ["moe.num_experts=0"])
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe, 64, 16)
    x = torch.randint(0, 64, (1, 16))
    emb = {}
    model.ln_f.register_forward_hook(lambda m, i, o: emb.__setitem__("h", o.detach().clone()))
    model(x, x)
    h1 = emb["h"]
    x2 = x.clone()
    x2[0, 10] = (x2[0, 10] + 1) % 64
    model(x2, x2)
    assert torch.equal(h1[0, :10], emb["h"][0, :10]) and not torch.equal(h1[0, 10:], emb["h"][0, 10:])


def test_attention_backends_give_the_same_loss_and_gradients():
    """model.attention_backend picks scaled_dot_product_attention's kernel (model/gpt.py SDPA_BACKENDS: every name
    the config accepts); on the CPU auto and flash run torch's CPU kernel, math the plain one: the same loss and
    gradients; cudnn alone has no CPU kernel, so it fails there (the key reaches the kernel choice). A name
    that is not a backend is a config error naming the choices."""
    from errors import ConfigError
    from model.config import ATTENTION_BACKENDS
    from model.gpt import SDPA_BACKENDS

    assert set(SDPA_BACKENDS) == set(ATTENTION_BACKENDS)
    tokens = torch.randint(0, 64, (2, 17))
    runs = {}
    for name in ("math", "auto", "flash"):
        cfg = load_config("configs/tiny.yaml", ["moe.num_experts=0", f"model.attention_backend={name}"])
        torch.manual_seed(0)
        model = GPT(cfg.model, cfg.moe, 64, 16)
        loss, _ = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        runs[name] = loss.detach(), model.blocks[0].attn.qkv.weight.grad
    for name in ("auto", "flash"):
        torch.testing.assert_close(runs[name], runs["math"], rtol=1e-5, atol=1e-6)
    cfg = load_config("configs/tiny.yaml", ["moe.num_experts=0", "model.attention_backend=cudnn"])
    with pytest.raises(RuntimeError):  # "No viable backend" (torch 2.13), "No available kernel" (older)
        GPT(cfg.model, cfg.moe, 64, 16)(tokens[:, :-1], tokens[:, 1:])
    with pytest.raises(ConfigError, match="model.attention_backend.*auto, cudnn"):
        load_config("configs/tiny.yaml", ["model.attention_backend=fast"])


def test_reference_moe_by_hand():
    """E=2, d=f=2, top-1. Expert e computes b_e * gelu(a_e * x) (diagonal weights); the router picks by sign."""
    cfg = MoEConfig(num_experts=2, top_k=1, backend="reference")
    layer = MoELayer(cfg, hidden_size=2, ffn_hidden_size=2, activation="gelu", init_std=0.02, output_std=0.02)
    a, b = [0.5, 2.0], [3.0, -1.0]
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # logits = x
        for e in range(2):
            layer.experts.w1[e] = a[e] * torch.eye(2)
            layer.experts.w2[e] = b[e] * torch.eye(2)
    x = torch.tensor([[[1.0, -1.0], [0.0, 2.0], [0.3, 0.2]]])  # [B=1, S=3, d=2]
    y, aux, z = layer(x)
    expected, probs_sum, counts = [], [0.0, 0.0], [0, 0]
    for t in x[0].tolist():
        den = sum(math.exp(v) for v in t)
        p = [math.exp(v) / den for v in t]
        e = 0 if p[0] >= p[1] else 1
        expected.append([p[e] * b[e] * gelu_tanh(a[e] * v) for v in t])
        counts[e] += 1
        probs_sum = [s + q for s, q in zip(probs_sum, p)]
    torch.testing.assert_close(y[0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    aux_by_hand = 2 * sum(c / 3 * s / 3 for c, s in zip(counts, probs_sum))
    z_by_hand = sum(math.log(sum(math.exp(v) for v in t)) ** 2 for t in x[0].tolist()) / 3
    assert aux.item() == pytest.approx(aux_by_hand, rel=1e-5)
    assert z.item() == pytest.approx(z_by_hand, rel=1e-5)
    m = layer.stats.reduce_and_reset()
    assert m["moe/0/tokens_max"] == max(counts) and m["moe/0/dropped_frac"] == 0
    assert m["moe/0/tokens_per_expert"] == counts == [2, 1]  # exact ints, per expert
    layer(x), layer(x)  # the per-expert counts sum over the interval's calls, and the read clears them
    assert layer.stats.reduce_and_reset()["moe/0/tokens_per_expert"] == [4, 2]


@pytest.mark.parametrize("backend", ["reference", "grouped", "padded"])
def test_bf16_on_cpu_trains(backend):
    """train.dtype=bf16 on the CPU (autocast) for every backend that runs there: finite loss and gradients.
    (The Triton backends on the CPU run only under the interpreter, which refuses bf16: train/plan.py.)"""
    cfg = load_config("configs/tiny.yaml", [f"moe.backend={backend}", "moe.capacity.factor=1.0"])
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe, 128, 32)
    tokens = torch.randint(0, 128, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
