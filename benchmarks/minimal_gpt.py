"""The baseline of benchmarks/bench_e2e.py: a minimal GPT in plain PyTorch, with the sizes of one of our configs.

    python3 benchmarks/minimal_gpt.py --config configs/transformer_xs.yaml --vocab 51200 --micro-batch 64

Learned positions, pre-norm blocks (LayerNorm, causal SDPA attention, GELU MLP), tied head, F.cross_entropy on
the logits; bf16 autocast, fused AdamW, the whole model torch.compile'd; random tokens. What a user could write
in an afternoon: our trainer should beat it. Prints one JSON line: tokens/s (median over the log intervals after
the first), step time, peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.config import load_config  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc1, self.fc2 = nn.Linear(d, ffn, bias=False), nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class MinimalGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int, ffn: int, std: float):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=std)

    def forward(self, tokens, targets):
        x = self.embed(tokens) + self.pos.weight[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.embed.weight.t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/transformer_xs.yaml", help="whose model and sequence sizes to use")
    p.add_argument("--vocab", type=int, default=51200)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-interval", type=int, default=20)
    args = p.parse_args()
    cfg = load_config(args.config)
    m, S = cfg.model, cfg.data.seq_length
    torch.manual_seed(0)
    model = MinimalGPT(args.vocab, S, m.hidden_size, m.num_layers, m.num_heads, m.ffn, m.init_std).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=True)
    step = torch.compile(model)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, S + 1), device="cuda")
    times, tick = [], time.perf_counter()
    for i in range(1, args.steps + 1):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % args.log_interval == 0:
            torch.cuda.synchronize()
            times.append((time.perf_counter() - tick) / args.log_interval)
            tick = time.perf_counter()
    step_s = statistics.median(times[1:] or times)
    print(json.dumps({"config": f"minimal GPT ({os.path.basename(args.config)} sizes)", "step_time_s": step_s,
                      "tokens_per_s": args.micro_batch * S / step_s, "final_loss": loss.item(),
                      "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}))


if __name__ == "__main__":
    main()
