"""Router: top-k, renormalisation, jitter, load-balance loss (micro-batch and global), z-loss, expert bias,
the statistics it records, config validation."""
import math

import pytest
import torch

import moe.stats as stats_mod
from conftest import interpreted
from errors import ConfigError
from model.config import ModelConfig
from model.gpt import GPT
from moe.config import CapacityConfig, MoEConfig, RouterConfig
from moe.layer import MoELayer
from moe.router import TopKRouter, load_balance_loss, sinkhorn, top_k, z_loss
from moe.stats import MoEStats
from parallel.state import ParallelState

D = 8


def router(E=4, k=2, **kw):
    cfg = MoEConfig(num_experts=E, top_k=k, router=RouterConfig(**kw))
    cfg.validate()
    torch.manual_seed(0)
    return TopKRouter(E, k, cfg.router, D, 0.5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_weights_are_probabilities_in_fp32(k):
    r = router(4, k)
    x = torch.randn(6, D, dtype=torch.bfloat16)
    out = r(x)
    assert out.probs.dtype == torch.float32 and out.expert_ids.shape == (6, k)
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.expert_ids))
    assert torch.all(out.weights[:, :-1] >= out.weights[:, 1:])  # descending
    assert out.counts.sum().item() == 6 * k


def test_renormalize():
    out = router(4, 2, renormalize=True)(torch.randn(5, D))
    torch.testing.assert_close(out.weights.sum(1), torch.ones(5))


@pytest.mark.parametrize("k", [1, 2])
def test_straight_through_gate_has_renormalised_values_and_the_probabilities_gradient(k):
    """The value of renormalize (top-1: exactly 1), the gradient of the plain probabilities: for top-1 the plain
    renormalised weight p/p has no gradient, so the router would learn nothing from the LM loss."""
    x, g = torch.randn(6, D), torch.randn(6, k)  # g: an upstream gradient of the combine weights
    weights, grads = {}, {}
    for name, kw in [("plain", {}), ("renorm", {"renormalize": True}),
                     ("st", {"renormalize": True, "straight_through": True})]:
        r = router(4, k, **kw)
        weights[name] = r(x).weights
        (weights[name] * g).sum().backward()
        grads[name] = r.weight.grad
    torch.testing.assert_close(weights["st"], weights["renorm"])
    if k == 1:
        torch.testing.assert_close(weights["st"], torch.ones(6, 1))
    torch.testing.assert_close(grads["st"], grads["plain"])
    if k == 1:
        assert grads["renorm"].abs().max() < 1e-6 < grads["plain"].abs().max()


def test_jitter_only_in_training():
    r = router(jitter_eps=0.5)
    x = torch.randn(5, D)
    r.eval()
    torch.testing.assert_close(r(x).probs, torch.softmax(x @ r.weight.t(), -1))
    r.train()
    assert not torch.allclose(r(x).probs, torch.softmax(x @ r.weight.t(), -1))


def test_load_balance_and_z_loss_values():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    assert load_balance_loss(uniform, torch.tensor([4, 4, 4, 4])).item() == pytest.approx(1.0)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    # f = [1, 0, 0, 0], P = [.7, .1, .1, .1] -> 4 * .7
    assert load_balance_loss(probs, torch.tensor([2, 0, 0, 0])).item() == pytest.approx(2.8)
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expect = (torch.log(torch.tensor(2.0)) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expect.item())


def test_global_aux_scope_accumulates_over_micro_batches_and_group(monkeypatch):
    calls = []

    def fake_all_reduce(t, group=None):  # two data-parallel ranks with identical counts
        calls.append(group)
        return t.mul_(2)

    monkeypatch.setattr(stats_mod, "all_reduce_sum", fake_all_reduce)
    cfg = MoEConfig(num_experts=4, top_k=1, router=RouterConfig(aux_loss_scope="global"))
    torch.manual_seed(0)
    layer = MoELayer(cfg, D, 16, "gelu", 0.5, 0.5, ParallelState(dp_group="dp-group"))
    x1, x2 = torch.randn(1, 6, D), torch.randn(1, 5, D)
    layer.eval()  # the routing of each micro-batch, without accumulating
    out1, out2 = layer.router(x1[0]), layer.router(x2[0])
    layer.train()
    _, aux1, _ = layer(x1)
    _, aux2, _ = layer(x2)
    assert calls == ["dp-group", "dp-group"]  # the layer's statistics got the group it was built with
    total = 2 * (out1.counts + out2.counts)  # both micro-batches, both ranks
    torch.testing.assert_close(aux1, load_balance_loss(out1.probs, 2 * out1.counts))
    torch.testing.assert_close(aux2, load_balance_loss(out2.probs, total))
    layer.stats.end_step()
    assert layer.stats.global_counts.sum() == 0 and layer.stats.step_counts.sum() == 0


def test_micro_batch_scope_uses_this_call_only():
    r = router(4, 2)
    r.train()
    x = torch.randn(7, D)
    r(torch.randn(5, D))
    out = r(x)
    torch.testing.assert_close(out.aux_loss, load_balance_loss(out.probs, out.counts))


def test_expert_bias_moves_load_and_leaves_weights_unbiased():
    """The GPT's end_step moves each router's bias against the step's loads recorded in the model's stats."""
    cfg = MoEConfig(num_experts=4, top_k=1, router=RouterConfig(expert_bias_rate=0.01, aux_loss_weight=0.0))
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=1, hidden_size=D, num_heads=2), cfg, 50, 64)
    layer = model.moe_layers()[0]
    with torch.no_grad():
        layer.router.weight[3] += 0.2  # a skewed router: one expert takes most tokens
    x = torch.randn(64, D).abs()
    loads = []
    for _ in range(40):
        out = layer.router(x, model.moe_stats, 0)
        torch.testing.assert_close(out.weights, out.probs.gather(1, out.expert_ids))  # unbiased weights
        loads.append(out.counts.float())
        model.end_step(applied=True)
    busiest = loads[0].argmax()
    late = torch.stack(loads[-10:]).mean(0)
    assert late[busiest] < 0.6 * loads[0][busiest]  # the overloaded expert sheds load
    assert late.max() / late.mean() < 0.5 * loads[0].max() / loads[0].mean()  # balance improves
    assert layer.router.expert_bias[busiest] == layer.router.expert_bias.min() < 0
    assert "router.expert_bias" in layer.state_dict()


def test_metrics_accumulate_over_calls_and_skip_eval():
    cfg = MoEConfig(num_experts=4, top_k=2, router=RouterConfig(expert_bias_rate=1e-3))
    layer = MoELayer(cfg, D, 16, "gelu", 0.5, 0.5)
    layer.router.expert_bias.copy_(torch.tensor([10.0, 5.0, 0, 0]))  # every token on experts 0 and 1
    layer(torch.randn(1, 6, D))  # counts [6, 6, 0, 0]
    layer.router.expert_bias.copy_(torch.tensor([10.0, 0, 5.0, 5.0]))
    layer(torch.randn(1, 2, D))  # expert 0 gets 2, experts 2/3 share 2
    layer.eval()
    layer(torch.randn(1, 9, D))  # not counted
    m = {k.split("/")[-1]: v for k, v in layer.stats.reduce_and_reset().items()}
    assert m["tokens_max"] == pytest.approx((6 + 2) / 2)
    assert m["tokens_mean"] == pytest.approx((3 + 1) / 2)
    assert m["idle_frac"] >= 0.5 / 2
    assert m["dropped_frac"] == 0 and m["aux_loss"] > 0
    assert set(m) >= {"tokens_max", "tokens_mean", "max_over_mean", "idle_frac", "dropped_frac", "aux_loss",
                      "z_loss"}


@pytest.mark.parametrize("overrides,key", [
    ({"top_k": 5}, "moe.top_k"),
    ({"router": RouterConfig(aux_loss_scope="batch")}, "moe.router.aux_loss_scope"),
    ({"router": RouterConfig(type="sparsemixer"), "top_k": 3}, "moe.top_k"),
    ({"router": RouterConfig(type="sparsemixer")}, "moe.router.jitter_eps"),
    ({"router": RouterConfig(type="sparsemixer", jitter_eps=0.1, renormalize=True)}, "moe.router.renormalize"),
    ({"capacity": CapacityConfig(rectify_fill=True)}, "moe.capacity.rectify_intra"),
    ({"backend": "padded", "capacity": CapacityConfig(drop_policy="random")}, "moe.capacity.drop_policy"),
    ({"backend": "padded", "capacity": CapacityConfig(scope="rank")}, "moe.capacity.scope"),
    ({"backend": "padded", "capacity": CapacityConfig(rectify_intra_capped=True)},
     "moe.capacity.rectify_intra_capped"),
    ({"backend": "nope"}, "moe.backend"),
    ({"router": RouterConfig(sinkhorn_iters=-1)}, "moe.router.sinkhorn_iters"),
    ({"router": RouterConfig(sinkhorn_iters=30, sinkhorn_sharpness=0)}, "moe.router.sinkhorn_sharpness"),
    ({"router": RouterConfig(straight_through=True)}, "moe.router.straight_through"),
    ({"router": RouterConfig(sinkhorn_iters=3, expert_bias_rate=1e-3)}, "moe.router.sinkhorn_iters"),
    ({"router": RouterConfig(type="sparsemixer", jitter_eps=0.1, sinkhorn_iters=3), "top_k": 1},
     "moe.router.sinkhorn_iters"),
])
def test_config_errors_name_the_key(overrides, key):
    cfg = MoEConfig(num_experts=4, **overrides)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.key == key


def test_stats_is_one_object_per_model():
    """Every MoE layer of a GPT records into the model's one MoEStats, at its own row."""
    cfg = MoEConfig(num_experts=4, top_k=1)
    model = GPT(ModelConfig(num_layers=3, hidden_size=D, num_heads=2), cfg, 50, 8)
    layers = model.moe_layers()
    assert all(layer.stats is model.moe_stats for layer in layers) and [m.index for m in layers] == [0, 1, 2]
    assert isinstance(model.moe_stats, MoEStats) and model.moe_stats.num_layers == 3
    tokens = torch.randint(0, 50, (2, 8))
    model(tokens, tokens)
    read = model.moe_stats.reduce_and_reset()
    assert {f"moe/{i}/tokens_mean" for i in range(3)} <= set(read)
    assert all(read[f"moe/{i}/tokens_mean"] == 16 / 4 for i in range(3))


def test_rectify_router_is_accepted_under_expert_parallelism():
    from train.config import load_config

    cfg = load_config(None, ["model.num_heads=4", "model.hidden_size=32", "moe.num_experts=4", "moe.backend=padded",
                             "moe.capacity.rectify_intra=true", "moe.capacity.rectify_fill=true",
                             "moe.capacity.drop_policy=bpr", "parallel.expert=2", "train.micro_batch_size=1",
                             "train.global_batch_size=2"], world_size=2)
    assert cfg.moe.capacity.rectify and cfg.parallel.expert == 2


@pytest.mark.parametrize("T,E,iters", [(300, 8, 1), (1000, 16, 30), (1, 4, 3)])
def test_sinkhorn_equals_the_scaling_vector_iteration(T, E, iters):
    """The matrix iteration of moe/router.py against the same transport computed another way: only the row and
    column scaling vectors are iterated (the assignment is log_k + row + col); after the last row step every row
    sums to 1, and once converged every column to T/E."""
    logits = torch.randn(T, E) * 2
    log_k = logits.clone()
    if T > 1:
        log_k = log_k * (12.0 / (log_k - log_k.mean(0, keepdim=True)).std())
    row, col = torch.zeros(T, 1), torch.zeros(1, E)
    for _ in range(iters):
        col = math.log(T / E) - torch.logsumexp(log_k + row, dim=0, keepdim=True)
        row = -torch.logsumexp(log_k + col, dim=1, keepdim=True)
    log_a = log_k + row + col
    got = sinkhorn(logits, iters, 12.0)
    torch.testing.assert_close(got, log_a, rtol=1e-5, atol=1e-4)  # fp32 rounding of values up to ~40
    torch.testing.assert_close(got.exp().sum(1), torch.ones(T))
    if iters == 30:
        torch.testing.assert_close(got.exp().sum(0), torch.full((E,), T / E), rtol=0.02, atol=0)


@interpreted
@pytest.mark.parametrize("T,E,iters", [(37, 5, 30), (300, 64, 3), (129, 16, 1), (1, 4, 3), (64, 3, 30)])
def test_sinkhorn_kernel_equals_the_matrix_iteration(T, E, iters):
    """The one-launch-per-round kernel (potentials, partial column statistics per band of rows) against the torch
    loop on fresh logits: rows that are not a multiple of the kernel's tile, experts that are not a power of two,
    one token, one round; then the same with an offset shared by every token, larger than their spread (at
    initialisation, moe/router.py's docstring)."""
    logits = torch.randn(T, E) * 2
    ref = sinkhorn(logits, iters, 12.0, kernel=False)
    got = sinkhorn(logits, iters, 12.0, kernel=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-4)  # both fp32; the loop rounds at each rewrite
    picked = ref.gather(1, got.argmax(1)[:, None])[:, 0]  # the kernel's pick is the loop's, up to near-ties
    assert torch.all(picked >= ref.amax(1) - 1e-3)
    shared = 2 * torch.randn(1, E) + 0.1 * torch.randn(T, E)
    torch.testing.assert_close(sinkhorn(shared, iters, 12.0, kernel=True),
                               sinkhorn(shared, iters, 12.0, kernel=False), rtol=1e-5, atol=1e-3)


@interpreted
@pytest.mark.parametrize("T,E", [(300, 16), (5, 1), (3, 64)])
def test_sinkhorn_kernel_balances_an_expert_every_token_avoids(T, E):
    """One expert 50 spreads below the rest for every token: exp of its scaled scores underflows in fp32, which
    the kernel's first launch (a running maximum per column) must survive before its later rounds drop the
    maximum. The result is the loop's, and finite; also one expert, and fewer tokens than experts."""
    logits = torch.randn(T, E)
    logits[:, E // 2] -= 50
    got = sinkhorn(logits, 30, 12.0, kernel=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, sinkhorn(logits, 30, 12.0, kernel=False), rtol=1e-5, atol=1e-3)
    starved = got[:, E // 2].exp().sum()  # the avoided expert gets its share of the balanced assignment
    torch.testing.assert_close(starved, torch.tensor(T / E), rtol=0.05, atol=0)


@interpreted
def test_sinkhorn_kernel_edge_cases():
    from moe.kernels.sinkhorn import MAX_EXPERTS, sinkhorn_rounds

    assert sinkhorn_rounds(torch.zeros(0, 8), torch.ones(1), 3).shape == (0, 8)
    with pytest.raises(ValueError, match="iters >= 1"):
        sinkhorn_rounds(torch.zeros(4, 8), torch.ones(1), 0)
    with pytest.raises(ValueError, match=f"at most {MAX_EXPERTS} experts"):
        sinkhorn_rounds(torch.zeros(4, MAX_EXPERTS + 1), torch.ones(1), 1)


def test_sinkhorn_balances_the_argmax_of_clustered_tokens_only_when_sharp():
    """Mid-training, many tokens have nearly the same logits (similar contexts). Sinkhorn balances the soft
    assignment; at a soft scale (spread 3) its argmax still sends each cluster to one expert, however many rounds
    (converged: 10 and 30 rounds agree), while a sharp one (12) balances the argmax: the cause of the loads of
    4-7x the mean seen on moe_xs between steps 50 and 200 with spread 3."""
    T, E, d = 4096, 64, 64
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, d, generator=g) * 2
    x = centres[torch.randint(0, 8, (T,), generator=g)] + 0.3 * torch.randn(T, d, generator=g)
    logits = x @ torch.randn(d, E, generator=g) * 0.05

    def max_over_mean(iters, sharpness):
        counts = torch.bincount(sinkhorn(logits, iters, sharpness).argmax(-1), minlength=E).float()
        return (counts.max() / counts.mean()).item()

    soft10, soft30 = max_over_mean(10, 3.0), max_over_mean(30, 3.0)
    assert soft10 > 3 and abs(soft10 - soft30) < 0.1  # 3.42 both: converged, and unbalanced
    assert max_over_mean(30, 12.0) < 1.5  # 1.23


def test_router_is_fp32_under_bf16_autocast():
    """Autocast would run the router's matmul in bf16 (ties and rounding in the top-k); it stays fp32."""
    r = router(8, 1)
    x = torch.randn(64, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, x @ r.weight.t())


def init_loads(sinkhorn_iters: int) -> list[float]:
    """max/mean assignments per expert of each MoE layer at initialisation: 12 layers, 64 experts top-1, the
    paper recipe's init_std 0.01, one forward of 8 x 512 Zipf-distributed tokens (natural text's frequencies:
    the top token is ~15% of them)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=64, top_k=1, ffn_hidden_size=16,
                    router=RouterConfig(aux_loss_weight=0.1, sinkhorn_iters=sinkhorn_iters))
    model = GPT(ModelConfig(num_layers=12, hidden_size=128, num_heads=4, init_std=0.01), cfg, 512, 512).train()
    zipf = 1 / torch.arange(1, 513).float()
    tokens = torch.multinomial(zipf / zipf.sum(), 8 * 513, replacement=True,
                               generator=torch.Generator().manual_seed(0)).view(8, 513)
    with torch.no_grad():
        model(tokens[:, :-1], tokens[:, 1:])
    m = model.moe_stats.reduce_and_reset()
    return [m[f"moe/{i}/max_over_mean"] for i in range(12)]


def test_plain_top1_is_unbalanced_at_init_and_sinkhorn_balances_from_step_1():
    """The cause: at initialisation the router's input is dominated by what all tokens share (frequent tokens at
    the first layer; the prefix means that uniform attention adds, growing with depth) and plain top-1 sends a
    multiple of the mean load to one expert; picking on the Sinkhorn-balanced assignment holds every layer near
    the mean from the first step."""
    plain = init_loads(0)
    assert max(plain) > 3.5  # 4.98 (frequent tokens, layer 0) and 3.94 (deepest layer) here
    balanced = init_loads(30)
    assert max(balanced) < 1.6, balanced  # ~1.3; multinomial noise alone gives ~1.25 at 64 tokens per expert


def test_sinkhorn_cancels_an_offset_shared_by_all_tokens():
    """Logits = per-token part + the same per-expert offset for every token (what a shared input direction
    gives): plain top-1 sends every token to the offset's best expert, the Sinkhorn pick spreads them; the
    weights stay the softmax probabilities of the chosen experts; evaluation takes the plain top-1."""
    T, E = 4096, 16
    torch.manual_seed(0)
    offset = torch.zeros(E)
    offset[5] = 2.0
    logits = torch.randn(T, E) * 0.3 + offset
    assert torch.bincount(logits.argmax(-1), minlength=E).max() > 0.9 * T
    counts = torch.bincount(sinkhorn(logits, 30, 12.0).argmax(-1), minlength=E).float()
    assert counts.max() / counts.mean() < 1.5
    r = router(E, 1, sinkhorn_iters=30)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D) * 0.1)
        r.weight[5] += 0.5  # expert 5 leans towards the direction every input shares
    x = torch.randn(T, D) * 0.1 + 1.0
    out = r(x)
    assert out.counts.max() / out.counts.float().mean() < 1.5
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.expert_ids))
    r.eval()
    assert r(x).counts.max() > 0.9 * T


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_equals_torch_topk_with_its_gradient(k):
    """The router's pick (a max for k = 1) gives torch.topk's values, indices and gradient on fresh scores."""
    x = torch.randn(257, 16, requires_grad=True)
    values, ids = top_k(x, k)
    want_values, want_ids = torch.topk(x, k, dim=-1)
    assert ids.shape == (257, k) and torch.equal(ids, want_ids)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    g = torch.randn(257, k)
    (got,) = torch.autograd.grad(values, x, g)
    (want,) = torch.autograd.grad(want_values, x, g)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
