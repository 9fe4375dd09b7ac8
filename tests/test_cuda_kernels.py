"""The GPU-only paths of the Triton kernels: compiled-kernel replay (moe/kernels/launch.py) and the counting
sort on CUDA. Skipped without a GPU (CI); run on the GPU machine on its own, since test_scatter.py sets
TRITON_INTERPRET for the whole process: `python -m pytest tests/test_cuda_kernels.py`."""
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiled Triton kernels need a GPU")


@pytest.mark.parametrize("n,E", [(32768, 64), (131072, 64), (1000, 8), (4097, 256), (77, 512), (5, 1)])
def test_counting_sort_on_cuda_equals_torch_sort(n, E):
    from moe.kernels.sort import sort_by_expert

    g = torch.Generator(device="cuda").manual_seed(n)
    ids = torch.randint(0, E, (n,), device="cuda", generator=g)
    ids[ids == E // 2] = 0  # an empty expert
    s = sort_by_expert(ids, E)
    ref = torch.sort(ids, stable=True)
    counts = torch.bincount(ids, minlength=E)
    assert torch.equal(s.order, ref.indices) and torch.equal(s.expert_of.long(), ref.values)
    assert torch.equal(s.counts, counts) and torch.equal(s.offsets, counts.cumsum(0))


def test_replayed_compiled_kernel_equals_the_jit_launch():
    """The first launches go through triton (autotune, then the picked config), later ones replay the compiled
    kernel; row counts that triton specializes differently (a multiple of 16 or not, 1) get their own entry."""
    from moe.kernels import launch as L
    from moe.kernels import scatter as K
    from moe.kernels.sort import sort_by_expert

    E, Kd, N, k = 4, 64, 96, 2
    w = torch.randn(E, Kd, N, device="cuda", dtype=torch.bfloat16)
    for T in (64, 61, 1):
        x = torch.randn(T, Kd, device="cuda", dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)])
        srt = sort_by_expert(ids, E)
        runs = [K.scatter_mm(x, w, srt.order, srt.counts, k, True, True) for _ in range(4)]
        for y in runs[1:]:
            assert torch.equal(y, runs[0])
        ref = torch.einsum("tk,tkn->tn", x.double().repeat_interleave(k, 0), w.double()[ids.reshape(-1)])
        torch.testing.assert_close(runs[0].double(), ref, rtol=2e-2, atol=2e-2 * math.sqrt(Kd))
    assert len(L._COMPILED) >= 3


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("f", [256, 2048])
def test_scatter_experts_on_cuda_match_reference(activation, f):
    """Forward and every gradient in bf16 against the reference backend in fp32, over three steps (tuning,
    the picked config, replay); f = 2048 takes the backward's torch._grouped_mm route."""
    from moe.experts.reference import ReferenceExperts
    from moe.experts.scatter import ScatterExperts, grouped_mm_pays
    from moe_helpers import make_routing, run_experts

    T, d, E, k = 300, 128, 8, 2
    assert grouped_mm_pays(torch.empty(1, d, device="cuda", dtype=torch.bfloat16), d, f) == (f >= 2048)
    ref = ReferenceExperts(E, d, f, activation, 0.02, 0.02).cuda()
    sc = ScatterExperts(E, d, f, activation, 0.02, 0.02).cuda()
    sc.load_state_dict(ref.state_dict())
    sc.bfloat16()
    for step in range(3):
        x = torch.randn(T, d, device="cuda")
        probs = torch.randn(T, E, device="cuda").softmax(-1)
        weights, ids = probs.topk(k, -1)
        outs = []
        for module, dtype in ((ref, torch.float32), (sc, torch.bfloat16)):
            xi = x.to(dtype).detach().requires_grad_(True)
            wi = weights.clone().requires_grad_(True)
            y = run_experts(module, xi, make_routing(ids, wi, E, probs))
            y.float().square().sum().backward()
            outs.append([y, xi.grad, wi.grad] + [p.grad for p in module.parameters()])
            module.zero_grad(set_to_none=True)
        for got, want in zip(outs[1], outs[0]):
            err = (got.float() - want).norm() / want.norm()
            assert err < 1e-2, (step, err)
