"""Prompt sets for training and evaluation: a generated arithmetic task and jsonl files.

Every example is {"prompt": str, "answer": str} (answer: the reference the verifier compares
with). Prompts for step t are a pure function of (seed, t), so a resumed run sees exactly
the data order of an uninterrupted one.
"""
from __future__ import annotations

import json
import re
import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Dataset:
    """Examples plus the bad rows that were skipped (line number, reason)."""

    examples: list[dict]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def arithmetic_examples(a_max: int, b_max: int, ops: list[str], a_min: int = 0, b_min: int = 0) -> list[dict]:
    """Every a OP b with a_min <= a <= a_max, b_min <= b <= b_max (negative results excluded), in order.

    With a_max 99 and b_max 9, a held-out problem is new as a whole but made of parts seen in
    training (the units-digit sums and the carry), so a small model can generalise to it.
    """
    out = []
    for op in ops:
        for a in range(a_min, a_max + 1):
            for b in range(b_min, b_max + 1):
                value = {"+": a + b, "-": a - b, "*": a * b}[op]
                if value >= 0:
                    worked = column_addition(a, b) if op == "+" else f"{a} {op} {b} = {value}"
                    out.append({"prompt": f"What is {a} {op} {b}?", "answer": str(value),
                                "worked": worked})
    return out


def column_addition(a: int, b: int) -> str:
    """Written addition, units first: 37 + 5 -> "7 + 5 = 12 , 3 + 1 = 4" (the carry is added)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + (["1"] if carry else [])
        total = sum(int(t) for t in terms)
        steps.append(f"{' + '.join(terms)} = {total}")
        carry = total // 10
    return " , ".join(steps)


def split_heldout(examples: list[dict], heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split into (train, held-out); held-out prompts never appear in training."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if heldout >= len(examples):
        raise ValueError(f"heldout ({heldout}) must be smaller than the task ({len(examples)} examples)")
    held = [examples[i] for i in order[:heldout]]
    train = [examples[i] for i in order[heldout:]]
    return train, held


def split_gsm8k_answer(answer: str) -> dict:
    """GSM8K's "reasoning ... #### 18" -> {"answer": "18", "worked": reasoning without the
    <<calculator>> annotations}; any other answer is kept as it is."""
    head, sep, final = answer.rpartition("####")
    if not sep or not final.strip():
        return {"answer": answer.strip()}
    worked = " ".join(re.sub(r"<<[^>]*>>", "", head).split())
    return {"answer": final.strip().replace(",", ""), **({"worked": worked} if worked else {})}


def load_jsonl(path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer",
               max_prompt_chars: int = 8192, general: bool = False) -> Dataset:
    """Read {"prompt", "answer"} rows (GSM8K's "question"/"answer" also accepted).

    general: rows are prompts without a verifiable answer (all-scenario RL); an answer is not
    read, and examples carry answer None. A bad row (not UTF-8, not JSON, missing or empty
    fields, too long) is counted and skipped with its line number; it never stops the run.
    """
    examples, skipped = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                skipped.append((lineno, f"not UTF-8 ({err.reason} at byte {err.start})"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                skipped.append((lineno, f"not JSON ({err.msg})"))
                continue
            if not isinstance(row, dict):
                skipped.append((lineno, "not a JSON object"))
                continue
            prompt = row.get(prompt_key, row.get("question"))
            answer = row.get(answer_key)
            if not isinstance(prompt, str) or not prompt.strip():
                skipped.append((lineno, f"missing or empty '{prompt_key}'"))
                continue
            if general:
                answer = None
            elif not isinstance(answer, str | int | float) or not str(answer).strip():
                skipped.append((lineno, f"missing or empty '{answer_key}'"))
                continue
            if len(prompt) > max_prompt_chars:
                skipped.append((lineno, f"prompt too long ({len(prompt)} > {max_prompt_chars} chars)"))
                continue
            examples.append({"prompt": prompt, **({"answer": None} if general else split_gsm8k_answer(str(answer)))})
    return Dataset(examples, skipped)


def step_prompts(examples: list[dict], step: int, count: int, seed: int) -> list[dict]:
    """The `count` examples of training step `step`: epochs of seeded shuffles, drawn in order."""
    n = len(examples)
    orders: dict[int, list[int]] = {}
    out = []
    for k in range(step * count, (step + 1) * count):
        epoch, pos = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        out.append(examples[orders[epoch][pos]])
    return out


def worked_example(ex: dict) -> str:
    """An R1-format completion for cold-start SFT: the worked step, then the answer."""
    return f"<think> {ex.get('worked', ex['answer'])} </think> <answer> {ex['answer']} </answer>"
