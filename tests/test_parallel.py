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


TWO = ["tp2", "tp2_swiglu_rope_untied", "ep2", "ep2_padded", "dp2", "dispatch_identity_ep2", "zero_tokens_ep2"]
TWO += ["ep2_scatter"] if INTERPRETED else []  # Triton kernels on CPU tensors: the interpreter's


@pytest.fixture(scope="module")
def two():
    return _spawn(2, TWO)


@pytest.fixture(scope="module")
def four():
    return _spawn(4, ["tp2_ep2", "dp2_ep2", "zero_tokens_ep4"])


@pytest.mark.parametrize("name", TWO)
def test_two_ranks(two, name):
    assert not two[name], two[name]


@pytest.mark.parametrize("name", ["tp2_ep2", "dp2_ep2", "zero_tokens_ep4"])
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
