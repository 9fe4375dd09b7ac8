"""Blocksparse backend: topology on hand-worked cases, each block-sparse product against a dense masked
torch product, the autograd MLP against dense autograd, and the whole backend against ReferenceExperts."""
import pytest
import torch
import torch.nn.functional as F

from conftest import interpreted
from moe.config import KernelConfig
from moe.experts.blocksparse import BlockSparseExperts, _BlockSparseMLP
from moe.experts.reference import ReferenceExperts
from moe.kernels import blocksparse as bs
from moe.kernels import rows as R
from moe.kernels.sort import sort_by_expert
from moe.kernels.topology import expert_topology, max_block_rows, padded_destinations, padded_sources, transpose_indices
from moe.routing import Routing
from moe_helpers import make_routing, run_experts

pytestmark = interpreted


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def ints(t: torch.Tensor) -> list[int]:
    return t.tolist()


# ---------------------------------------------------------------- topology, hand-worked


def test_topology_worked_example():
    """docs/algorithms.md §1.4–1.5: E=3, f=256, B=128, counts [130, 0, 100]."""
    counts = torch.tensor([130, 0, 100])
    R = max_block_rows(230, 3, 128)
    assert R == 4  # (230 + 3·127) // 128: one spare row beyond the 3 in use
    topo = expert_topology(counts, 256, 128, R)
    assert ints(topo.num_block_rows) == [3]
    assert ints(topo.row_offsets) == [0, 2, 4, 6, 6]  # the spare row is empty
    assert ints(topo.column_indices) == [0, 1, 0, 1, 4, 5, 6, 6]  # spare entries hold the sentinel E·F
    assert ints(topo.row_indices[:6]) == [0, 0, 1, 1, 2, 2]
    assert ints(topo.offsets_t) == [0, 2, 4, 4, 4, 5, 6]
    assert ints(topo.block_offsets_t[:6]) == [0, 2, 1, 3, 4, 5]
    assert ints(topo.column_indices_t[:6]) == [0, 1, 0, 1, 2, 2]
    for t in (topo.row_offsets, topo.column_indices, topo.row_indices, topo.offsets_t,
              topo.block_offsets_t, topo.column_indices_t, topo.num_block_rows):
        assert t.dtype == torch.int32


def test_transpose_paper_fig5():
    """Paper Fig. 5: row offsets [0,1,2,2,2,4,5] -> row indices [0,1,4,4,5], column indices [0,2,0,3,2]."""
    rows, cols = torch.tensor([0, 1, 4, 4, 5], dtype=torch.int32), torch.tensor([0, 2, 0, 3, 2], dtype=torch.int32)
    offsets_t, perm, cols_t = transpose_indices(rows, cols, 4)
    assert ints(offsets_t) == [0, 2, 2, 4, 5]
    assert ints(perm) == [0, 2, 1, 4, 3]
    assert ints(cols_t) == [0, 4, 1, 5, 4]


@pytest.mark.parametrize("counts, B, f, rows_used", [
    ([3, 0, 2], 4, 8, 2),  # an empty expert
    ([8, 4], 4, 4, 3),  # groups exactly a multiple of the block: no padding rows
    ([0, 1, 0], 16, 32, 1),  # one token
])
def test_topology_small_cases(counts, B, f, rows_used):
    counts_t = torch.tensor(counts)
    E, Fb = len(counts), f // B
    R = max_block_rows(sum(counts), E, B)
    topo = expert_topology(counts_t, f, B, R)
    assert ints(topo.num_block_rows) == [rows_used]
    expected_cols, expected_rows = [], []
    r = 0
    for e, c in enumerate(counts):
        for _ in range(-(-c // B)):
            expected_cols += [e * Fb + j for j in range(Fb)]
            expected_rows += [r] * Fb
            r += 1
    nnz = rows_used * Fb
    assert ints(topo.column_indices[:nnz]) == expected_cols
    assert ints(topo.row_indices[:nnz]) == expected_rows
    assert set(ints(topo.column_indices[nnz:])) <= {E * Fb}
    assert ints(topo.row_offsets) == [min(i, rows_used) * Fb for i in range(R + 1)]


def test_padded_destinations_hand_worked():
    # k=1, B=4, E=3: expert 0 gets tokens 1, 3, 4 (sorted positions 0-2 -> rows 0-2, row 3 padding), expert 1
    # none, expert 2 gets tokens 0, 2 (positions 3-4 -> rows 4-5)
    ids = torch.tensor([[2], [0], [2], [0], [0]])
    assert ints(padded_destinations(sort_by_expert(ids, 3), 4)) == [0, 1, 2, 4, 5]
    # k=2, B=2, E=2: every token on both experts; expert 0 rows 0-2 (+1 padding), expert 1 rows 4-6
    ids = torch.tensor([[1, 0], [0, 1], [1, 0]])
    dest = padded_destinations(sort_by_expert(ids, 2), 2)
    assert ints(dest) == [0, 1, 2, 4, 5, 6] and dest.dtype == torch.int64
    assert ints(padded_sources(dest, 10)) == [0, 1, 2, -1, 3, 4, 5, -1, -1, -1]


def test_permutation_kernels():
    """pad_rows (gather into the padded layout), combine_rows (weighted un-permute), row_dots (gate grads)."""
    torch.manual_seed(6)
    T, k, d, E, B = 11, 3, 70, 4, 4
    ids = random_ids(T, E, k)
    srt = sort_by_expert(ids, E)
    dest = torch.empty_like(srt.order).scatter_(0, srt.order, padded_destinations(srt, B)).view(T, k)  # by slot
    rows = max_block_rows(T * k, E, B) * B
    src = padded_sources(dest.reshape(-1), rows)
    x, w = torch.randn(T, d), torch.rand(T, k)
    x_pad = R.pad_rows(x, src, k)
    want = torch.zeros(rows, d)
    want[dest.reshape(-1).long()] = x.repeat_interleave(k, 0)
    assert torch.equal(x_pad, want)
    scaled = R.pad_rows(x, src, k, scale=w.reshape(-1))
    assert torch.allclose(scaled, want * torch.cat([w.reshape(-1), torch.zeros(1)])[src.long()][:, None])
    y_pad = torch.randn(rows, d)
    gathered = y_pad[dest.long()]  # [T, k, d]
    assert torch.allclose(R.combine_rows(y_pad, dest, w), (gathered * w[..., None]).sum(1), atol=1e-5)
    assert torch.allclose(R.combine_rows(y_pad, dest), gathered.sum(1), atol=1e-5)
    g = torch.randn(T, d)
    assert torch.allclose(R.row_dots(y_pad, dest, g), (gathered * g[:, None]).sum(-1), atol=1e-4)


def random_counts(E: int, total: int, empty: int | None = None) -> torch.Tensor:
    ids = torch.randint(0, E, (total,))
    if empty is not None:
        ids[ids == empty] = (empty + 1) % E
    return torch.bincount(ids, minlength=E)


def dense_mask(topo) -> torch.Tensor:
    """[R·B, E·f] bool: the topology's nonzero blocks, from (row_indices, column_indices)."""
    B, nnz = topo.block_size, int(topo.num_block_rows) * topo.blocks_per_row
    m = torch.zeros(topo.max_block_rows, topo.num_block_cols, dtype=torch.bool)
    m[topo.row_indices[:nnz].long(), topo.column_indices[:nnz].long()] = True
    return m.repeat_interleave(B, 0).repeat_interleave(B, 1)


def test_transpose_matches_explicit_transpose():
    torch.manual_seed(0)
    E, B, f = 5, 4, 12
    counts = random_counts(E, 37, empty=2)
    topo = expert_topology(counts, f, B, max_block_rows(37, E, B))
    nnz = int(topo.num_block_rows) * topo.blocks_per_row
    block_mask = dense_mask(topo)[::B, ::B]  # [R, E·F]
    # the explicit transpose, in its row-major order, lists (column, row) pairs
    cols_t, rows_t = block_mask.T.nonzero(as_tuple=True)
    walk_cols, walk_rows = [], []
    for c in range(topo.num_block_cols):
        for q in range(int(topo.offsets_t[c]), int(topo.offsets_t[c + 1])):
            blk = int(topo.block_offsets_t[q])
            assert int(topo.column_indices[blk]) == c
            assert int(topo.row_indices[blk]) == int(topo.column_indices_t[q])
            walk_cols.append(c)
            walk_rows.append(int(topo.column_indices_t[q]))
    assert walk_cols == ints(cols_t) and walk_rows == ints(rows_t)
    assert int(topo.offsets_t[-1]) == nnz
    assert sorted(ints(topo.block_offsets_t[:nnz])) == list(range(nnz))


# ---------------------------------------------------------------- products against dense masked torch


def make_case(E=4, B=16, f=32, total=45, empty=1, seed=0):
    torch.manual_seed(seed)
    counts = random_counts(E, total, empty)
    topo = expert_topology(counts, f, B, max_block_rows(total, E, B))
    rows = int(topo.num_block_rows) * B  # T_pad
    return topo, dense_mask(topo), rows


def densify(data: torch.Tensor, topo) -> torch.Tensor:
    """data [nnz, B, B] -> dense [R·B, E·f] with zeros outside the blocks in use."""
    B, nnz = topo.block_size, int(topo.num_block_rows) * topo.blocks_per_row
    out = torch.zeros(topo.max_block_rows * B, topo.num_block_cols * B, dtype=data.dtype)
    for b in range(nnz):
        r, c = int(topo.row_indices[b]), int(topo.column_indices[b])
        out[r * B:(r + 1) * B, c * B:(c + 1) * B] = data[b]
    return out


def cat_cols(w: torch.Tensor) -> torch.Tensor:
    """w [E, K, f] -> Wcat [K, E·f]."""
    return w.permute(1, 0, 2).reshape(w.shape[1], -1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_sdd_and_sddt(dtype, tol):
    topo, mask, rows = make_case()
    E, f, d = 4, 32, 40
    x = torch.randn(topo.max_block_rows * 16, d).to(dtype)
    w1, w2 = torch.randn(E, d, f).to(dtype), torch.randn(E, f, d).to(dtype)
    h = densify(bs.sdd(x, w1, topo), topo)  # SDD
    ref = (x.double() @ cat_cols(w1).double()) * mask
    assert rel_err(h[:rows], ref[:rows]) < tol
    dh = densify(bs.sdd(x, w2, topo, trans_w=True), topo)  # SDDᵀ: x · W2catᵀ
    ref_t = (x.double() @ cat_cols(w2.transpose(1, 2)).double()) * mask
    assert rel_err(dh[:rows], ref_t[:rows]) < tol


def test_sdd_gelu_epilogues():
    topo, mask, rows = make_case(seed=1)
    d = 24
    x, w = torch.randn(topo.max_block_rows * 16, d), torch.randn(4, d, 32) * 0.3
    h, a = bs.sdd(x, w, topo, act=bs.ACT_GELU)
    h_d, a_d = densify(h, topo), densify(a, topo)
    assert rel_err(a_d[:rows], F.gelu(h_d[:rows], approximate="tanh") * mask[:rows]) < 1e-5
    dy, w2 = torch.randn(topo.max_block_rows * 16, d), torch.randn(4, 32, d)
    dh = densify(bs.sdd(dy, w2, topo, trans_w=True, act=bs.ACT_GELU_GRAD, aux=h), topo)
    hh = h_d[:rows].clone().requires_grad_()
    F.gelu(hh, approximate="tanh").backward(densify(bs.sdd(dy, w2, topo, trans_w=True), topo)[:rows])
    assert rel_err(dh[:rows], hh.grad * mask[:rows]) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_dsd_and_dsdt(dtype, tol):
    topo, mask, rows = make_case(B=32, f=64, total=70, empty=3, seed=2)
    E, f, d = 4, 64, 40
    data = torch.randn(topo.max_block_rows * topo.blocks_per_row, 32, 32).to(dtype)
    s = densify(data, topo).double()
    w2, w1 = torch.randn(E, f, d).to(dtype), torch.randn(E, d, f).to(dtype)
    y = bs.dsd(data, w2, topo)  # DSD: S · W2cat
    assert rel_err(y[:rows], (s @ w2.reshape(E * f, d).double())[:rows]) < tol
    dx = bs.dsd(data, w1, topo, trans_w=True)  # DSDᵀ: S · W1catᵀ
    assert rel_err(dx[:rows], (s @ cat_cols(w1).double().T)[:rows]) < tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_dstd_ddts_dds(dtype, tol):
    topo, mask, rows = make_case(seed=3)  # expert 1 is empty: its tiles must come out as zeros
    E, f, n = 4, 32, 40
    data = torch.randn(topo.max_block_rows * topo.blocks_per_row, 16, 16).to(dtype)
    s = densify(data, topo).double()  # zero rows past T_pad
    dense = torch.randn(topo.max_block_rows * 16, n).to(dtype)
    dw2 = bs.dstd(data, dense, topo)  # DSᵀD: Sᵀ · D -> [E, f, n]
    assert rel_err(dw2, (s.T @ dense.double()).view(E, f, n)) < tol
    dw1 = bs.ddts(dense, data, topo)  # DDᵀS: Dᵀ · S -> [E, n, f]
    assert rel_err(dw1, (dense.double().T @ s).view(n, E, f).transpose(0, 1)) < tol
    assert dw2[1].abs().max() == 0 and dw1[1].abs().max() == 0
    left = torch.randn(n, topo.max_block_rows * 16).to(dtype)
    assert rel_err(bs.dds(left, data, topo), left.double() @ s) < tol  # DDS: D · S


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_mlp_function_against_dense_autograd(activation):
    """_BlockSparseMLP forward and all its gradients against masked dense products under torch autograd."""
    topo, mask, rows = make_case(seed=4)
    E, f, d = 4, 32, 24
    x = torch.randn(topo.max_block_rows * 16, d)
    x[rows:] = 0
    w1, w2, w3 = (torch.randn(E, d, f) * 0.3, torch.randn(E, f, d) * 0.3, torch.randn(E, d, f) * 0.3)
    if activation == "gelu":
        w3 = None
    params = [t.clone().requires_grad_() for t in (x, w1, w2) + ((w3,) if w3 is not None else ())]
    dy = torch.randn(x.shape[0], d)
    dy[rows:] = 0  # the padded scatter's backward leaves padding rows at zero
    y = _BlockSparseMLP.apply(*params[:3], params[3] if w3 is not None else None, topo, activation)
    y.backward(dy)

    ref = [t.double().clone().requires_grad_() for t in (x, w1, w2) + ((w3,) if w3 is not None else ())]
    m = mask.double()
    h1 = (ref[0] @ cat_cols(ref[1])) * m
    a = F.silu(h1) * ((ref[0] @ cat_cols(ref[3])) * m) if w3 is not None else F.gelu(h1, approximate="tanh")
    y_ref = (a * m) @ ref[2].reshape(E * f, d)
    y_ref.backward(dy.double())
    assert rel_err(y[:rows], y_ref[:rows]) < 1e-5
    assert rel_err(params[0].grad[:rows], ref[0].grad[:rows]) < 1e-5
    for p, r in zip(params[1:], ref[1:]):
        assert rel_err(p.grad, r.grad) < 1e-5


# ---------------------------------------------------------------- whole backend against the reference


def routing_for(ids: torch.Tensor, E: int) -> Routing:
    return make_routing(ids, torch.rand(ids.shape, dtype=torch.float32), E)


def random_ids(T: int, E: int, k: int, skip: int | None = None) -> torch.Tensor:
    scores = torch.rand(T, E)
    if skip is not None:
        scores[:, skip] = -1  # never chosen while k < E
    return scores.topk(k, dim=1).indices


CASES = {  # name: (T, d, f, E, k, B, activation, ids)
    "random_gelu": (37, 24, 64, 4, 2, 16, "gelu", None),
    "random_swiglu": (29, 20, 32, 3, 2, 16, "swiglu", None),
    "empty_expert": (33, 24, 32, 4, 1, 16, "gelu", "skip1"),
    "all_on_one_expert": (21, 16, 32, 3, 1, 16, "swiglu", "one"),
    "k_equals_E": (13, 24, 32, 3, 3, 16, "gelu", None),
    "single_expert_odd_F": (19, 16, 48, 1, 1, 16, "gelu", None),  # F = 3: one block per SDD program
    "one_token": (1, 24, 32, 4, 2, 16, "swiglu", None),
    "block_32_odd_sizes": (45, 40, 64, 3, 2, 32, "gelu", None),
    "block_64": (23, 20, 64, 2, 1, 64, "swiglu", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_experts_match_reference(name):
    T, d, f, E, k, B, activation, kind = CASES[name]
    torch.manual_seed(hash(name) % 1000)
    ref = ReferenceExperts(E, d, f, activation, 0.2, 0.2)
    blk = BlockSparseExperts(E, d, f, activation, 0.2, 0.2, kernels=KernelConfig(B))
    blk.load_state_dict(ref.state_dict())
    ids = (torch.full((T, 1), E - 1) if kind == "one" else random_ids(T, E, k, 1 if kind == "skip1" else None))
    routing = routing_for(ids, E)
    x, dout = torch.randn(T, d), torch.randn(T, d)
    results = []
    for module in (ref, blk):
        xx, ww = x.clone().requires_grad_(), routing.weights.clone().requires_grad_()
        y = run_experts(module, xx, make_routing(ids, ww, E))
        y.backward(dout)
        results.append((y, xx.grad, ww.grad, *[p.grad for p in module.parameters()]))
    want, got = results
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    if kind == "skip1":
        assert blk.w1.grad[1].abs().max() == 0 and blk.w2.grad[1].abs().max() == 0


def test_experts_fp16_close_to_fp32():
    T, d, f, E, k, B = 40, 32, 64, 4, 2, 32
    torch.manual_seed(5)
    ref = ReferenceExperts(E, d, f, "gelu", 0.2, 0.2)
    blk = BlockSparseExperts(E, d, f, "gelu", 0.2, 0.2, kernels=KernelConfig(B))
    blk.load_state_dict(ref.state_dict())
    routing = routing_for(random_ids(T, E, k), E)
    x = torch.randn(T, d)
    y_ref = run_experts(ref, x, routing)
    y16 = run_experts(blk.half(), x.half(), routing)
    assert y16.dtype == torch.float16
    assert rel_err(y16, y_ref) < 5e-3


def test_no_tokens():
    experts = BlockSparseExperts(2, 8, 16, "gelu", 0.02, 0.02, kernels=KernelConfig(16))
    x = torch.randn(0, 8, requires_grad=True)
    y = run_experts(experts, x, routing_for(torch.zeros(0, 1).long(), 2))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape and experts.w1.grad is not None  # every weight stays in the graph


def test_ffn_not_multiple_of_block_size():
    with pytest.raises(ValueError, match="multiple of moe.kernels.block_size"):
        BlockSparseExperts(2, 16, 48, "gelu", 0.02, 0.02, kernels=KernelConfig(32))
