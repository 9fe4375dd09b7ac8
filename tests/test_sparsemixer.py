"""SparseMixer v1/v2: the worked example of docs/algorithms.md §4.3-4.4, sampling statistics, a Monte-Carlo
check of the v1 gradient against the exact gradient of the expected output, and the layer wiring."""
import pytest
import torch

from moe.config import CapacityConfig, MoEConfig, RouterConfig
from moe.layer import MoELayer
from moe.sparsemixer import V1, V2, jitter_mask, scaled_gate, sparsemixer_route

L = [2.0, 1.9, 0.5]


def test_mask_and_masked_softmax_worked_example():
    logits = torch.tensor([L])
    assert jitter_mask(logits, 0.1).tolist() == [[False, False, True]]  # ratios [0, .05, .75] vs 2*eps = .2
    _, w, p = sparsemixer_route(logits, 1, 0.1, training=False)  # evaluation: D = argmax, unscaled
    torch.testing.assert_close(p, torch.tensor([[0.52498, 0.47502, 0.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(w, torch.tensor([[0.52498]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("D,scale,mult,grad", [
    (1, 0.5, 0.23751, [-0.49875, 0.49875, 0.0]),  # non-argmax sample, mid-point branch
    (0, 1.0, 0.52498, [0.49875, -0.49875, 0.0]),  # argmax sample, Euler branch
])
def test_v1_forward_and_backward_worked_example(D, scale, mult, grad):
    logits = torch.tensor([L], requires_grad=True)
    p = logits.masked_fill(jitter_mask(logits.detach(), 0.1), float("-inf")).softmax(-1)
    w = scaled_gate(p[:, D:D + 1], torch.tensor([[scale]]), V1["grad_factor"])
    assert w.item() == pytest.approx(mult, abs=1e-5)
    w.backward(torch.ones_like(w))  # g = 1
    torch.testing.assert_close(logits.grad, torch.tensor([grad]), atol=1e-5, rtol=0)


def test_v1_sampling_statistics():
    torch.manual_seed(0)
    N = 20000
    logits = torch.tensor([L]).expand(N, 3)
    ids, w, _ = sparsemixer_route(logits, 1, 0.1, training=True)
    ids, w = ids[:, 0], w[:, 0]
    assert (ids == 2).sum() == 0  # masked expert never sampled
    assert (ids == 1).float().mean().item() == pytest.approx(0.47502, abs=0.015)
    assert torch.all((w[ids == 0] - 0.52498).abs() < 1e-5)  # argmax: never halved
    halved = (w[ids == 1] < 0.3).float().mean().item()
    assert halved == pytest.approx(0.5, abs=0.02)  # non-argmax: mid-point half of the time


@pytest.mark.parametrize("logits,eps", [([0.3, -0.2, 0.1, 0.25], 0.5), ([2.0, 1.9, 0.5, 1.95], 0.1)])
def test_v1_gradient_monte_carlo_matches_expected_output(logits, eps):
    """E_D[SparseMixer gradient] = d/dl of the expected output sum_D p_D * <c, p_D f_D> (exact for a loss
    linear in the layer output, where the mid-point and Euler rules are exact)."""
    torch.manual_seed(0)
    E, N = len(logits), 40000
    f = torch.randn(E, 5, dtype=torch.float64)  # expert outputs
    c = torch.randn(5, dtype=torch.float64)  # dL/dy
    base = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    ids, w, _ = sparsemixer_route(base.expand(N, E), 1, eps, training=True)
    ((w * (f[ids[:, 0]] @ c)[:, None]).sum() / N).backward()
    estimate = base.grad.clone()

    exact_l = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    mask = jitter_mask(exact_l.detach()[None], eps)[0]
    p = exact_l.masked_fill(mask, float("-inf")).softmax(-1)
    (p * p * (f @ c)).sum().backward()
    scale = exact_l.grad.abs().max().item()
    torch.testing.assert_close(estimate, exact_l.grad, atol=0.04 * scale, rtol=0)


def test_v2_worked_example_and_gradient_factor():
    logits = torch.tensor([L])
    # stage 2 after D1 = 1 keeps only expert 0: (2 - 0.5)/2 = .75 > .2
    excluded = torch.tensor([[False, True, False]])
    assert jitter_mask(logits, 0.1, excluded).tolist() == [[False, True, True]]
    # evaluation: D1 = 0 (p .52498); stage 2 keeps only expert 1 ((1.9-0.5)/1.9 > .2) -> multiplier 1
    ids, w, probs = sparsemixer_route(logits, 2, 0.1, training=False)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.52498, 1.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(probs, logits.softmax(-1))  # v2 balance probabilities: the full softmax
    # Heun branch: forward p_D / 3, backward the unscaled gate's Jacobian g p_D (onehot - p)
    lg = torch.tensor([L], requires_grad=True)
    p = lg.masked_fill(jitter_mask(lg.detach(), 0.1), float("-inf")).softmax(-1)
    g = scaled_gate(p[:, 1:2], torch.tensor([[V2["scale"]]]), V2["grad_factor"])
    assert g.item() == pytest.approx(0.47502 / 3, abs=1e-5)
    g.backward()
    torch.testing.assert_close(lg.grad, torch.tensor([[-0.24938, 0.24938, 0.0]]), atol=1e-5, rtol=0)


def test_v2_training_samples_two_distinct_experts():
    torch.manual_seed(0)
    logits = torch.randn(2000, 6)
    ids, w, _ = sparsemixer_route(logits, 2, 0.3, training=True)
    assert torch.all(ids[:, 0] != ids[:, 1]) and torch.all(w > 0) and torch.all(w <= 1)


@pytest.mark.parametrize("k,backend", [(1, "reference"), (1, "grouped"), (2, "padded")])
def test_layer_with_sparsemixer(k, backend):
    cfg = MoEConfig(num_experts=4, top_k=k, router=RouterConfig(type="sparsemixer", jitter_eps=0.2), backend=backend,
                    capacity=CapacityConfig(factor=0.0))
    cfg.validate()
    torch.manual_seed(0)
    layer = MoELayer(cfg, 8, 16, "swiglu", 0.3, 0.3)
    assert (layer.router.omega is not None) == (k == 1)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y, aux, z = layer(x)
    (y.square().sum() + aux + z).backward()
    assert layer.router.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    if k == 1:
        assert layer.router.omega.grad.abs().sum() > 0
    layer.eval()
    y1, _, _ = layer(x)
    y2, _, _ = layer(x)
    torch.testing.assert_close(y1, y2)  # deterministic in evaluation
