"""torch.compile of the model with every MoE backend (Triton kernels under the interpreter on the CPU) gives the
eager losses and gradients, and no graph breaks inside a block."""
import pytest
import torch
import torch._dynamo
import torch._inductor.exc

from conftest import interpreted
from model.config import ModelConfig
from model.gpt import GPT
from moe.config import CapacityConfig, KernelConfig, MoEConfig, RouterConfig

BACKENDS = {"reference": {}, "grouped": {}, "padded": {"capacity": CapacityConfig(factor=1.0)},
            "scatter": {}, "blocksparse": {"kernels": KernelConfig(block_size=16)}}
PARAMS = [pytest.param(b, marks=interpreted) if b in ("scatter", "blocksparse") else b for b in BACKENDS]
# torch 2.11's C++ inductor (the GPU machine's torch, on its CPU) divides by a size hint of 0 for one of the
# reference backend's data-dependent per-expert sizes (ZeroDivisionError in cpp.py's decide_parallel_depth);
# torch 2.13 compiles it. The reference backend compiles on CUDA under 2.11 (tests/test_cuda_kernels.py).
OLD_CPU_INDUCTOR = pytest.mark.xfail(torch.__version__ < (2, 13), raises=torch._inductor.exc.InductorError,
                                     reason="torch < 2.13: C++ inductor's division by a zero size hint")


def tiny(backend):
    torch.manual_seed(0)
    return GPT(ModelConfig(num_layers=2, hidden_size=32, num_heads=2, ffn_hidden_size=32),
               MoEConfig(num_experts=4, top_k=2, backend=backend, **BACKENDS[backend]), 64, 16)


@pytest.mark.parametrize("backend", PARAMS)
def test_block_has_no_graph_break(backend):
    model = tiny(backend)
    torch._dynamo.reset()
    torch._dynamo.config.capture_scalar_outputs = True
    explained = torch._dynamo.explain(model.blocks[0])(torch.randn(2, 16, 32))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=OLD_CPU_INDUCTOR), *PARAMS[1:]])
def test_compiled_training_steps_equal_eager(backend):
    """Three AdamW steps of the tiny model, eager and with compiled blocks: the same losses, and the same
    gradients of the first step."""
    tokens = torch.randint(0, 64, (3, 4, 17), generator=torch.Generator().manual_seed(1))
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny(backend)
        if compiled:
            model.compile_blocks()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, grads = [], None
        for batch in tokens:
            loss, _ = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), grads))
    (eager, eager_grads), (comp, comp_grads) = runs
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    for name, want in eager_grads.items():
        torch.testing.assert_close(comp_grads[name], want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_sinkhorn_router_has_no_graph_break():
    """The paper configs compile their blocks with the Sinkhorn-balanced pick and the fp32 router (an autocast
    region turned off inside the block)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=1, hidden_size=32, num_heads=2, ffn_hidden_size=32),
                MoEConfig(num_experts=4, top_k=1, backend="grouped", router=RouterConfig(sinkhorn_iters=3)), 64, 16)
    torch._dynamo.reset()
    torch._dynamo.config.capture_scalar_outputs = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model.blocks[0])(torch.randn(2, 16, 32))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
