"""The FLOPs formula reproduces the MegaBlocks paper's GFLOPs per sequence."""
import pytest

from train.config import load_config
from train.flops import flops_per_sequence, peak_flops


@pytest.mark.parametrize("size,gflops", [("xs", 316), ("small", 879), ("medium", 2487)])
def test_paper_gflops(size, gflops):
    for kind in ("moe", "transformer"):  # top-1 experts of width 4h cost what the dense MLP costs
        cfg = load_config(f"configs/{kind}_{size}.yaml")
        assert flops_per_sequence(cfg.model, cfg.moe, 51200, 1024) / 1e9 == pytest.approx(gflops, abs=0.5)


def test_top_k_and_swiglu_scale_only_the_mlp():
    cfg = load_config("configs/moe_xs.yaml")
    base = flops_per_sequence(cfg.model, cfg.moe, 51200, 1024)
    cfg.moe.top_k = 2
    h, s, L, f = 512, 1024, 6, 2048
    assert flops_per_sequence(cfg.model, cfg.moe, 51200, 1024) - base == pytest.approx(3 * s * L * 2 * 2 * h * f)


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(None) is None and peak_flops("Some CPU") is None
