"""The scatter backend's Triton kernels under the interpreter, against torch and the reference backend."""
import pytest
import torch

from conftest import interpreted
from moe.experts.reference import ReferenceExperts
from moe.experts.scatter import ScatterExperts
from moe.kernels import launch as L
from moe.kernels import scatter as K
from moe.kernels.sort import sort_by_expert
from moe_helpers import make_routing, run_experts

pytestmark = interpreted


def _random_ids(T, k, E, allowed=None):
    """[T, k] distinct experts per token, drawn from `allowed` (default all)."""
    allowed = torch.arange(E) if allowed is None else torch.as_tensor(allowed)
    return torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(T)])


def _mm_reference(x, w, ids, k, scattered_in, scattered_out, w_2=None):
    """Row-by-row meaning of scatter_mm, in float64."""
    srt = sort_by_expert(ids, w.shape[0])
    x, w = x.double(), w.double()
    xin = x[srt.order // k] if scattered_in else x  # [T*k, K or 2K] sorted
    Kd = w.shape[1]
    y = torch.einsum("pk,pkn->pn", xin[:, :Kd], w[srt.expert_of.long()])
    if w_2 is not None:
        y = y + torch.einsum("pk,pkn->pn", xin[:, Kd:], w_2.double()[srt.expert_of.long()])
    if not scattered_out:
        return y
    out = torch.empty_like(y)
    out[srt.order] = y
    return out


@pytest.mark.parametrize("scattered_in,scattered_out", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scatter_mm_layouts(scattered_in, scattered_out, dtype):
    T, Kd, N, E = 50, 80, 72, 6
    k = 2 if scattered_in else 1  # a grouped input has its rows already expanded
    ids = _random_ids(T, k, E, allowed=[0, 1, 3, 4, 5])  # expert 2 empty
    srt = sort_by_expert(ids, E)
    x = torch.randn(T if scattered_in else T * k, Kd).to(dtype)
    w = (torch.randn(E, Kd, N) / Kd ** 0.5).to(dtype)
    y = K.scatter_mm(x, w, srt.order, srt.counts, k, scattered_in, scattered_out)
    ref = _mm_reference(x, w, ids, k, scattered_in, scattered_out)
    assert y.shape == ref.shape and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("scattered_in,scattered_out", [(True, False), (False, True)])
def test_scatter_mm_half_and_whole_last_tiles(scattered_in, scattered_out):
    """An expert's last rows take a half tile when they fit one (BM = 64 here): counts whose remainders fall on
    either side of 32, on it, and on whole tiles, with the layer-1 epilogue (h, act) and layer 2."""
    BM = K._MM_INTERPRET.kwargs["BM"]
    counts = [0, 1, BM // 2, BM // 2 + 1, BM, BM + 3, BM + BM // 2 + 5, 2 * BM + BM // 2]
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])[torch.randperm(sum(counts))][:, None]
    T, Kd, N, E = ids.shape[0], 48, 40, len(counts)
    srt = sort_by_expert(ids, E)
    assert srt.counts.tolist() == counts
    x = torch.randn(T, Kd)
    w = torch.randn(E, Kd, N) / Kd ** 0.5
    y = K.scatter_mm(x, w, srt.order, srt.counts, 1, scattered_in, scattered_out)
    ref = _mm_reference(x, w, ids, 1, scattered_in, scattered_out)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    h, a = K.mlp_in_fwd(x, w, None, srt.order, srt.counts, 1)
    h_ref = _mm_reference(x, w, ids, 1, True, False)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.double(), torch.nn.functional.gelu(h_ref, approximate="tanh"), rtol=1e-5, atol=1e-5)


def test_replayed_autotune_pick_gives_the_same_result(monkeypatch):
    """The second launch with the same key skips triton.autotune and replays its pick (kernels/launch.py
    `launch_tuned`); a row count within the same power of two (another expert-parallel shard) shares the key.
    The interpreter cannot autotune: a one-config autotuner stands in for the kernel."""
    import triton

    monkeypatch.setattr(K, "_scatter_mm_kernel", triton.autotune([K._MM_INTERPRET], key=["rows_key"])(
        K._scatter_mm_kernel))
    T, Kd, N, E, k = 30, 64, 64, 3, 2
    ids = _random_ids(T, k, E)
    srt = sort_by_expert(ids, E)
    x, w = torch.randn(T, Kd), torch.randn(E, Kd, N)
    L._PICKED.clear()
    first = K.scatter_mm(x, w, srt.order, srt.counts, k, True, False)
    assert len(L._PICKED) == 1
    torch.testing.assert_close(K.scatter_mm(x, w, srt.order, srt.counts, k, True, False), first, rtol=0, atol=0)
    srt2 = sort_by_expert(ids[:T - 3], E)  # 54 rows instead of 60: the same key (64)
    y2 = K.scatter_mm(x[:T - 3], w, srt2.order, srt2.counts, k, True, False)
    assert len(L._PICKED) == 1
    torch.testing.assert_close(y2.double(), _mm_reference(x[:T - 3], w, ids[:T - 3], k, True, False),
                               rtol=1e-5, atol=1e-4)


def test_scatter_mm_pair_and_transposed_weight():
    """The SwiGLU input gradient: grouped [T*k, 2K] input, transposed weight views, two products summed."""
    T, Kd, N, E, k = 40, 70, 90, 4, 2
    ids = _random_ids(T, k, E)
    srt = sort_by_expert(ids, E)
    x = torch.randn(T * k, 2 * Kd)
    w, w_2 = torch.randn(E, N, Kd), torch.randn(E, N, Kd)
    y = K.scatter_mm(x, w.transpose(1, 2), srt.order, srt.counts, k, False, True, w_2=w_2.transpose(1, 2))
    ref = _mm_reference(x, w.transpose(1, 2), ids, k, False, True, w_2=w_2.transpose(1, 2))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x_scattered", [True, False])
def test_group_xty(x_scattered):
    T, Kd, N, E, k = 60, 200, 100, 5, 2  # 4 x 2 tiles of dW[e] in groups of 3 row tiles: one group partial
    ids = _random_ids(T, k, E, allowed=[0, 2, 3, 4])  # expert 1 empty: its gradient must be written as zeros
    srt = sort_by_expert(ids, E)
    x = torch.randn(T if x_scattered else T * k, Kd)
    dy = torch.randn(T * k, N)
    dw = K.group_xty(x, dy, srt.order // k, srt.counts, srt.offsets, x_scattered)
    xs = x[srt.order // k] if x_scattered else x
    ref = torch.zeros(E, Kd, N, dtype=torch.float64)
    ref.index_add_(0, srt.expert_of.long(), xs.double()[:, :, None] * dy.double()[:, None, :])
    assert dw[1].abs().max() == 0
    torch.testing.assert_close(dw.double(), ref, rtol=1e-5, atol=1e-4)


def test_weight_gradient_through_grouped_mm_equals_kernel():
    """The torch._grouped_mm route of the weight gradients (wide experts on CUDA, x gathered into expert order)
    against the Triton kernel reading x by index, with an empty expert; fp32 on CPU (torch._grouped_mm wants
    16-byte strides: widths multiple of 4)."""
    from moe.experts.scatter import xty

    T, Kd, N, E, k = 40, 64, 96, 5, 2
    ids = _random_ids(T, k, E, allowed=[0, 1, 3, 4])  # expert 2 empty
    srt = sort_by_expert(ids, E)
    x, dy, tokens = torch.randn(T, Kd), torch.randn(T * k, N), srt.order // k
    dw = xty(x[tokens], dy, tokens, srt.counts, srt.offsets.int(), x_scattered=False, grouped_mm=True)
    assert dw.shape == (E, Kd, N) and dw[2].abs().max() == 0
    torch.testing.assert_close(dw, xty(x, dy, tokens, srt.counts, srt.offsets, x_scattered=True, grouped_mm=False),
                               rtol=1e-5, atol=1e-4)


def _pair(E, d, f, activation):
    ref = ReferenceExperts(E, d, f, activation, init_std=0.1, output_std=0.1)
    ours = ScatterExperts(E, d, f, activation, init_std=0.1, output_std=0.1)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


CASES = {  # name: (T, d, f, E, k, allowed experts or None)
    "basic_k2": (45, 72, 100, 6, 2, None),
    "empty_expert": (50, 64, 80, 5, 1, [0, 1, 2, 4]),
    "one_expert_gets_all": (90, 48, 70, 4, 1, [2]),
    "k_equals_E": (30, 40, 72, 3, 3, None),
    "E1": (33, 50, 64, 1, 1, None),
    "T1": (1, 64, 128, 4, 2, None),
}


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference(case, activation):
    _check_backend(case, activation)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", ["empty_expert", "basic_k2"])
def test_backward_with_grouped_mm_weight_gradients(monkeypatch, case, activation):
    """The backward's torch._grouped_mm route (taken for wide experts in bf16 on CUDA), forced here in fp32
    on CPU: x gathered once for dW1 and dW3, an empty expert, top-2."""
    import moe.experts.scatter as scatter_backend

    monkeypatch.setattr(scatter_backend, "grouped_mm_pays", lambda dy, d, f: True)
    _check_backend(case, activation)


def _check_backend(case, activation):
    T, d, f, E, k, allowed = CASES[case]
    ref, ours = _pair(E, d, f, activation)
    x = torch.randn(T, d, requires_grad=True)
    weights = torch.rand(T, k, requires_grad=True)
    routing = make_routing(_random_ids(T, k, E, allowed), weights, E)
    y_ref = run_experts(ref, x, routing)
    y = run_experts(ours, x, routing)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(y)
    inputs = [x, weights, ours.w1, ours.w2] + ([ours.w3] if activation == "swiglu" else [])
    ref_inputs = [x, weights, ref.w1, ref.w2] + ([ref.w3] if activation == "swiglu" else [])
    grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, dy)
    for name, g, g_ref in zip(["x", "weights", "w1", "w2", "w3"], grads, grads_ref):
        assert g.shape == g_ref.shape, name
        scale = g_ref.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g / scale, g_ref / scale, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def test_fp64_accumulates_in_fp64():
    T, d, f, E, k = 45, 40, 72, 4, 2
    ref, ours = _pair(E, d, f, "swiglu")
    ref.double(), ours.double()
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    routing = make_routing(_random_ids(T, k, E), torch.rand(T, k, dtype=torch.float64, requires_grad=True), E)
    y_ref, y = run_experts(ref, x, routing), run_experts(ours, x, routing)
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, [x, routing.weights, ours.w1, ours.w2, ours.w3], dy),
                        torch.autograd.grad(y_ref, [x, routing.weights, ref.w1, ref.w2, ref.w3], dy)):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how", ["half_module", "autocast"])
def test_fp16_backend_close_to_fp32_reference(how):
    T, d, f, E, k = 64, 64, 96, 4, 2
    ref, ours = _pair(E, d, f, "gelu")
    x = torch.randn(T, d, requires_grad=True)
    routing = make_routing(_random_ids(T, k, E), torch.rand(T, k), E)
    y_ref = run_experts(ref, x, routing)
    if how == "half_module":
        y = run_experts(ours.half(), x.half(), routing)
    else:  # fp32 parameters and input, fp16 compute; the weight gradient comes back in fp32
        with torch.autocast("cpu", dtype=torch.float16):
            y = run_experts(ours, x, routing)
        y.float().sum().backward()
        assert ours.w1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert y.dtype == torch.float16
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 5e-3


def test_no_tokens():
    ref, ours = _pair(3, 16, 24, "swiglu")
    x = torch.randn(0, 16, requires_grad=True)
    weights = torch.rand(0, 2, requires_grad=True)
    y = run_experts(ours, x, make_routing(torch.zeros(0, 2, dtype=torch.int64), weights, 3))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


def test_cpu_without_interpreter_fails_clearly(monkeypatch):
    ref, ours = _pair(2, 8, 8, "gelu")
    monkeypatch.setattr(K, "INTERPRET", False)
    routing = make_routing(torch.zeros(4, 1, dtype=torch.int64), torch.ones(4, 1), 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_experts(ours, torch.randn(4, 8), routing)
