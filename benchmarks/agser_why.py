"""Why AGSER separates some facts sets and not others: what the attentive re-query does.

    .venv/bin/python benchmarks/agser_why.py [--model DIR] [--sets element_symbol ...] [--sample 100]
                                             [--max-tokens 32] [--unit word|token]

The same rows as `agser_real.py --sample N` (drawn with seed 0), scored by one JudgeWorker
(attention variant, all layers). Per set and label (correct / hallucinated): how often the
re-query on X_att gives the greedy answer word for word, mean r_att and r_non_att, the most
common X_non_att; then the AUC of the paper's score against two other comparisons the paper
leaves open: Rouge-L on the first sentence only, and with the question's own words removed
from both answers (an echoed question inflates Rouge-L for right and wrong answers alike).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
from pathlib import Path

from harness import scratch_dir   # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]


def sample_rows(name: str, n: int | None) -> list[dict]:
    lines = (ROOT / "data" / "facts" / f"{name}.jsonl").read_text().splitlines()
    if n and n < len(lines):
        lines = [lines[i] for i in sorted(random.Random(0).sample(range(len(lines)), n))]
    return [json.loads(line) for line in lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct from its package)")
    ap.add_argument("--sets", nargs="+", default=["element_symbol", "country_currency", "country_language"])
    ap.add_argument("--sample", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--unit", default="word", choices=["word", "token"])
    a = ap.parse_args()

    import ray

    from actors.agser import _WORD, JudgeWorker, answer_text, roc_auc, rouge_l
    from drivers.agser_eval import answer_span, judge_rows
    from drivers.models import init_model
    from drivers.ray_utils import ActorGroup, init_ray

    model = a.model or str(init_model("smollm2-135m", scratch_dir("agser_why_") / "smollm2-135m"))
    threads = os.cpu_count() or 1
    init_ray()
    judges = ActorGroup(JudgeWorker, 1, name="judge", env={"OMP_NUM_THREADS": str(threads)},
                        kwargs_fn=lambda r, ad, p: dict(model_path=model, max_tokens=a.max_tokens, unit=a.unit,
                                                        cpu_threads=threads))
    result = {"model": model, "sample": a.sample, "max_tokens": a.max_tokens, "unit": a.unit, "sets": {}}
    try:
        for name in a.sets:
            rows = sample_rows(name, a.sample)
            scored = ray.get(judges.actors[0].score.remote([r["question"] for r in rows], variants=("attention",)))
            labels = judge_rows([s["answer"] for s in scored], rows)

            def without_question(text: str, question: str) -> str:
                asked = set(_WORD.findall(question.lower()))
                return " ".join(w for w in _WORD.findall(answer_span(text).lower()) if w not in asked)

            out, scores = {}, collections.defaultdict(list)
            for s, y, r in zip(scored, labels, rows):
                att, answer = s["attention"], s["answer"]
                scores["paper"].append(att["score"])
                scores["first_sentence"].append(rouge_l(answer_span(att["y_att"]), answer_span(answer))
                                                - rouge_l(answer_span(att["y_non_att"]), answer_span(answer)))
                q = r["question"]
                scores["question_words_removed"].append(
                    rouge_l(without_question(att["y_att"], q), without_question(answer, q))
                    - rouge_l(without_question(att["y_non_att"], q), without_question(answer, q)))
            for label, group in (("correct", 1), ("hallucinated", 0)):
                mine = [s["attention"] | {"answer": s["answer"]} for s, y in zip(scored, labels) if y == group]
                if mine:
                    out[label] = {
                        "rows": len(mine),
                        "requery_keeps_answer": round(statistics.mean(
                            answer_text(m["y_att"]).strip() == answer_text(m["answer"]).strip() for m in mine), 3),
                        "r_att_mean": round(statistics.mean(m["r_att"] for m in mine), 3),
                        "r_non_att_mean": round(statistics.mean(m["r_non_att"] for m in mine), 3)}
            out["x_non_att_most_common"] = collections.Counter(s["attention"]["x_non_att"].strip()
                                                               for s in scored).most_common(3)
            if 0 < sum(labels) < len(labels):
                out["auc"] = {k: round(roc_auc(v, labels), 3) for k, v in scores.items()}
            result["sets"][name] = out
            print(json.dumps({name: out}), flush=True)
    finally:
        judges.kill()
        ray.shutdown()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
