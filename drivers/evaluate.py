"""Evaluation as the R1 paper reports it: pass@1 over k samples, unbiased pass@k, cons@k, length.

The metrics are pure functions; `run_eval` samples with a vLLM rollout worker and scores with the
reward verifiers (all on Ray).
"""
from __future__ import annotations

import time
from collections import Counter
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) from n samples of which c are correct (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - comb(n - c, k) / comb(n, k)


def normalize_answer(answer: str | None) -> str | None:
    """Canonical form for voting: plain numbers as exact fractions ('18.0' == '18'), else stripped text."""
    from actors.rewards import _as_number

    if answer is None or not answer.strip():
        return None
    number = _as_number(answer)
    return f"num:{number}" if number is not None else " ".join(answer.split())


def majority_vote(answers: list[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote; ties go to the answer seen first.

    Unparseable answers (None) do not vote; None when no sample has an answer.
    """
    keys = [normalize_answer(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)


def summarize_eval(per_prompt: list[list[dict]], ks: list[int]) -> dict:
    """Metrics from, per prompt, k samples {"correct": bool, "answer": str|None, "length": int}."""
    n_prompts = len(per_prompt)
    out = {"prompts": n_prompts, "samples_per_prompt": len(per_prompt[0]) if per_prompt else 0}
    out["pass@1"] = sum(sum(s["correct"] for s in p) / len(p) for p in per_prompt) / max(n_prompts, 1)
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(len(p), sum(s["correct"] for s in p), k) for p in per_prompt) / max(n_prompts, 1)
    cons = 0
    for p in per_prompt:
        winner = majority_vote([s["answer"] for s in p])
        cons += winner is not None and p[winner]["correct"]
    out[f"cons@{out['samples_per_prompt']}"] = cons / max(n_prompts, 1)
    lengths = [s["length"] for p in per_prompt for s in p]
    out["mean_length"] = sum(lengths) / max(len(lengths), 1)
    out["format"] = sum(s.get("format", 0.0) for p in per_prompt for s in p) / max(len(lengths), 1)
    out["language"] = sum(s.get("language", 1.0) for p in per_prompt for s in p) / max(len(lengths), 1)
    return out


def run_eval(model: str, data: str, *, k: int = 8, temperature: float = 0.6, top_p: float = 0.95,
             max_tokens: int = 256, limit: int | None = None, seed: int = 0, dtype: str = "float32",
             max_model_len: int = 2048, verifier_timeout_s: float = 5.0, layout: str = "r1",
             target_language: str = "en", cpu_threads: int = 0, extraction: str = "tags") -> dict:
    """Sample k answers per prompt of `data` ({"prompt", "answer"} jsonl) and compute the metrics.

    cpu_threads: CPU only, the engine's OpenMP threads (0: all cores).
    layout: the format the format rate checks ("r1" or "cold_start").
    extraction: where answers are read ("tags", or "last_number" as a fallback; see final_answer).
    """
    import ray

    from actors.rewards import RewardWorker, final_answer
    from drivers.config import build_config
    from drivers.ray_utils import ActorGroup, init_ray, rollout_worker_actor
    from drivers.tasks import load_jsonl

    dataset = load_jsonl(data)
    for lineno, why in dataset.skipped[:20]:
        print(f"skipped data row {lineno}: {why}")
    examples = dataset.examples[:limit] if limit else dataset.examples
    if not examples:
        raise ValueError(f"{data}: no usable rows ({len(dataset.skipped)} skipped)")
    from transformers import AutoTokenizer

    from actors.prompts import prompt_ids

    prompt_ids(AutoTokenizer.from_pretrained(model), examples[0]["prompt"])  # a bad template fails before Ray
    t0 = time.perf_counter()
    init_ray()
    cfg = build_config({"model": {"dtype": dtype}, "rollout": {
        "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "max_model_len": max_model_len,
        "cpu_threads": cpu_threads}})
    worker = rollout_worker_actor(model, cfg)
    scorers = ActorGroup(RewardWorker, 1, name="reward", kwargs_fn=lambda r, a, p: dict(
        timeout_s=verifier_timeout_s, layout=layout, target_language=target_language, extraction=extraction,
        weights={"accuracy": 1.0, "format": 0.0, "language": 0.0}))
    try:
        rollouts = ray.get(worker.generate.remote([e["prompt"] for e in examples], n=k, seed=seed))
        results = ray.get(scorers.actors[0].score.remote([r.text for r in rollouts],
                                                         [examples[r.prompt_index]["answer"] for r in rollouts]))
    finally:
        ray.kill(worker)
        scorers.kill()
    per_prompt = [[] for _ in examples]
    for r, res in zip(rollouts, results):
        per_prompt[r.prompt_index].append({
            "correct": res.status == "ok" and res.components.get("accuracy", 0.0) == 1.0,
            "answer": final_answer(r.text, extraction), "length": len(r.completion_ids),
            "format": res.components.get("format", 0.0), "language": res.components.get("language", 1.0),
            "status": res.status})
    ks = sorted({1, *[x for x in (2, 4, 8, 16, 32, 64) if x <= k], k})
    out = summarize_eval(per_prompt, [x for x in ks if x > 1])
    out.update(verifier_failures=sum(s["status"] != "ok" for p in per_prompt for s in p),
               skipped_rows=len(dataset.skipped), temperature=temperature, top_p=top_p,
               seconds=round(time.perf_counter() - t0, 1))
    return out


def format_eval(metrics: dict) -> str:
    """A two-column table of the metrics."""
    return "\n".join(f"{k:<20s} {v:>10.4f}" if isinstance(v, float) else f"{k:<20s} {v!s:>10s}"
                     for k, v in metrics.items())

