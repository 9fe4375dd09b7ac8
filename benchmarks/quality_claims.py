"""The seed papers' claims (issue 16, item 5), each judged on runs of benchmarks/quality.py and drawn in one figure.

    python benchmarks/quality_claims.py runs/quality --out benchmarks/results/quality-claims
    python benchmarks/quality_claims.py runs/quality runs/quality-long --out figures   # several grids

Each RUN_ROOT is a quality.py --run-root: one folder per run, grouped into variants as scripts/plot_runs.py does
(top2-cf1-s1 and top2-cf1-s2 make top2-cf1). A claim is judged on every root that holds all its variants:
- "lower loss" claims compare the final validation loss of a candidate with its baseline's, seed by seed (a seed
  fixes the validation samples and the data order, so the pair differs only in the variant): the claim is
  confirmed when the candidate is lower for every seed, refuted when higher for every seed, else undecided.
- "fewer steps" claims (SparseMixer) take the baseline's final mean validation loss as the target and count the
  steps the candidate's mean curve needs to reach it: the ratio baseline steps / candidate steps is the speed-up.
Writes <out>/claims.md (one row per claim and root: the numbers and the verdict) and <out>/<claim>-<root>.png
(validation loss against tokens of the claim's variants, mean over seeds and the min-max band).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts import plot_runs  # noqa: E402


@dataclass(frozen=True)
class Claim:
    name: str
    text: str  # the claim and its source
    pairs: tuple[tuple[str, str], ...]  # (baseline, candidate) variant names
    kind: str = "lower loss"  # or "fewer steps"


CLAIMS = (
    Claim("moe-vs-dense", "MoE top-1 < dense at equal FLOPs per token (MegaBlocks, Switch)",
          (("dense", "top1-dropless"),)),
    Claim("dropless-vs-capacity", "dropless < capacity factor 1 (MegaBlocks Fig. 2)",
          (("top1-cf1", "top1-dropless"), ("top2-cf1", "top2-dropless"))),
    Claim("rectify", "Rectify-Router (intra + fill) < vanilla top-2 at capacity factor 1 (seed 003)",
          (("top2-cf1", "top2-cf1-rectify"),)),
    Claim("sparsemixer", "SparseMixer reaches the vanilla router's loss in fewer steps (seed 004: up to 2x)",
          (("top1-dropless", "top1-sparsemixer"), ("top2-dropless", "top2-sparsemixer")), "fewer steps"),
)


def final_by_seed(variant: plot_runs.Variant) -> dict[int, float]:
    """seed -> validation loss at the last step every seed of the variant validated."""
    final = plot_runs.val_curve(variant)["per_run"][:, -1]
    return {run.seed: float(loss) for run, loss in zip(variant.runs, final)}


def compare_loss(base: plot_runs.Variant, cand: plot_runs.Variant) -> dict:
    """Candidate minus baseline final validation loss, per shared seed and its mean; the verdict."""
    b, c = final_by_seed(base), final_by_seed(cand)
    seeds = sorted(set(b) & set(c))
    if not seeds:
        raise plot_runs.RunError(f"{base.name} and {cand.name} share no seed; run both with the same train.seed")
    deltas = [c[s] - b[s] for s in seeds]
    verdict = "confirmed" if max(deltas) < 0 else "refuted" if min(deltas) > 0 else "undecided (within the spread)"
    return {"seeds": seeds, "base_loss": float(np.mean([b[s] for s in seeds])),
            "cand_loss": float(np.mean([c[s] for s in seeds])), "deltas": deltas, "verdict": verdict}


def steps_to(curve: dict, target: float) -> int | None:
    """The first step at which the mean validation loss is at or below target (None: never)."""
    hit = np.nonzero(curve["mean"] <= target)[0]
    return int(curve["step"][hit[0]]) if len(hit) else None


def compare_steps(base: plot_runs.Variant, cand: plot_runs.Variant) -> dict:
    bc, cc = plot_runs.val_curve(base), plot_runs.val_curve(cand)
    target = float(bc["mean"][-1])
    base_steps, cand_steps = steps_to(bc, target), steps_to(cc, target)
    speedup = base_steps / cand_steps if cand_steps else None
    verdict = ("refuted (never reaches the target)" if speedup is None else
               "confirmed" if speedup > 1 else "refuted")
    return {"seeds": cand.seeds, "target": target, "baseline_steps": base_steps, "candidate_steps": cand_steps,
            "speedup": speedup, "verdict": verdict}


def judge(roots: list[Path], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for root in roots:
        runs = [plot_runs.load_run(d) for d in sorted(root.iterdir()) if (d / "config.yaml").exists()]
        variants = {v.name: v for v in plot_runs.group_runs(runs)}
        for claim in CLAIMS:
            names = list(dict.fromkeys(n for pair in claim.pairs for n in pair))
            if not all(n in variants for n in names):
                continue
            compare = compare_steps if claim.kind == "fewer steps" else compare_loss
            for base, cand in claim.pairs:
                rows.append({"claim": claim.name, "text": claim.text, "root": str(root), "baseline": base,
                             "candidate": cand, **compare(variants[base], variants[cand])})
            curves = [(variants[n], plot_runs.val_curve(variants[n])) for n in names]
            plot_runs.plot_bands(curves, "tokens", out / f"{claim.name}-{plot_runs.file_name(root.name)}.png",
                                 "tokens seen", "validation loss", claim.text)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| claim | runs | baseline -> candidate | seeds | result | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "speedup" in r:
            ratio = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            result = (f"target {r['target']:.4f} (baseline's final): baseline {r['baseline_steps']} steps, "
                      f"candidate {r['candidate_steps'] or 'never'}; speed-up {ratio}")
        else:
            per_seed = ", ".join(f"{d:+.4f}" for d in r["deltas"])
            result = (f"{r['base_loss']:.4f} -> {r['cand_loss']:.4f} "
                      f"({r['cand_loss'] - r['base_loss']:+.4f}; per seed {per_seed})")
        lines.append(f"| {r['claim']} | {Path(r['root']).name} | {r['baseline']} -> {r['candidate']} | "
                     f"{','.join(map(str, r['seeds']))} | {result} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", type=Path, metavar="RUN_ROOT", help="quality.py --run-root folders")
    p.add_argument("--out", type=Path, required=True, help="folder for claims.md and the figures")
    args = p.parse_args(argv)
    try:
        rows = judge(args.roots, args.out)
    except plot_runs.RunError as e:
        print(f"quality_claims: {e}", file=sys.stderr)
        return 1
    if not rows:
        print(f"quality_claims: no root holds all the variants of any claim ({', '.join(c.name for c in CLAIMS)})",
              file=sys.stderr)
        return 1
    text = table(rows)
    (args.out / "claims.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
