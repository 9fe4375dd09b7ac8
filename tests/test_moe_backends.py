"""Expert backends against the reference: forward and gradients (input, expert weights, router), edge cases,
padded capacity and drop accounting, backend switching in a whole model."""
import math

import pytest
import torch

from moe.config import MoEConfig
from moe.experts import backend_class
from moe.layer import MoELayer
from moe.routing import Routing

D, F = 16, 24
# (backend, extra config): every one of these must equal the reference exactly (dropless)
DROPLESS = [("grouped", {}), ("padded", {"capacity_factor": 0.0}), ("padded", {"capacity_factor": 64.0})]


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
    extra = {"expert_bias_rate": 1e-3} if bias is not None else {}
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
    assert other.read_metrics()["dropped_frac"] == 0


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

def padded(E, k, **kw):
    cfg = MoEConfig(num_experts=E, top_k=k, backend="padded", min_capacity=1, **kw)
    cfg.validate()
    torch.manual_seed(0)
    return backend_class("padded")(cfg, E, D, F, "gelu", 0.2, 0.2).double()


def hand_routing(ids, probs):
    ids, probs = torch.tensor(ids), torch.tensor(probs, dtype=torch.float64)
    w = probs.gather(1, ids)
    return Routing(ids, w, probs, probs.new_zeros(()), probs.new_zeros(()), probs.shape[1], {}, probs.log())


def expected(experts, x, routing, keep):
    """Reference output with the dropped assignments removed."""
    ref = backend_class("reference")(experts.cfg, experts.num_experts, D, F, "gelu", 0.2, 0.2).double()
    ref.load_state_dict(experts.state_dict())
    r = hand_routing(routing.expert_ids.tolist(), routing.probs.tolist())
    r.weights = r.weights * torch.tensor(keep, dtype=torch.float64)
    return ref(x, r)[0]


def test_capacity_formula():
    e = padded(4, 2, capacity_factor=1.25)
    counts = torch.tensor([9, 1, 0, 0])
    assert e.capacity(5, 2, counts) == 4  # ceil(1.25*2*5/4) = 4 (>= min_capacity 1)
    assert e.capacity(100, 2, counts) == 63  # ceil(62.5)
    assert e.capacity(2, 2, counts) == 2  # at most T
    e.cfg.min_capacity = 8
    assert e.capacity(5, 2, counts) == 5  # min_capacity 8, then capped at T = 5
    e.cfg.capacity_factor = 0
    assert e.capacity(5, 2, counts) == 9  # dynamic: the largest load


# T=3, E=3, k=2, cf=1: C = ceil(2*3/3) = 2. Expert 0 receives (t0, slot 0, p .5), (t1, slot 1, p .35),
# (t2, slot 1, p .4); the other experts stay under capacity.
IDS = [[0, 1], [1, 0], [2, 0]]
PROBS = [[0.5, 0.3, 0.2], [0.35, 0.45, 0.2], [0.4, 0.1, 0.5]]


@pytest.mark.parametrize("policy,keep", [
    ("position", [[1, 1], [1, 1], [1, 0]]),  # first choices first, then token order: (t2, slot 1) dropped
    ("probability", [[1, 1], [1, 0], [1, 1]]),  # p .5 and .4 kept: (t1, slot 1) dropped
])
def test_drop_accounting_hand_worked(policy, keep):
    e = padded(3, 2, capacity_factor=1.0, drop_policy=policy)
    routing = hand_routing(IDS, PROBS)
    x = torch.randn(3, D, dtype=torch.float64)
    y, num_dropped = e(x, routing)
    assert num_dropped.item() == 1
    torch.testing.assert_close(y, expected(e, x, routing, keep))


def test_first_choices_before_second_choices_k1_and_all_dropped_token():
    # k=1, E=2, T=4, cf=1: C=2; expert 0 gets t0, t1, t2 -> t2 dropped and its output is exactly 0
    e = padded(2, 1, capacity_factor=1.0)
    routing = hand_routing([[0], [0], [0], [1]], [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    y, num_dropped = e(x, routing)
    assert num_dropped.item() == 1 and torch.all(y[2] == 0) and y[0].abs().sum() > 0
    y.sum().backward()
    assert torch.all(x.grad[2] == 0)
    e.cfg.drop_policy = "probability"  # t0 (p .6) is now the lowest
    y, _ = e(x, routing)
    assert torch.all(y[0] == 0) and y[2].abs().sum() > 0


def test_layer_reports_dropped_fraction():
    layer = make_layer("padded", 4, 1, capacity_factor=1.0, min_capacity=1,
                       expert_bias_rate=1e-3)
    layer.router.expert_bias.copy_(torch.tensor([10.0, 0, 0, 0]))  # all 8 tokens on expert 0
    layer(torch.randn(1, 8, D, dtype=torch.float64))
    m = layer.read_metrics()
    # C = ceil(1*1*8/4) = 2 kept of 8
    assert m["dropped_frac"].item() == pytest.approx(6 / 8)
    assert m["tokens_max"].item() == 8 and m["tokens_mean"].item() == 2 and m["idle_frac"].item() == 0.75
    assert m["max_over_mean"].item() == 4
    assert layer.read_metrics()["dropped_frac"].item() == 0  # reset by the read


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
    layer = make_layer("reference", 4, 1, expert_bias_rate=0.1, aux_loss_scope="global")
    layer(torch.randn(2, 5, D, dtype=torch.float64))
    assert layer.router.step_counts.sum() == 10 and layer.router.global_counts.sum() == 10
    layer.after_step(applied=False)
    assert layer.router.step_counts.sum() == 0 and layer.router.global_counts.sum() == 0
    assert torch.count_nonzero(layer.router.expert_bias) == 0
    layer(torch.randn(2, 5, D, dtype=torch.float64))
    layer.after_step(applied=True)
    assert torch.count_nonzero(layer.router.expert_bias) > 0


@pytest.mark.parametrize("ids", [
    torch.randint(0, 7, (50, 2)),  # random, some experts likely empty
    torch.full((20, 1), 3),  # all assignments on one expert
    torch.tensor([[6, 0], [0, 6], [6, 0]]),  # only the first and last experts
    torch.zeros((0, 2), dtype=torch.int64),  # no tokens
    torch.randint(0, 7, (1234, 1), generator=torch.Generator().manual_seed(1)),  # many blocks, a ragged last one
], ids=["random", "one_expert", "ends_only", "empty", "many_blocks"])
@pytest.mark.parametrize("impl", ["torch", "counting"])
def test_sort_by_expert_is_a_stable_counting_sort(ids, impl):
    """torch.sort's path (CPU, or many experts) and the Triton counting sort (the GPU's, here interpreted)."""
    from moe.kernels.sort import counting_sort
    from moe.permute import Sorted, sort_by_expert

    E, flat = 7, ids.reshape(-1)
    s = sort_by_expert(ids, E) if impl == "torch" else Sorted(*counting_sort(flat, E, torch.int16))
    ref_order = torch.sort(flat, stable=True).indices  # int64 keys: the plain definition
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(s.order, ref_order)
    assert torch.equal(s.expert_of.long(), flat[ref_order])
    assert s.counts.dtype == s.offsets.dtype == torch.int64
    assert torch.equal(s.counts, counts) and torch.equal(s.offsets, torch.cumsum(counts, 0))
