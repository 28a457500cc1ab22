"""Supervised fine-tuning on {"prompt", "completion"} rows with the DeepSpeed learner on Ray.

Used by `r1ray sft` (cold start, rejection-sampling SFT, distillation, the AGSER facts world).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from actors.prompts import completion_ids, prompt_ids, prompt_text
from drivers.tasks import load_jsonl, step_prompts


def sft_rows(tokenizer, examples: list[dict], chat: bool = True) -> tuple[list[list[int]], list[int]]:
    """Token rows (prompt + completion + eos) and prompt lengths; chat=True renders the chat template."""
    rows, plens = [], []
    for ex in examples:
        if chat:
            prompt, rendered = prompt_ids(tokenizer, ex["prompt"]), prompt_text(tokenizer, ex["prompt"])
        else:
            prompt, rendered = tokenizer.encode(ex["prompt"], add_special_tokens=False), ex["prompt"]
        rows.append(prompt + completion_ids(tokenizer, rendered, ex["completion"]))
        plens.append(len(prompt))
    return rows, plens


def run_sft(model: str, data: str, out: str, *, epochs: float = 2.0, batch_size: int = 16, lr: float = 1e-4,
            warmup_steps: int = 0, seed: int = 0, chat: bool = True, num_ranks: int = 1, zero_stage: int = 2,
            dtype: str = "float32", micro_batch_tokens: int = 16384, attention_dropout: float = 0.0,
            cpu_threads: int = 0) -> dict:
    """Train `model` on the rows of `data` for `epochs` and save an HF model under `out`.

    cpu_threads: CPU only, torch threads per rank (0: cores / ranks).
    attention_dropout > 0: dropout on the attention weights while training (the saved config
    keeps the model's own value). Bad rows are counted and skipped with their line numbers.
    Returns a summary dict.
    """
    if not 0.0 <= attention_dropout < 1.0:
        raise ValueError(f"attention_dropout must be in [0, 1), got {attention_dropout}")
    from actors.learner import holds_other_files

    if holds_other_files(Path(out)):
        raise FileExistsError(f"--out {out} holds files that are not an HF model folder: the model is written "
                              "there as a whole folder, so give an empty or new one")
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from actors.learner import Learner
    from drivers.config import LearnerConfig
    from drivers.ray_utils import ActorGroup, init_ray

    dataset = load_jsonl(data, answer_key="completion")
    for lineno, why in dataset.skipped[:20]:
        print(f"skipped data row {lineno}: {why}")
    if not dataset.examples:
        raise ValueError(f"{data}: no usable {{'prompt', 'completion'}} rows ({len(dataset.skipped)} skipped)")
    examples = [{"prompt": e["prompt"], "completion": e["answer"]} for e in dataset.examples]
    tokenizer = AutoTokenizer.from_pretrained(model)
    sft_rows(tokenizer, examples[:1], chat)   # a chat template that cannot render fails before any actor starts
    steps = max(1, math.ceil(epochs * len(examples) / batch_size))
    t0 = time.perf_counter()
    init_ray()
    cuda = torch.cuda.is_available()
    group = ActorGroup(Learner, num_ranks, num_gpus=1 if cuda else 0, name="sft",
                       kwargs_fn=lambda r, addr, port: dict(
                           model_path=model, learner=LearnerConfig(zero_stage=zero_stage, lr=lr, warmup_steps=warmup_steps,
                                                                   micro_batch_tokens=micro_batch_tokens),
                           rank=r, world_size=num_ranks, master_addr=addr, master_port=port, dtype=dtype, seed=seed,
                           attention_dropout=attention_dropout if attention_dropout > 0 else None,
                           cpu_threads=cpu_threads or max(1, (os.cpu_count() or 1) // num_ranks) if not cuda else 4))
    history = []
    try:
        bar = tqdm(range(steps), desc="sft", unit="step")
        for s in bar:
            rows, plens = sft_rows(tokenizer, step_prompts(examples, s, batch_size, seed), chat)
            m = group.get(group.call_each("sft_step", [
                ({"input_ids": rows[i::num_ranks], "prompt_lens": plens[i::num_ranks]},) for i in range(num_ranks)]))[0]
            history.append(m["sft/nll"])
            bar.set_postfix(nll=f"{m['sft/nll']:.3f}")
        group.get(group.call("save_hf", str(Path(out).resolve())))
    finally:
        group.kill()
    summary = {"rows": len(examples), "skipped": len(dataset.skipped), "steps": steps, "epochs": epochs,
               "attention_dropout": attention_dropout,
               "nll_first": history[0], "nll_last": history[-1], "out": str(out),
               "seconds": round(time.perf_counter() - t0, 1)}
    (Path(out) / "sft_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
