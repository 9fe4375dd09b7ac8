"""Parallel layouts against the one-process model, in spawned gloo processes on the CPU.

Each layout's check builds the one-process GPT and the sharded GPT from the same seed, runs the same global
batch (every data-parallel rank its share, as two accumulated micro-batches; the reference runs the same
micro-batches in one process, so the per-micro-batch load-balance loss is the same), syncs the gradients with
parallel/grads.py, and compares the loss, the clipping norm, and every parameter and gradient gathered to full
tensors. Processes are started once per world size (forkserver with megatron-core preloaded: imports are the
slow part on a small machine) and run all their checks in turn, re-building the groups between layouts.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist

from conftest import INTERPRETED
from errors import ConfigError
from model.config import ModelConfig
from moe.config import CapacityConfig, MoEConfig, RouterConfig
from moe_helpers import make_routing
from parallel.shards import shard_spec
from train.config import load_config

V, S = 64, 8  # vocabulary, sequence length
MICRO, ACCUMULATION = 1, 2  # sequences per micro-batch and micro-batches per rank


def _model_configs(backend="reference", **model_kw):
    model = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, **model_kw)
    moe = MoEConfig(num_experts=4, top_k=2, layers="1", backend=backend,
                    router=RouterConfig(aux_loss_weight=0.01, z_loss_weight=0.001),
                    capacity=CapacityConfig(factor=8.0 if backend == "padded" else 1.0))
    return model, moe


def _gather(t: torch.Tensor, group, dim: int, chunks: int = 1) -> torch.Tensor:
    """Full tensor from the equal slices of `group` (each slice `chunks` blocks along `dim`)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    blocks = [p.chunk(chunks, dim) for p in parts]
    return torch.cat([b[j] for j in range(chunks) for b in blocks], dim)


def _full(p: torch.Tensor, t: torch.Tensor, ps) -> torch.Tensor:
    spec = shard_spec(p, ps)
    return t if spec is None else _gather(t, spec.group, spec.dim, spec.chunks)


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-6, msg=lambda m: f"{what}: {m}")


def check_parity(tp: int, ep: int, backend: str = "reference", **model_kw) -> None:
    from model.gpt import GPT
    from parallel.factory import build_layers
    from parallel.grads import GradSync
    from parallel.state import build_state

    ps = build_state(tp, ep, torch.device("cpu"))
    model_cfg, moe_cfg = _model_configs(backend, **model_kw)
    torch.manual_seed(0)
    tokens = torch.randint(V, (ps.dp_size * ACCUMULATION * MICRO, S + 1))  # the global batch
    micro = tokens.split(MICRO)  # micro-batch i of dp rank r is micro[r * ACCUMULATION + i]

    torch.manual_seed(1234)
    ref = GPT(model_cfg, _model_configs("reference", **model_kw)[1], V, S)
    ref_loss = 0
    for m in micro:
        loss, _ = ref(m[:, :-1], m[:, 1:])
        (loss / len(micro)).backward()
        ref_loss += loss.detach() / len(micro)
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])

    torch.manual_seed(1234)
    model = GPT(model_cfg, moe_cfg, V, S, layers=build_layers(ps))
    sync = GradSync(model, ps, bucket_mb=0.004)  # a few KiB: many buckets, launched during backward
    assert len(sync.buckets) > 2 or ps.dp_size == 1
    local_loss = 0
    for i in range(ACCUMULATION):
        m = micro[ps.dp_rank * ACCUMULATION + i]
        loss, _ = model(m[:, :-1], m[:, 1:])
        sync.begin_backward(last=i == ACCUMULATION - 1)
        (loss / ACCUMULATION).backward()
        local_loss += loss.detach() / ACCUMULATION
    got, want = model.moe_stats.reduce_and_reset(), ref.moe_stats.reduce_and_reset()
    assert got.keys() == want.keys() and want
    for key in want:  # expert load, dropped fraction, aux and z, tokens per expert: over every data-parallel rank
        # the tokens per expert are sums: the reference, run alike in every process, sums over all of them
        scale = dist.get_world_size() if key.endswith("/tokens_per_expert") else 1
        _close(torch.tensor(got[key]) * scale, torch.tensor(want[key]), f"MoE metric {key}")
    mean = sync.average({"loss": local_loss})
    norm, factor = sync.finish(max_norm=0)
    assert float(factor) == 1.0
    _close(mean["loss"], ref_loss, "loss")
    _close(norm, ref_norm, "grad norm")
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(ref_params), "parameter names differ from the one-process model"
    assert sorted(model.state_dict()) == sorted(ref.state_dict()), "state-dict keys differ"
    for name, p in model.named_parameters():
        _close(_full(p, p.detach(), ps), ref_params[name].detach(), f"parameter {name}")
        _close(_full(p, p.grad, ps), ref_params[name].grad, f"gradient of {name}")
    clipped, factor = sync.clip(max_norm=0.5 * float(ref_norm))  # clipping scales every shard alike
    _close(clipped, ref_norm, "norm before clipping")
    _close(factor, torch.tensor(0.5), "clipping factor")
    _close(sync.clip(max_norm=0)[0], 0.5 * ref_norm, "norm after clipping")


def check_dispatch_identity(ep: int) -> None:
    """Dispatch, the identity on the rows, combine: y == x for gates summing to 1; rank 1 has no tokens. The
    rows arrive grouped by local expert (counts summing to the rows received)."""
    from moe.dispatch import AllToAllDispatcher
    from parallel.state import build_state

    ps = build_state(1, ep, torch.device("cpu"))
    g = torch.Generator().manual_seed(ps.rank)
    T = 0 if ps.ep_rank == 1 else 5 + ps.rank
    E = 2 * ep
    x = torch.randn(T, 6, generator=g, requires_grad=True)
    ids = torch.rand(T, E, generator=g).topk(2, dim=1).indices
    w = torch.rand(T, 2, generator=g)
    dispatcher = AllToAllDispatcher(ps.ep_group, ps.ep_rank, ep)
    rows, handle = dispatcher.dispatch(x, make_routing(ids, w / w.sum(1, keepdim=True), E))
    assert rows.top_k == 1 and rows.sort.counts.numel() == 2 and int(rows.sort.counts.sum()) == rows.x.shape[0]
    assert bool((rows.sort.expert_of[1:] >= rows.sort.expert_of[:-1]).all()), "grouped by local expert"
    y = dispatcher.combine(rows.gathered() * 1, handle)
    _close(y, x.detach(), "dispatch then combine")
    y.sum().backward()
    _close(x.grad, torch.ones_like(x), "gradient of dispatch then combine")


def check_zero_tokens(ep: int) -> None:
    """Reference experts under expert parallelism against the full experts in one process: first every token
    goes to ep rank 0's experts (the other ranks receive nothing, and rank 1 sends nothing), then random routes
    that leave the last expert empty."""
    from moe.dispatch import AllToAllDispatcher
    from moe.experts.reference import ReferenceExperts
    from moe_helpers import run_experts
    from parallel.state import build_state

    ps = build_state(1, ep, torch.device("cpu"))
    E, d, f = 2 * ep, 6, 8
    torch.manual_seed(7)
    full = ReferenceExperts(E, d, f, "gelu", 0.5, 0.5)
    dispatcher = AllToAllDispatcher(ps.ep_group, ps.ep_rank, ep)
    torch.manual_seed(7)
    local = ReferenceExperts(E, d, f, "gelu", 0.5, 0.5, dispatcher.local_experts(E))  # this rank's 2 experts
    for name, p in local.named_parameters():
        assert torch.equal(p, getattr(full, name)[ps.ep_rank * 2:(ps.ep_rank + 1) * 2]), "sliced initialisation"
    for case, top in (("all on rank 0", 2), ("last expert empty", E - 1)):
        g = torch.Generator().manual_seed(11)
        sizes = [0 if r == 1 else 4 + r for r in range(ep)]
        xs = [torch.randn(n, d, generator=g, requires_grad=True) for n in sizes]
        idss = [torch.rand(n, top, generator=g).topk(2, dim=1).indices for n in sizes]
        ws = [torch.rand(n, 2, generator=g, requires_grad=True) for n in sizes]
        cs = [torch.randn(n, d, generator=g) for n in sizes]
        full.zero_grad()
        for x, ids, w, c in zip(xs, idss, ws, cs):
            if not len(x):  # nothing to add
                continue
            (run_experts(full, x, make_routing(ids, w, E)) * c).sum().backward()
        r = ps.ep_rank
        x = xs[r].detach().requires_grad_()
        w = ws[r].detach().requires_grad_()
        local.zero_grad()
        rows, handle = dispatcher.dispatch(x, make_routing(idss[r], w, E))
        y = dispatcher.combine(local(rows), handle)
        (y * cs[r]).sum().backward()
        for p in (x, w):
            assert p.grad is not None and p.grad.shape == p.shape
        if len(x):
            _close(y, run_experts(full, xs[r], make_routing(idss[r], ws[r], E)).detach(), f"{case}: output")
            _close(x.grad, xs[r].grad, f"{case}: input gradient")
            _close(w.grad, ws[r].grad, f"{case}: gate gradient")
        for name, p in local.named_parameters():
            _close(p.grad, getattr(full, name).grad[r * 2:(r + 1) * 2], f"{case}: gradient of {name}")


def _routing(logits: torch.Tensor, k: int):
    probs = logits.softmax(-1)
    w, ids = probs.topk(k, -1)
    return make_routing(ids, w, logits.shape[1], probs, logits)


class _Layouts:
    """The capacity step and padded experts run two ways on one global batch (the ep ranks' tokens in rank
    order): one process on all of it, and this rank of the expert group on its share."""

    def __init__(self, ep: int, E: int, T: int, d: int = 6, f: int = 8):
        from moe.dispatch import AllToAllDispatcher
        from moe.experts import backend_class
        from parallel.state import build_state

        self.ps = build_state(1, ep, torch.device("cpu"))
        self.E, self.T = E, T
        self.disp = AllToAllDispatcher(self.ps.ep_group, self.ps.ep_rank, ep)
        self.own = slice(self.ps.ep_rank * T, (self.ps.ep_rank + 1) * T)
        torch.manual_seed(3)
        self.full = backend_class("padded")(E, d, f, "gelu", 0.5, 0.5).double()
        torch.manual_seed(3)
        self.local = backend_class("padded")(E, d, f, "gelu", 0.5, 0.5, self.disp.local_experts(E)).double()
        self.x = torch.randn(ep * T, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(self, logits: torch.Tensor, k: int, cfg: CapacityConfig):
        """-> (one process: Capped, y) on the global batch, (this rank: Capped, y, dropped) on its share."""
        from moe.capacity import apply_capacity
        from moe.dispatch import LocalDispatcher
        from moe.layer import run_experts

        one = apply_capacity(_routing(logits, k), cfg, False)
        y_one, _ = run_experts(LocalDispatcher(), self.full, self.x, _routing(logits, k), cfg)
        mine = apply_capacity(_routing(logits[self.own], k), cfg, False, self.disp.peers,
                              self.disp.local_experts(self.E))
        y, dropped = run_experts(self.disp, self.local, self.x[self.own], _routing(logits[self.own], k), cfg)
        return (one, y_one), (mine, y, dropped)

    def dropped_frac(self, dropped: torch.Tensor, k: int) -> float:
        """The metric the layer reports, summed over the data-parallel group (moe/stats.py)."""
        from moe.stats import MoEStats

        stats = MoEStats(1, self.E, self.ps.dp_group)
        counts = torch.full((self.E,), self.T * k // self.E, dtype=torch.int64)
        counts[0] += self.T * k - int(counts.sum())
        zero = torch.zeros(())
        stats.record_layer(0, counts, zero, zero, dropped)
        return stats.reduce_and_reset()["moe/0/dropped_frac"]


class _Cases(list):
    """Failures of a check that loops over collectives, raised at the end: a rank that fails one case must still
    join the collectives of the next ones (leaving early would leave the other ranks waiting)."""

    def __call__(self, what: str, *asserts) -> None:
        for a in asserts:
            try:
                a()
            except AssertionError as e:
                self.append(f"{what}: {e}")
                return

    def raise_any(self) -> None:
        if self:
            raise AssertionError("\n".join(self))


def _true(cond, msg: str):
    def a():
        assert cond, msg
    return a


def check_capacity_layouts(ep: int) -> None:
    """Item 1 of issue 19: under ep the capacity step drops exactly the (token, slot) pairs one process drops on
    the group's batch, for every factor, k and policy, and Fill-in Rectification fills the same slots; the
    outputs and the reported dropped fraction agree."""
    L, cases = _Layouts(ep, E=4, T=6), _Cases()
    logits = 2 * torch.randn(ep * L.T, L.E, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for cf in (0.5, 1.0, 1.25):
        for k in (1, 2):
            for policy, fill in [(p, False) for p in CapacityConfig.POLICIES] + [("position", True)]:
                what = f"cf={cf} k={k} {policy}" + " FR" * fill  # FR: vacancies filled over the whole group
                cfg = CapacityConfig(factor=cf, min=1, drop_policy=policy, rectify_fill=fill)
                (one, y_one), (mine, y, dropped) = L.run(logits, k, cfg)
                frac = L.dropped_frac(dropped, k)
                cases(what, _true(torch.equal(mine.routing.kept, one.routing.kept[L.own]), "kept pairs differ"),
                      _true(mine.capacity == one.capacity, f"capacity {mine.capacity} != {one.capacity}"),
                      lambda y=y, y_one=y_one: _close(y, y_one[L.own], "output"),
                      _true(frac == pytest.approx(one.num_dropped.item() / (ep * L.T * k)), "dropped fraction"),
                      _true(0 < one.num_dropped or cf > 1, "the case drops nothing"))
    cases.raise_any()


def check_priority_across_ranks() -> None:
    """Item 2: hand-built, ep = 2, E = 2 (expert e on rank e), k = 2, cf = .5: C = ceil(.5*2*4/2) = 2.
    Rank 0's tokens choose (e1, e0), rank 1's (e0, e1): each expert gets two first choices from one rank and two
    second choices from the other, and keeps the first choices whatever their rank. GShard's per-source
    capacity (scope=source) decides per rank instead."""
    L = _Layouts(2, E=2, T=2)
    logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    want = torch.tensor([[True, False]] * 4)
    for policy in CapacityConfig.POLICIES:
        (one, _), (mine, _, dropped) = L.run(logits, 2, CapacityConfig(factor=0.5, min=1, drop_policy=policy))
        assert torch.equal(one.routing.kept, want), f"{policy}: one process"
        assert torch.equal(mine.routing.kept, want[L.own]), f"{policy}: ep = 2"
        assert dropped.item() == 2
    _, (mine, _, _) = L.run(logits, 2, CapacityConfig(factor=0.5, min=1, scope="source"))
    # per rank: C = ceil(.5*2*2/2) = 1, each expert keeps its first row from each rank: t0's first and second
    # choices, so a second choice is kept while another token's first choice is dropped
    assert torch.equal(mine.routing.kept, torch.tensor([[True, True], [False, False]])), "scope=source"
    assert mine.capacity == 2  # ep * C: the bound on an expert's rows


def check_rectify_layouts() -> None:
    """Item 4, ep = 2, E = 8 (experts 0-3 on rank 0, 4-7 on rank 1), T = 6 per rank. 'Local': every token
    prefers its own rank's experts, so the best expert outside its top-k is on its own GPU and ep = 2 must give
    the one-process result, for IR (the paper's and the capped one), FR and IR + FR. 'Remote': rank 0's tokens
    rank e4 second: one process sends their dropped assignments to e4, ep = 2 to e1, the best on their GPU."""
    from moe.dispatch import LocalDispatcher
    from moe.layer import run_experts

    L, cases = _Layouts(2, E=8, T=6), _Cases()
    noise = 0.1 * torch.randn(12, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    base = torch.tensor([4.0, 3.0, 2.0, 1.0, -4.0, -4.0, -4.0, -4.0], dtype=torch.float64)
    local = noise + torch.cat([base.expand(6, 8), base.roll(4).expand(6, 8)])
    for name, kw in (("IR", dict(rectify_intra=True)), ("IR capped", dict(rectify_intra=True,
                     rectify_intra_capped=True)), ("FR", dict(rectify_fill=True)),
                     ("IR+FR", dict(rectify_intra=True, rectify_fill=True))):
        for cf in (0.5, 1.0, 1.25):
            for k in (1, 2):
                what = f"{name} cf={cf} k={k}"
                cfg = CapacityConfig(factor=cf, min=1, drop_policy="bpr", **kw)
                (one, y_one), (mine, y, dropped) = L.run(local, k, cfg)
                frac = L.dropped_frac(dropped, k)
                kept = one.routing.kept[L.own]  # the ids of unused slots are arbitrary
                same = [_true(torch.equal(torch.where(kept, getattr(mine.routing, f), 0),
                                          torch.where(kept, getattr(one.routing, f)[L.own], 0)), f)
                        for f in ("expert_ids", "kept", "weights")]
                cases(what, *same, lambda y=y, y_one=y_one: _close(y, y_one[L.own], "output"),
                      _true(frac == pytest.approx(one.num_dropped.item() / (12 * k)), "dropped fraction"),
                      _true(name != "IR" or cf != 0.5 or one.num_dropped == 0, "the paper's IR rescues every "
                            "dropped assignment"))
    remote = local.clone()
    remote[:6, 4] = 3.5  # rank 0's tokens: e0 > e4 > e1 > ...
    cfg = CapacityConfig(factor=0.5, min=1, rectify_intra=True)
    (one, y_one), (mine, y, _) = L.run(remote, 1, cfg)
    rescued = mine.routing.kept[:, 1]
    if L.ps.ep_rank == 0:  # C = ceil(.5*12/8) = 1: e0 keeps one of rank 0's six tokens
        cases("remote", _true(rescued.sum() == 5 and torch.equal(one.routing.kept[:6, 1], rescued),
                              "one dropped, five rescued"),
              _true((mine.routing.expert_ids[rescued, 1] == 1).all(), "ep = 2: the best expert on the token's GPU"),
              _true((one.routing.expert_ids[:6][rescued, 1] == 4).all(), "one process: the best of all experts"))
    else:
        cases("remote", _true(torch.equal(mine.routing.kept, one.routing.kept[L.own]), "rank 1 as one process"),
              lambda: _close(y, y_one[L.own].detach(), "rank 1 output"))
    # the output is the experts of the routing ep = 2 decided, computed in one process
    cases("remote", lambda: _close(y, run_experts(LocalDispatcher(), L.full, L.x[L.own], mine.routing)[0].detach(),
                                   "output"))
    # backward through the rows computed here (IR) and the ones sent (top-k, FR): input, router and expert
    # gradients equal one process's
    cfg = CapacityConfig(factor=0.5, min=1, rectify_intra=True, rectify_fill=True)
    c = torch.randn(12, L.x.shape[1], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x, lg = L.x.clone().requires_grad_(), local.clone().requires_grad_()
    (run_experts(LocalDispatcher(), L.full, x, _routing(lg, 1), cfg)[0] * c).sum().backward()
    xm, lm = L.x[L.own].clone().requires_grad_(), local[L.own].clone().requires_grad_()
    (run_experts(L.disp, L.local, xm, _routing(lm, 1), cfg)[0] * c[L.own]).sum().backward()
    experts = L.disp.local_experts(8)
    cases("gradients", lambda: _close(xm.grad, x.grad[L.own], "input"),
          lambda: _close(lm.grad, lg.grad[L.own], "logits"),
          *[lambda n=n: _close(getattr(L.local, n).grad, getattr(L.full, n).grad[experts.start:experts.stop], n)
            for n in ("w1", "w2")])
    cases.raise_any()


CHECKS = {
    "tp2": lambda: check_parity(2, 1),
    "tp2_swiglu_rope_untied": lambda: check_parity(2, 1, activation="swiglu", position="rope", tie_embeddings=False),
    "ep2": lambda: check_parity(1, 2),
    "ep2_padded": lambda: check_parity(1, 2, backend="padded"),
    "ep2_scatter": lambda: check_parity(1, 2, backend="scatter"),  # Triton kernels under the interpreter
    "dp2": lambda: check_parity(1, 1),
    "dispatch_identity_ep2": lambda: check_dispatch_identity(2),
    "zero_tokens_ep2": lambda: check_zero_tokens(2),
    "tp2_ep2": lambda: check_parity(2, 2),
    "dp2_ep2": lambda: check_parity(1, 2),
    "zero_tokens_ep4": lambda: check_zero_tokens(4),
    "capacity_layouts_ep2": lambda: check_capacity_layouts(2),
    "capacity_layouts_ep4": lambda: check_capacity_layouts(4),
    "priority_across_ranks_ep2": check_priority_across_ranks,
    "rectify_layouts_ep2": check_rectify_layouts,
}


def _worker(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = ""
        except Exception:  # reported by the test of that name
            results[name] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _spawn(world: int, names: list[str]) -> dict[str, str]:
    """Run the named checks in `world` processes; name -> '' or the failures, per rank."""
    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["megatron.core.parallel_state", "megatron.core.tensor_parallel",
                                            "model.gpt", "parallel.grads"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, port, out_dir, names), nprocs=world, start_method="forkserver")
        per_rank = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]
    return {n: "\n".join(f"rank {r}: {res[n]}" for r, res in enumerate(per_rank) if res[n]) for n in names}


TWO = ["tp2", "tp2_swiglu_rope_untied", "ep2", "ep2_padded", "dp2", "dispatch_identity_ep2", "zero_tokens_ep2",
       "capacity_layouts_ep2", "priority_across_ranks_ep2", "rectify_layouts_ep2"]
FOUR = ["tp2_ep2", "dp2_ep2", "zero_tokens_ep4", "capacity_layouts_ep4"]
TWO += ["ep2_scatter"] if INTERPRETED else []  # Triton kernels on CPU tensors: the interpreter's


@pytest.fixture(scope="module")
def two():
    return _spawn(2, TWO)


@pytest.fixture(scope="module")
def four():
    return _spawn(4, FOUR)


@pytest.mark.parametrize("name", TWO)
def test_two_ranks(two, name):
    assert not two[name], two[name]


@pytest.mark.parametrize("name", FOUR)
def test_four_ranks(four, name):
    assert not four[name], four[name]


@pytest.mark.parametrize("overrides, world, key, words", [
    (["parallel.tensor=2", "parallel.expert=2"], 6, "parallel.tensor", "must divide the world size 6"),
    (["moe.num_experts=4", "parallel.expert=3"], 3, "parallel.expert", "must divide moe.num_experts=4"),
    (["model.num_heads=4", "parallel.tensor=8"], 8, "parallel.tensor", "must divide model.num_heads=4"),
    (["model.vocab_size=65", "parallel.tensor=2"], 2, "model.vocab_size", "pad it to a multiple of 2"),
    (["data.vocab_divisible_by=3", "parallel.tensor=2"], 2, "data.vocab_divisible_by", "multiple of parallel.tensor"),
])
def test_bad_layout_message(overrides, world, key, words):
    base = ["model.num_heads=4", "model.hidden_size=32", "moe.num_experts=4", "train.micro_batch_size=1",
            "train.global_batch_size=8"]
    with pytest.raises(ConfigError) as e:
        load_config(None, base + overrides, world_size=world)
    assert e.value.key == key and words in str(e.value), str(e.value)
