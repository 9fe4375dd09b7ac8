"""Rectify-Router on hand-worked slot tables (moe/rectify.py documents the rules), and through the capacity
step and the padded experts. Expert parallelism: tests/test_parallel.py (`rectify_*` checks)."""
import pytest
import torch

from moe.config import CapacityConfig
from moe.experts import backend_class
from moe.rectify import rectify as _rectify
from moe_helpers import make_routing, run_experts
from parallel.comm import Peers


def rectify(logits, ids, keep, fill, C, policy, intra, fill_in, capped=False, local=None):
    """One process; `local` the experts IR may choose (default: all)."""
    local = torch.ones(logits.shape[1], dtype=torch.bool) if local is None else torch.tensor(local)
    return _rectify(logits, ids, keep, fill, C, policy, local, Peers(), intra, capped, fill_in)

D, F = 8, 12


class Padded:
    """The capacity step with Rectify-Router and the padded experts, as the MoE layer runs them."""

    def __init__(self, E, renormalize=False, **kw):
        self.cfg = CapacityConfig(min=1, factor=1.0, **kw)
        self.renormalize = renormalize
        torch.manual_seed(0)
        self.experts = backend_class("padded")(E, D, F, "gelu", 0.3, 0.3).double()
        self.expert_mlp, self.w1 = self.experts.expert_mlp, self.experts.w1

    def __call__(self, x, routing):
        return run_experts(self.experts, x, routing, self.cfg, self.renormalize)


def routing_from_logits(logits, k):
    logits = torch.tensor(logits, dtype=torch.float64) if not torch.is_tensor(logits) else logits
    probs = logits.softmax(-1)
    w, ids = probs.topk(k, -1)
    return make_routing(ids, w, logits.shape[1], probs, logits)


# T=4, E=3, k=1, cf=1: C = ceil(4/3) = 2. Top-1: t0, t1, t2 -> e0 (t2 dropped by position), t3 -> e1.
# Slots used after top-1: e0 2/2, e1 1/2, e2 0/2.
# IR: t2 goes to its best expert outside its top-1: e1 (2.5), weight 1 x p21.
# FR: (k+1)-th choices: t0 -> e1 (score 2), t1 -> e2 (2), t2 -> e1 (already placed there by IR: skipped),
#     t3 -> e2 (1). The paper's IR takes no slot: e1 keeps 1 free slot for t0, e2 takes t1 and t3.
#     Capped IR took e1's last slot: t0 gets nothing.
LOGITS = [[3.0, 2.0, 1.0], [3.0, 1.0, 2.0], [3.0, 2.5, 0.0], [0.0, 3.0, 1.0]]


@pytest.mark.parametrize("capped, fr", [(False, [1, 1, 0, 1]), (True, [0, 1, 0, 1])])
def test_slot_table_hand_worked(capped, fr):
    r = routing_from_logits(LOGITS, 1)
    keep = torch.tensor([[True], [True], [False], [True]])
    out = rectify(r.logits, r.expert_ids, keep, torch.tensor([2, 1, 0]), 2, "position", True, True, capped)
    assert out.weight[:, 0].tolist() == [0, 0, 1, 0] and out.expert[2, 0] == 1  # IR: only t2, into e1
    assert out.weight[:, 1].tolist() == fr
    assert out.expert[1, 1] == 2 and out.expert[3, 1] == 2 and out.expert[0, 1] == 1


def test_paper_ir_rescues_every_dropped_assignment_capped_only_free_slots():
    # T=6, E=2, k=1, C=2: all six tokens chose e0, four are dropped; e1 has 2 free slots. The paper's IR sends all
    # four to e1 (no capacity on IR); the capped variant only the first two in token order.
    logits = torch.tensor([[2.0, 1.0]] * 6, dtype=torch.float64)
    ids = torch.zeros(6, 1, dtype=torch.int64)
    keep = torch.tensor([[True], [True], [False], [False], [False], [False]])
    paper = rectify(logits, ids, keep, torch.tensor([2, 0]), 2, "position", True, False)
    assert paper.weight[:, 0].tolist() == [0, 0, 1, 1, 1, 1] and paper.expert[2:, 0].tolist() == [1] * 4
    capped = rectify(logits, ids, keep, torch.tensor([2, 0]), 2, "position", True, False, capped=True)
    assert capped.weight[:, 0].tolist() == [0, 0, 1, 1, 0, 0]
    # top-2 with every slot full: capped IR rescues nothing, the paper's IR takes the token's 3rd-best expert
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5]], dtype=torch.float64)
    ids, keep = torch.tensor([[0, 1]]), torch.tensor([[False, True]])
    full = torch.tensor([1, 1, 1, 1])
    assert rectify(logits, ids, keep, full, 1, "position", True, False, capped=True).weight.sum() == 0
    out = rectify(logits, ids, keep, full, 1, "position", True, False)
    assert out.weight[0].tolist() == [1, 0] and out.expert[0, 0] == 2


def test_ir_only_local_experts():
    # experts 0, 1 on this GPU (2, 3 elsewhere): t0 lost e0, its best outside the top-1 is e2 (not here) -> e1.
    # At top-2 (e0, e1), nothing local is left outside the top-k.
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0], [4.0, 3.0, 2.0, 0.0]], dtype=torch.float64)
    out = rectify(logits, torch.tensor([[0], [0]]), torch.tensor([[False], [True]]), torch.tensor([1, 0, 0, 0]), 1,
                  "position", True, False, local=[True, True, False, False])
    assert out.weight[:, 0].tolist() == [1, 0] and out.expert[0, 0] == 1
    everywhere = rectify(logits, torch.tensor([[0], [0]]), torch.tensor([[False], [True]]),
                         torch.tensor([1, 0, 0, 0]), 1, "position", True, False)
    assert everywhere.expert[0, 0] == 2  # one process: every expert is local
    k2 = rectify(logits, torch.tensor([[0, 1], [0, 1]]), torch.tensor([[False, True], [False, False]]),
                 torch.tensor([1, 1, 0, 0]), 1, "position", True, False, local=[True, True, False, False])
    assert k2.weight.sum() == 0  # no local expert outside the top-2: the lost assignments stay dropped


@pytest.mark.parametrize("capped", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
def test_padded_output_with_ir_and_fr(renormalize, capped):
    e = Padded(3, rectify_intra=True, rectify_intra_capped=capped, rectify_fill=True, renormalize=renormalize)
    r = routing_from_logits(LOGITS, 1)
    x = torch.randn(4, D, dtype=torch.float64)
    y, dropped = e(x, r)
    assert dropped.item() == 0  # t2's lost assignment was rescued by IR
    p = r.probs
    mlp = e.expert_mlp
    t0 = [(p[0, 0], mlp(x[0:1], 0))] + ([] if capped else [(p[0, 1], mlp(x[0:1], 1))])  # FR, see above
    parts = [t0, [(p[1, 0], mlp(x[1:2], 0)), (p[1, 2], mlp(x[1:2], 2))],
             [(p[2, 1], mlp(x[2:3], 1))], [(p[3, 1], mlp(x[3:4], 1)), (p[3, 2], mlp(x[3:4], 2))]]
    for t, terms in enumerate(parts):
        total = sum(w for w, _ in terms) if renormalize else 1.0
        torch.testing.assert_close(y[t:t + 1], sum(w / total * out for w, out in terms))


def test_fill_only_and_intra_only():
    r = routing_from_logits(LOGITS, 1)
    x = torch.randn(4, D, dtype=torch.float64)
    e = Padded(3, rectify_fill=True)
    y, dropped = e(x, r)
    assert dropped.item() == 1  # t2's top-1 stays dropped without IR...
    # ...but FR gives it its 2nd choice: e1 has one free slot, candidates t0 (score 2) and t2 (2.5) -> t2
    p = r.probs
    torch.testing.assert_close(y[2:3], p[2, 1] * e.expert_mlp(x[2:3], 1))
    torch.testing.assert_close(y[0:1], p[0, 0] * e.expert_mlp(x[0:1], 0))
    for capped in (False, True):
        e = Padded(3, rectify_intra=True, rectify_intra_capped=capped)
        y, dropped = e(x, r)
        assert dropped.item() == 0
        torch.testing.assert_close(y[1:2], p[1, 0] * e.expert_mlp(x[1:2], 0))  # no fill-in
        torch.testing.assert_close(y[2:3], p[2, 1] * e.expert_mlp(x[2:3], 1))  # IR


def test_padded_paper_ir_beyond_capacity():
    # all 6 tokens on e0 (C = ceil(6/3) = 2 at cf 1): 4 dropped, all rescued into e1, which then computes 4 rows
    # > C (the padded buffer is sized dynamically); every token's output is its expert's MLP times its probability
    e = Padded(3, rectify_intra=True)
    r = routing_from_logits([[2.0, 1.0 + 0.1 * t, 0.0] for t in range(6)], 1)
    x = torch.randn(6, D, dtype=torch.float64)
    y, dropped = e(x, r)
    assert dropped.item() == 0
    p = r.probs
    for t in range(6):
        torch.testing.assert_close(y[t:t + 1], p[t, int(t >= 2)] * e.expert_mlp(x[t:t + 1], int(t >= 2)))


def test_capped_ir_one_round_priority():
    # T=4, E=3, k=1, C=2: e0 got t0..t3 and dropped t2, t3; e1 has one free slot, e2 none; both propose e1.
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 2.0, 1.0], [5.0, 3.0, 1.0]], dtype=torch.float64)
    ids = torch.zeros(4, 1, dtype=torch.int64)
    keep = torch.tensor([[True], [True], [False], [False]])
    fill = torch.tensor([2, 1, 2])  # e1 has one free slot, e2 none
    pos = rectify(logits, ids, keep, fill, 2, "position", True, False, capped=True)
    assert pos.weight[:, 0].tolist() == [0, 0, 1, 0]  # token order: t2 wins, t3 stays dropped
    prob = rectify(logits, ids, keep, fill, 2, "bpr", True, False, capped=True)
    assert prob.weight[:, 0].tolist() == [0, 0, 0, 1]  # higher score: t3 wins
    assert pos.expert[2, 0] == prob.expert[3, 0] == 1


def test_k2_multiplicity_and_k_equals_e():
    # k=2: a token that lost both assignments gets one IR expert weighted twice (eq. A4)
    logits = torch.tensor([[4.0, 3.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 1]])
    out = rectify(logits, ids, torch.tensor([[False, False]]), torch.tensor([1, 1, 0]), 1, "position", True, True)
    assert out.weight.tolist() == [[2.0, 0.0]] and out.expert[0, 0] == 2  # e2; FR skips (same expert)
    # k = E: no expert outside the top-k, nothing to do
    out = rectify(logits, torch.tensor([[0, 1, 2]]), torch.tensor([[True, False, True]]), torch.tensor([1, 1, 0]),
                  1, "position", True, True)
    assert out.weight.sum() == 0


def test_rectify_gradients_reach_router_probs_and_experts():
    e = Padded(3, rectify_intra=True, rectify_fill=True)
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    r = routing_from_logits(logits, 1)
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    y, _ = e(x, r)
    y.sum().backward()
    assert logits.grad[2].abs().sum() > 0 and x.grad[2].abs().sum() > 0  # the rescued token
    assert e.w1.grad[2].abs().sum() > 0  # the expert that only received fill-ins


def test_study_script_smoke(tmp_path):
    """benchmarks/rectify_study.py at toy size, one run: it trains, counts IR's rescues and FR's fills, and writes
    its table (the study itself is a GPU measurement)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks/rectify_study.py"), "--smoke", "--factors", "0.5",
                           "--top-k", "1", "--variants", "IR+FR", "--run-root", str(tmp_path / "runs"),
                           "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(next(tmp_path.glob("*-rectify-study-smoke.json")).read_text())["rows"]
    assert row["dropped_before"] > 0 and row["ir_rescued"] == 1 and row["dropped_after"] == 0
    assert row["final_loss"] > 0 and next(tmp_path.glob("*-rectify-study-smoke.md")).read_text().count("| 0.5 |") == 1
