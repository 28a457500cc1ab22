"""An AGSER facts world end to end: build, teach the tiny model the known facts, evaluate.

    .venv/bin/python benchmarks/agser_facts.py [--world books|countries] [--known N] [--unknown N]
                                               [--phrasings P] [--epochs E] [--frac F] [--seed S]
                                               [--attention-dropout P] [--out DIR]

1. `r1ray facts-world`: "countries" (invented countries' capital, language and currency; 16 known
   + 16 unknown, each known fact in 4 phrasings) or "books" (invented titles' two-word authors,
   the paper's Books set in miniature; 96 known + 96 unknown, 1 phrasing);
2. `r1ray init-model --preset tiny` and `r1ray sft` (lr 1e-3, 30 warmup steps) on the known facts;
3. `r1ray agser-eval`: AUC of AGSER (attention and value variants), r_att alone and the
   self-consistency baseline (n = 20), and model calls per query.
Prints one JSON object (the agser-eval result without per-row data, plus the SFT summary).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness import scratch_dir   # benchmarks/ is the script's directory


# per world: entities, phrasings per known fact, SFT epochs (both reach train NLL < 0.01)
DEFAULTS = {"countries": dict(known=16, unknown=16, phrasings=4, epochs=80, attention_dropout=0.0),
            "books": dict(known=96, unknown=96, phrasings=1, epochs=160, attention_dropout=0.0)}


def r1ray(*args: str) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "r1ray"), *args], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="books", choices=sorted(DEFAULTS))
    p.add_argument("--known", type=int, default=None)
    p.add_argument("--unknown", type=int, default=None)
    p.add_argument("--phrasings", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--frac", type=float, default=2 / 3)
    p.add_argument("--attention-dropout", type=float, default=None, help="SFT attention dropout")
    p.add_argument("--seed", type=int, default=0, help="world and SFT seed")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    for key, value in DEFAULTS[args.world].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out or scratch_dir("agser_facts_"))
    r1ray("facts-world", "--world", args.world, "--out", str(out / "data"), "--known", str(args.known),
          "--unknown", str(args.unknown), "--phrasings", str(args.phrasings), "--seed", str(args.seed))
    r1ray("init-model", "--preset", "tiny", "--out", str(out / "base"))
    sft = json.loads(r1ray("sft", "--model", str(out / "base"), "--data", str(out / "data" / "sft.jsonl"),
                           "--out", str(out / "sft"), "--epochs", str(args.epochs), "--lr", "1e-3",
                           "--warmup-steps", "30", "--attention-dropout", str(args.attention_dropout),
                           "--seed", str(args.seed)))
    r1ray("agser-eval", "--model", str(out / "sft"), "--data", str(out / "data" / "eval.jsonl"),
          "--frac", str(args.frac), "--out", str(out / "agser.json"))
    result = json.loads((out / "agser.json").read_text())
    result.pop("per_row")
    result["world"] = {k: getattr(args, k) for k in ("world", "known", "unknown", "phrasings", "epochs", "frac",
                                                     "attention_dropout", "seed")}
    result["sft"] = {k: sft[k] for k in ("rows", "steps", "nll_first", "nll_last", "seconds")}
    result["goals"] = {"auc_agser_ge_0.75": max(result["auc"]["agser_attention"], result["auc"]["agser_value"]) >= 0.75
                       if result["auc"] else None,
                       "calls_le_one_third_of_baseline": result["calls_ratio_agser_vs_baseline"] <= 1 / 3}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
