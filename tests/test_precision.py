"""bf16 working weights over fp32 masters (train/precision.py) and the clipping factor passed to a fused AdamW:
the update is fp32 AdamW on the fp32 sum of the micro-batches' bf16 gradients; checkpoints hold the masters and
resume exactly; a checkpoint moves between the master and the autocast modes."""
import copy

import torch
from torch import nn

from parallel.grads import GradSync
from parallel.state import ParallelState
from tests.test_checkpoint import make_trainer, resume_and_run
from train.precision import MasterWeights


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def test_update_is_fp32_adamw_on_the_fp32_sum_of_bf16_grads():
    ref, net = _net(), _net()
    params = list(net.parameters())
    weights = MasterWeights(params)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    micro = [torch.randn(5, 16) for _ in range(3)]
    want = [torch.zeros_like(p) for p in ref.parameters()]  # the fp32 sum of the bf16 gradients
    for x in micro:
        probe = copy.deepcopy(net)  # same bf16 weights, one micro-batch alone
        probe(x.bfloat16()).square().mean().backward()
        for w, p in zip(want, probe.parameters()):
            w += p.grad.float()
        net(x.bfloat16()).square().mean().backward()
        assert all(p.grad is None for p in params)  # folded into the fp32 main gradients
    for p, w in zip(params, want):
        assert weights.fold(p).dtype == torch.float32
        torch.testing.assert_close(weights.fold(p), w, rtol=0, atol=0)

    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for p, w in zip(ref.parameters(), want):
        p.grad = w.clone()
    ref_opt.step()
    with weights.masters():
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p, r in zip(params, ref.parameters()):  # the masters took exactly the fp32 update
            torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=0)
    for p, r in zip(params, ref.parameters()):  # the working copies are the masters rounded once
        assert p.dtype == torch.bfloat16 and p.grad is None
        assert torch.equal(p.detach(), r.detach().bfloat16())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_gradient_sync_reads_and_clips_the_main_gradients():
    net = _net()
    params = list(net.parameters())
    weights = MasterWeights(params)
    sync = GradSync(net, ParallelState())
    sync.read_grads_with(weights.fold)
    net(torch.randn(4, 16).bfloat16()).square().sum().backward()
    mains = [weights.fold(p).clone() for p in params]
    want = torch.linalg.vector_norm(torch.cat([m.flatten() for m in mains]))
    norm, factor = sync.finish(max_norm=0.25 * float(want), scale=False)
    torch.testing.assert_close(norm, want)
    torch.testing.assert_close(factor, 0.25 * want / (want + 1e-6))
    assert all(torch.equal(weights.fold(p), m) for p, m in zip(params, mains))  # scale=False: left as they are
    sync.clip(max_norm=0.25 * float(want))
    for p, m in zip(params, mains):
        torch.testing.assert_close(weights.fold(p), m * factor)


class _ClipFirstAdamW(torch.optim.AdamW):
    """The textbook order: the gradients multiplied by the clipping factor, then a plain (for-each) AdamW step;
    a step flagged non-finite is not taken."""

    def step(self):
        scale, found_inf = self.__dict__.pop("grad_scale"), self.__dict__.pop("found_inf")  # for-each takes neither
        if found_inf.item():
            return
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad.div_(scale)
        super().step()


def test_fused_adamw_clips_through_grad_scale(tmp_path):
    """The trainer hands the fused AdamW the clipping factor as grad_scale instead of scaling the gradients: the
    same parameters as clipping first."""
    a = make_trainer(tmp_path / "a", "train.clip_grad=0.05", "train.steps=3", "checkpoint.save=false")
    assert a.optimizer.defaults["fused"]
    ra = a.run()  # before b is built: the router's jitter draws from the global generator
    b = make_trainer(tmp_path / "b", "train.clip_grad=0.05", "train.steps=3", "checkpoint.save=false")
    t = b.cfg
    b.optimizer = _ClipFirstAdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                   for g in b.optimizer.param_groups], lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=t.adam_eps, foreach=True)
    b.run()
    assert ra[0]["grad_norm"] > 0.05  # the clip was active
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    unclipped = make_trainer(tmp_path / "c", "train.clip_grad=0", "train.steps=3", "checkpoint.save=false")
    unclipped.run()
    assert any((pa - pc).abs().max() > 1e-4 for pa, pc in zip(a.model.parameters(), unclipped.model.parameters()))


def test_checkpoint_holds_masters_and_resumes_exactly(tmp_path):
    bf16 = ("train.dtype=bf16", "moe.backend=reference")
    run = tmp_path / "run"
    _, straight = resume_and_run(run, *bf16)  # 12 steps, checkpoints at 9 and 12 kept
    step9 = run / "checkpoints" / "step-9"
    trainer = make_trainer(tmp_path / "resumed", *bf16)
    trainer.load_checkpoint(step9)
    masters = {}
    with trainer.master_weights():
        for name, p in trainer.model.named_parameters():
            assert p.dtype == torch.float32, f"{name}: the checkpoint's weights load into fp32 masters"
            masters[name] = p.detach().clone()
    for name, p in trainer.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), masters[name].bfloat16())
    rest = [r["loss"] for r in trainer.run()]
    assert rest == straight[9:]  # exact: same masters, moments and working copies after the resume
    # the same checkpoint in the autocast mode (fp32 weights): the masters are the weights
    fp32 = make_trainer(tmp_path / "fp32", *bf16, "train.master_weights=false")
    fp32.load_checkpoint(step9)
    for name, p in fp32.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), masters[name])
