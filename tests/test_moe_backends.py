"""Expert backends against the reference: forward and gradients (input, expert weights, router), edge cases,
padded capacity and drop accounting, backend switching in a whole model."""
import dataclasses
import math

import pytest
import torch

from conftest import interpreted
from moe.capacity import capacity
from moe.config import CapacityConfig, MoEConfig, RouterConfig
from moe.experts import backend_class
from moe.layer import MoELayer
from moe_helpers import make_routing, run_experts

D, F = 16, 24
# (backend, extra config): every one of these must equal the reference exactly (dropless)
DROPLESS = [("grouped", {}), ("padded", {"capacity": CapacityConfig(factor=0.0)}),
            ("padded", {"capacity": CapacityConfig(factor=64.0)})]


def make_layer(backend, E, k, activation="swiglu", **kw):
    cfg = MoEConfig(num_experts=E, top_k=k, backend=backend, **kw)
    cfg.validate()
    torch.manual_seed(1)
    return MoELayer(cfg, D, F, activation, 0.2, 0.2).double()


def run(layer, x, bias=None):
    """Forward + backward of a fixed random projection of y plus the aux loss; returns output and grads."""
    if bias is not None:
        layer.router.expert_bias.copy_(bias)
    x = x.clone().requires_grad_(True)
    y, aux, z = layer(x)
    torch.manual_seed(7)
    (y * torch.randn_like(y)).sum().add(aux + z).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


# (E, k, B, S, bias on the router choice) covering the edge cases
CASES = [
    (4, 2, 3, 5, None),  # random
    (8, 1, 2, 7, None),  # T = 14, not a multiple of anything
    (4, 2, 1, 9, [0.0, 0.0, 0.0, -10.0]),  # expert 3 gets no tokens
    (4, 1, 2, 6, [10.0, 0.0, 0.0, 0.0]),  # all tokens on expert 0
    (3, 3, 2, 4, None),  # k = E
    (1, 1, 2, 3, None),  # E = 1
    (4, 2, 1, 1, None),  # T = 1
]


@pytest.mark.parametrize("backend,kw", DROPLESS, ids=["grouped", "padded-cf0", "padded-bigcf"])
@pytest.mark.parametrize("E,k,B,S,bias", CASES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_backend_matches_reference(backend, kw, E, k, B, S, bias, activation):
    # the expert bias changes the choice only (expert_bias_rate > 0 turns it on; no update happens here)
    extra = {"router": RouterConfig(expert_bias_rate=1e-3)} if bias is not None else {}
    ref, other = make_layer("reference", E, k, activation, **extra), make_layer(backend, E, k, activation,
                                                                                **extra, **kw)
    other.load_state_dict(ref.state_dict())
    torch.manual_seed(3)
    x = torch.randn(B, S, D, dtype=torch.float64)
    b = torch.tensor(bias, dtype=torch.float64) if bias is not None else None
    y0, gx0, g0 = run(ref, x, b)
    y1, gx1, g1 = run(other, x, b)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    assert g0.keys() == g1.keys() and "router.weight" in g0 and "experts.w1" in g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)
    assert other.stats.reduce_and_reset()["moe/0/dropped_frac"] == 0


def test_same_state_dict_keys_in_every_backend():
    keys = {b: sorted(make_layer(b, 4, 2).state_dict()) for b in ("reference", "padded", "grouped")}
    assert keys["reference"] == keys["padded"] == keys["grouped"]
    assert keys["reference"] == ["experts.w1", "experts.w2", "experts.w3", "router.expert_bias", "router.weight"]


def test_switching_backend_of_a_model_gives_same_loss():
    from model.config import ModelConfig
    from model.gpt import GPT
    mcfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, activation="swiglu")
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (2, 9))
    losses = {}
    state = None
    for backend, kw in [("reference", {})] + DROPLESS:
        torch.manual_seed(0)
        model = GPT(mcfg, MoEConfig(num_experts=4, top_k=2, backend=backend, **kw), 50, 16)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        losses[backend + str(kw)] = model(tokens[:, :-1], tokens[:, 1:])[0].item()
    ref = losses.pop("reference{}")
    for name, loss in losses.items():
        assert math.isclose(loss, ref, rel_tol=1e-5), name  # fp32: summation order differs


# ---- padded capacity and drops ----

def padded(E, **kw):
    cfg = CapacityConfig(min=1, **kw)
    cfg.validate()
    torch.manual_seed(0)
    return cfg, backend_class("padded")(E, D, F, "gelu", 0.2, 0.2).double()


def hand_routing(ids, probs):
    ids, probs = torch.tensor(ids), torch.tensor(probs, dtype=torch.float64)
    return make_routing(ids, probs.gather(1, ids), probs.shape[1], probs, probs.log())


def padded_forward(cfg, experts, x, routing):
    """The capacity step, then the padded experts through the local dispatcher: (y, dropped count)."""
    return run_experts(experts, x, routing, cfg)


def expected(experts, x, routing, keep):
    """Reference output with the dropped assignments removed."""
    ref = backend_class("reference")(experts.num_experts, D, F, "gelu", 0.2, 0.2).double()
    ref.load_state_dict(experts.state_dict())
    r = hand_routing(routing.expert_ids.tolist(), routing.probs.tolist())
    r.weights = r.weights * torch.tensor(keep, dtype=torch.float64)
    return run_experts(ref, x, r)


def test_capacity_formula():
    counts = torch.tensor([9, 1, 0, 0])
    cfg = CapacityConfig(factor=1.25, min=1)
    assert capacity(cfg, 5, 2, counts) == 4  # ceil(1.25*2*5/4) = 4 (>= min 1)
    assert capacity(cfg, 100, 2, counts) == 63  # ceil(62.5)
    assert capacity(cfg, 2, 2, counts) == 2  # at most T
    cfg.min = 8
    assert capacity(cfg, 5, 2, counts) == 5  # min 8, then capped at T = 5
    cfg.factor = 0
    assert capacity(cfg, 5, 2, counts) == 9  # dynamic: the largest load


# T=3, E=3, k=2, cf=1: C = ceil(2*3/3) = 2. Expert 0 receives (t0, slot 0, p .5), (t1, slot 1, p .35),
# (t2, slot 1, p .4); the other experts stay under capacity.
IDS = [[0, 1], [1, 0], [2, 0]]
PROBS = [[0.5, 0.3, 0.2], [0.35, 0.45, 0.2], [0.4, 0.1, 0.5]]


# The same ids; t1's second choice (e0, p .45) beats t2's (e0, p .3), but t2's top probability (.6) beats t1's (.5).
PROBS_BPR = [[0.5, 0.3, 0.2], [0.45, 0.5, 0.05], [0.3, 0.1, 0.6]]


@pytest.mark.parametrize("policy,probs,keep", [
    ("position", PROBS, [[1, 1], [1, 1], [1, 0]]),  # first choices first, then token order: (t2, slot 1) dropped
    ("probability", PROBS, [[1, 1], [1, 0], [1, 1]]),  # second choices p .35 < .4: (t1, slot 1) dropped
    ("bpr", PROBS, [[1, 1], [1, 0], [1, 1]]),  # second choices by top p: .45 < .5: (t1, slot 1) dropped
    ("position", PROBS_BPR, [[1, 1], [1, 1], [1, 0]]),
    ("probability", PROBS_BPR, [[1, 1], [1, 1], [1, 0]]),  # .3 < .45: (t2, slot 1) dropped
    ("bpr", PROBS_BPR, [[1, 1], [1, 0], [1, 1]]),  # V-MoE: top p .5 < .6: (t1, slot 1) dropped
])
def test_drop_accounting_hand_worked(policy, probs, keep):
    cfg, e = padded(3, factor=1.0, drop_policy=policy)
    routing = hand_routing(IDS, probs)
    x = torch.randn(3, D, dtype=torch.float64)
    y, num_dropped = padded_forward(cfg, e, x, routing)
    assert num_dropped.item() == 1
    torch.testing.assert_close(y, expected(e, x, routing, keep))


@pytest.mark.parametrize("policy", ["position", "bpr", "probability"])
def test_a_first_choice_is_never_dropped_for_another_tokens_second(policy):
    # T=2, E=4, k=2, cf=.5: C = 1. e0 gets t0's first choice (p .3) and t1's second (p .4, top .45): every policy
    # keeps the first choice (V-MoE's BPR and GShard alike), so (t1, slot 1) is the one dropped
    cfg, e = padded(4, factor=0.5, drop_policy=policy)
    routing = hand_routing([[0, 1], [2, 0]], [[0.3, 0.25, 0.25, 0.2], [0.4, 0.05, 0.45, 0.1]])
    x = torch.randn(2, D, dtype=torch.float64)
    y, num_dropped = padded_forward(cfg, e, x, routing)
    assert num_dropped.item() == 1
    torch.testing.assert_close(y, expected(e, x, routing, [[1, 1], [1, 0]]))


def test_first_choices_before_second_choices_k1_and_all_dropped_token():
    # k=1, E=2, T=4, cf=1: C=2; expert 0 gets t0, t1, t2 -> t2 dropped and its output is exactly 0
    cfg, e = padded(2, factor=1.0)
    routing = hand_routing([[0], [0], [0], [1]], [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    y, num_dropped = padded_forward(cfg, e, x, routing)
    assert num_dropped.item() == 1 and torch.all(y[2] == 0) and y[0].abs().sum() > 0
    y.sum().backward()
    assert torch.all(x.grad[2] == 0)
    for policy in ("probability", "bpr"):  # t0 (p .6) is now the lowest
        cfg.drop_policy = policy
        y, _ = padded_forward(cfg, e, x, routing)
        assert torch.all(y[0] == 0) and y[2].abs().sum() > 0


def test_layer_reports_dropped_fraction():
    layer = make_layer("padded", 4, 1, capacity=CapacityConfig(factor=1.0, min=1),
                       router=RouterConfig(expert_bias_rate=1e-3))
    layer.router.expert_bias.copy_(torch.tensor([10.0, 0, 0, 0]))  # all 8 tokens on expert 0
    layer(torch.randn(1, 8, D, dtype=torch.float64))
    m = {k.split("/")[-1]: v for k, v in layer.stats.reduce_and_reset().items()}
    # C = ceil(1*1*8/4) = 2 kept of 8
    assert m["dropped_frac"] == pytest.approx(6 / 8)
    assert m["tokens_max"] == 8 and m["tokens_mean"] == 2 and m["idle_frac"] == 0.75
    assert m["max_over_mean"] == 4
    assert layer.stats.reduce_and_reset()["moe/0/dropped_frac"] == 0  # reset by the read


@pytest.mark.parametrize("backend,kw", [("reference", {})] + DROPLESS, ids=["reference", "grouped", "padded-cf0",
                                                                            "padded-bigcf"])
def test_no_tokens(backend, kw):
    """A rank that holds no tokens (expert parallelism) gets an empty output, and backward still runs."""
    layer = make_layer(backend, 4, 2, **kw)
    x = torch.zeros(0, 3, D, dtype=torch.float64, requires_grad=True)
    y, aux, z = layer(x)
    assert y.shape == (0, 3, D)
    (y.sum() + 0 * aux.nan_to_num() + 0 * z.nan_to_num()).backward()
    assert x.grad.shape == x.shape


def test_skipped_step_clears_counts_without_moving_bias():
    from model.config import ModelConfig
    from model.gpt import GPT
    moe_cfg = MoEConfig(num_experts=4, top_k=1, router=RouterConfig(expert_bias_rate=0.1, aux_loss_scope="global"))
    model = GPT(ModelConfig(num_layers=1, hidden_size=D, num_heads=2), moe_cfg, 50, 8)
    tokens = torch.randint(0, 50, (2, 5))
    model(tokens, tokens)
    stats, bias = model.moe_stats, model.moe_layers()[0].router.expert_bias
    assert stats.step_counts.sum() == 10 and stats.global_counts.sum() == 10
    model.end_step(applied=False)
    assert stats.step_counts.sum() == 0 and stats.global_counts.sum() == 0
    assert torch.count_nonzero(bias) == 0
    model(tokens, tokens)
    model.end_step(applied=True)
    assert torch.count_nonzero(bias) > 0


@pytest.mark.parametrize("ids", [
    torch.randint(0, 7, (50, 2)),  # random, some experts likely empty
    torch.full((20, 1), 3),  # all assignments on one expert
    torch.tensor([[6, 0], [0, 6], [6, 0]]),  # only the first and last experts
    torch.zeros((0, 2), dtype=torch.int64),  # no tokens
    torch.randint(0, 7, (1234, 1), generator=torch.Generator().manual_seed(1)),  # many blocks, a ragged last one
], ids=["random", "one_expert", "ends_only", "empty", "many_blocks"])
@pytest.mark.parametrize("impl", ["torch", pytest.param("counting", marks=interpreted)])
def test_sort_by_expert_is_a_stable_counting_sort(ids, impl):
    """torch.sort's path (CPU, or many experts) and the Triton counting sort (the GPU's, here interpreted)."""
    from moe.kernels.sort import Sorted, counting_sort, sort_by_expert

    E, flat = 7, ids.reshape(-1)
    s = sort_by_expert(ids, E) if impl == "torch" else Sorted(*counting_sort(flat, E, torch.int16))
    ref_order = torch.sort(flat, stable=True).indices  # int64 keys: the plain definition
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(s.order, ref_order)
    assert torch.equal(s.expert_of.long(), flat[ref_order])
    assert s.counts.dtype == s.offsets.dtype == torch.int64
    assert torch.equal(s.counts, counts) and torch.equal(s.offsets, torch.cumsum(counts, 0))


@interpreted
@pytest.mark.parametrize("T,k", [(13, 2), (9, 1), (5, 3)])
def test_gated_combine_kernel_equals_the_torch_combine(T, k):
    """The dispatcher's one-pass combine (the GPU's; Triton, here interpreted) against the torch path: output,
    the rows' gradient and the gates' gradient."""
    from moe.dispatch import GatedCombine, LocalDispatcher

    torch.manual_seed(T)
    E, d = 4, 20
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w0, y0 = torch.rand(T, k), torch.randn(T * k, d)
    routing = make_routing(ids, w0, E)
    _, handle = LocalDispatcher().dispatch(torch.randn(T, d), routing)
    dout = torch.randn(T, d)
    results = []
    for fused in (False, True):
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        h = handle._replace(weights=w)
        out = GatedCombine.apply(y, h.sort.order, w) if fused else LocalDispatcher().combine(y, h)
        out.backward(dout)
        results.append((out.detach(), y.grad, w.grad))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "grouped", "padded", pytest.param("scatter", marks=interpreted),
                                     pytest.param("blocksparse", marks=interpreted)])
def test_bad_inputs_are_refused_at_the_boundary(backend):
    """What the router never produces but a caller can: rows of the wrong width, expert ids out of range or of
    the wrong dtype. Each a clear error, before any kernel runs."""
    from moe.config import KernelConfig
    from moe.dispatch import LocalDispatcher
    from moe.experts import build_experts
    from moe.layer import run_experts as layer_run

    cfg = MoEConfig(num_experts=4, top_k=2, backend=backend, capacity=CapacityConfig(factor=1.0),
                    kernels=KernelConfig(block_size=16))
    experts = build_experts(cfg, D, 32, "gelu", 0.2, 0.2)
    capacity = cfg.capacity if backend == "padded" else None
    ids = torch.tensor([[0, 1], [2, 3], [1, 0]])

    def run(x, expert_ids):  # the routing record of good ids, then the ids swapped in
        routing = dataclasses.replace(make_routing(ids, torch.rand(3, 2), 4), expert_ids=expert_ids)
        return layer_run(LocalDispatcher(), experts, x, routing, capacity)

    run(torch.randn(3, D), ids)  # the good case runs
    with pytest.raises(ValueError, match=rf"rows of shape \(3, {D + 1}\)"):
        run(torch.randn(3, D + 1), ids)
    with pytest.raises(ValueError, match=r"expert ids in \[0, 4\], outside \[0, 4\)"):
        run(torch.randn(3, D), torch.where(ids == 3, 4, ids))
    with pytest.raises(ValueError, match=r"expected \[tokens, k\] int64"):
        run(torch.randn(3, D), ids.int())
