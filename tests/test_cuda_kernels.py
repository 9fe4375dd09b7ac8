"""The Triton kernels compiled on the GPU: compiled-kernel replay (moe/kernels/launch.py), the counting sort, the
scatter experts, the Sinkhorn rounds, the LM loss and the gated combine against the reference, and a compiled
model. Skipped without a GPU (CI); on a GPU `bash scripts/test.sh` runs them (tests/conftest.py decides)."""
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")


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


@pytest.mark.parametrize("backend", ["reference", "grouped", "padded", "scatter", "blocksparse"])
def test_compiled_model_on_cuda_equals_eager(backend):
    """The tiny model of tests/test_compile.py on the GPU in bf16 autocast, eager, with compiled blocks, and, for
    the backends whose shapes are static (train/config.py refuses the others), with the compiled blocks replayed
    as CUDA graphs (train.cuda_graphs; warm-up, capture, then two replays), run first so that nothing the kernels
    keep from an earlier call hides an allocation made inside the graphs' pool: the same losses over four steps
    (bf16 tolerance)."""
    from model.config import ModelConfig
    from model.gpt import GPT
    from moe.config import CapacityConfig, KernelConfig, MoEConfig

    extra = {"padded": {"capacity": CapacityConfig(factor=1.0)}, "blocksparse": {"kernels": KernelConfig(64)}}
    tokens = torch.randint(0, 256, (4, 8, 129), generator=torch.Generator().manual_seed(1)).cuda()
    moe_cfg = MoEConfig(num_experts=8, top_k=2, backend=backend, **extra.get(backend, {}))
    losses = {}
    for mode in ("compiled", "eager") if moe_cfg.sizes_reach_host else ("graphs", "compiled", "eager"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(ModelConfig(num_layers=2, hidden_size=128, num_heads=4), moe_cfg, 256, 128).cuda()
        if mode != "eager":
            model.compile_blocks(cuda_graphs=mode == "graphs")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for batch in tokens:
            torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses[mode] = run
    for mode in losses:
        assert losses[mode] == pytest.approx(losses["eager"], rel=2e-2), losses


def test_pretrain_with_cuda_graphs_equals_compiled(tmp_path):
    """pretrain.py in fresh processes (nothing cached from another test), tiny config, scatter backend, with
    train.cuda_graphs and with compiled blocks alone: the same losses (bf16 tolerance), logged every step. The
    trainer's step (fused AdamW, deferred finite check, stats read at the log step) around the graphs is what
    this covers beyond the model test above."""
    from benchmarks.pretrain_runs import pretrain_command, run_pretrain

    losses = {}
    for graphs in (True, False):
        run_dir = tmp_path / f"graphs-{graphs}"
        recs, error = run_pretrain(pretrain_command("configs/tiny.yaml", [
            "moe.backend=scatter", "train.compile=true", f"train.cuda_graphs={str(graphs).lower()}", "train.steps=6",
            "train.log_interval=1", "train.eval_interval=0", "checkpoint.save=false",
            f"data.cache_dir={tmp_path / 'cache'}"], run_dir), run_dir)
        assert error is None, error
        losses[graphs] = [r["loss"] for r in recs]
    assert len(losses[True]) == 6 and losses[True] == pytest.approx(losses[False], rel=2e-2), losses


@pytest.mark.parametrize("T,E,iters", [(65536, 64, 30), (4097, 8, 3), (1, 64, 2), (300, 1024, 1)])
def test_sinkhorn_kernel_on_cuda_equals_the_torch_loop(T, E, iters):
    """moe/kernels/sinkhorn.py against the torch loop of moe/router.py, both on the GPU, eager and with the
    router's function compiled (the launcher is an opaque custom op there)."""
    from moe.router import sinkhorn

    logits = torch.randn(T, E, device="cuda") * 2
    ref = sinkhorn(logits, iters, 12.0, kernel=False)
    compiled = torch.compile(lambda x: sinkhorn(x, iters, 12.0, kernel=True), fullgraph=True, dynamic=False)
    for got in (sinkhorn(logits, iters, 12.0, kernel=True), compiled(logits)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=5e-4)
        picked = ref.gather(1, got.argmax(1)[:, None])[:, 0]
        assert torch.all(picked >= ref.amax(1) - 1e-3)


@pytest.mark.parametrize("N,V,chunk", [(4096, 51200, 1024), (1000, 1000, 300)])
def test_lm_loss_on_cuda_equals_the_fp32_plain_path(N, V, chunk):
    """linear_cross_entropy on the GPU in bf16 (one Triton kernel per chunk between the GEMMs) against the plain
    fp32 logits and F.cross_entropy: the loss and the gradients of the hidden states and the head weight."""
    import torch.nn.functional as F

    from parallel.cross_entropy import linear_cross_entropy

    d = 256
    x0, w0 = torch.randn(N, d, device="cuda"), torch.randn(V, d, device="cuda") * 0.05
    targets = torch.randint(0, V, (N,), device="cuda")
    out = []
    for fused in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = (linear_cross_entropy(x, w, targets, torch.bfloat16, chunk_size=chunk) if fused
                else F.cross_entropy(x @ w.t(), targets))
        loss.backward()
        out.append((loss.detach(), x.grad, w.grad))
    for want, got in zip(*out):
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_gated_combine_on_cuda_equals_the_torch_combine():
    from moe.dispatch import GatedCombine, LocalDispatcher
    from moe_helpers import make_routing

    T, k, E, d = 1000, 2, 8, 256
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).cuda()
    w0, y0 = torch.rand(T, k, device="cuda"), torch.randn(T * k, d, device="cuda", dtype=torch.bfloat16)
    _, handle = LocalDispatcher().dispatch(torch.randn(T, d, device="cuda"), make_routing(ids, w0, E))
    dout = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    results = []
    for fused in (False, True):
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        if fused:
            out = GatedCombine.apply(y, handle.sort.order, w)
        else:  # the torch path of the combine, as on the CPU
            slots = torch.empty_like(y).index_copy_(0, handle.sort.order, y).view(T, k, d)
            out = (slots * w.to(y.dtype).unsqueeze(-1)).sum(1)
        out.backward(dout)
        results.append((out.float(), y.grad.float(), w.grad.float()))
    for want, got in zip(*results):
        assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("backend", ["scatter", "blocksparse", "grouped"])
def test_dropless_step_has_no_host_sync(backend):
    """Forward and backward of an MoE model on a dropless backend, router metrics included, never wait on the
    GPU (issue 15: the step's one sync is the trainer's finite check): torch's sync debug mode turns any
    synchronising call (a .item(), .tolist(), a shape read from the device) into an error."""
    from model.config import ModelConfig
    from model.gpt import GPT
    from moe.config import KernelConfig, MoEConfig

    extra = {"blocksparse": {"kernels": KernelConfig(64)}}
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, hidden_size=128, num_heads=4), MoEConfig(
        num_experts=8, top_k=2, backend=backend, **extra.get(backend, {})), 256, 128).cuda()
    batch = torch.randint(0, 256, (8, 129), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(batch[:, :-1], batch[:, 1:])
        loss.backward()

    step()  # the first call tunes and compiles (kernels, the fused loss), which may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_training_step_reads_back_only_the_previous_steps_finite_flag(tmp_path):
    """A whole trainer step (bf16 master weights, scatter backend, clip, fused AdamW, skip-on-non-finite) queues
    without waiting on the GPU; its one host read is the previous step's finite flag (Trainer.settle, replaced
    here by a recorder), taken when this step is already queued."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_checkpoint import TINY, TINY_YAML, FakeData

    from model.gpt import GPT
    from parallel.grads import GradSync
    from parallel.state import ParallelState
    from train.config import load_config
    from train.metrics import MetricsLogger
    from train.plan import plan_run
    from train.trainer import Trainer

    cfg = load_config(TINY_YAML, [*TINY, f"logging.run_dir={tmp_path}", "train.dtype=bf16", "moe.backend=scatter",
                                  "checkpoint.save=false"])
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe, cfg.model.vocab_size, cfg.data.seq_length).cuda()
    ps = ParallelState(device=torch.device("cuda", torch.cuda.current_device()))
    trainer = Trainer(cfg.train, plan_run(cfg, 1), model, FakeData(), ps, MetricsLogger(tmp_path, enabled=False),
                      GradSync(model, ps))
    # two steps of micro-batches already on the GPU: the loader's pinned copy is not what is tested here (and
    # indexing GPU tokens with FakeData's CPU indices would copy the indices, a sync of its own)
    stream = FakeData().train_batches(0, cfg.train.micro_batch_size, trainer.accumulation)
    batches = iter([next(stream).cuda() for _ in range(2 * trainer.accumulation)])
    trainer.train_step(batches)  # compiles and tunes, which may synchronise
    torch.cuda.synchronize()
    read = []
    trainer.settle = read.append
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [p[0] for p in read] == [1] and bool(read[0][1])  # step 1's flag: finite
    assert trainer.unsettled[0] == 2
