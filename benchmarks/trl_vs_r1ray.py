"""r1ray (sync and async) vs TRL's GRPOTrainer on one config, in one run.

    make bench-trl            # installs TRL (benchmarks/requirements-trl.txt, within the pins), runs this
    .venv/bin/python benchmarks/trl_vs_r1ray.py [--config configs/tiny.yaml] [--steps 12] [--sft-steps 150]
        [--set key=value ...]

    # the second scale: SmolLM2-135M-Instruct from its base weights (no cold start); TRL with eager
    # attention runs out of 23 GB there (full-vocabulary logits and attention maps of 64 rows)
    .venv/bin/python benchmarks/trl_vs_r1ray.py --config configs/smollm2-zero.yaml --steps 3 --sft-steps 0 \
        --modes sync --trl-attn sdpa

Every side (r1ray in each `--modes` mode, and TRL) starts from the same cold-start checkpoint
(one r1ray SFT run; `--sft-steps 0`: the base weights) and trains `--steps` GRPO steps with the
same prompts in the same order, G, completion length, temperature, learning rate
(constant, no warmup), clip range (0.2 / 0.28), beta 0, token-mean loss and the same reward
function with r1ray's reward settings (actors/rewards.py; weights, extraction); `--set` overrides apply to both sides.
TRL generates with transformers (its CPU path; TRL's vLLM modes need CUDA) and gets every core;
it computes in the config's model.dtype (bfloat16: TRL's bf16 autocast over fp32 weights; r1ray's
engine and learner hold bf16 weights, the learner's optimizer an fp32 master copy) and
without gradient checkpointing (TRL's default turns it on; r1ray does not recompute), with the
attention r1ray's learner picks (`--trl-attn learner`: eager for bf16 on CPU, whose backward is
faster there; TRL gains from it too) unless --trl-attn says otherwise;
r1ray places its threads as it does by default (drivers/placement.py): in sync mode generation
and learning take turns on every core, in async mode they split the cores. Prints JSON:
completions/s and seconds per step of each, final reward (mean over the last third of the
steps) and the ratios against the goal (r1ray >= 3x TRL).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import scratch_dir  # noqa: E402  (benchmarks/, on the path from here on)


def run_trl(base: dict, overrides: list[str], start: str, out: Path, steps: int, threads: int, attn: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.prompts import chat_messages
    from actors.rewards import score_one
    from drivers.config import build_config
    from drivers.tasks import step_prompts
    from drivers.train import load_task, reward_kwargs

    torch.set_num_threads(threads)
    cfg = build_config(base, overrides)
    train_set, _, _ = load_task(cfg)
    P, G = cfg.train.prompts_per_step, cfg.rollout.group_size
    # r1ray's data order: step s trains on step_prompts(train_set, s, P, seed)
    rows = [ex for s in range(steps) for ex in step_prompts(train_set, s, P, cfg.seed)]
    tokenizer = AutoTokenizer.from_pretrained(start)
    # conversational prompts: TRL renders them with the chat template, turns as r1ray renders them
    data = Dataset.from_list([{"prompt": chat_messages(tokenizer, ex["prompt"]), "answer": ex["answer"]}
                              for ex in rows])
    # r1ray's own scoring settings (weights, layout, language, extraction; length shaping)
    score_kw = {k: v for k, v in reward_kwargs(cfg).items() if k not in ("timeout_s", "num_procs")}
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id}

    def reward(completions, answer, completion_ids, **_):
        # TRL decodes completions with skip_special_tokens=True, which strips <think>/<answer>:
        # score the same text r1ray scores (special tokens kept, the stop token not)
        texts = [tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False)
                 for ids in completion_ids]
        return [score_one(t, a, len(ids), **score_kw).reward for t, a, ids in zip(texts, answer, completion_ids)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=str(out / "trl"), max_steps=steps, learning_rate=cfg.learner.lr, lr_scheduler_type="constant",
        warmup_steps=0, per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        beta=0.0, epsilon=cfg.algo.eps_low, epsilon_high=cfg.algo.eps_high, loss_type="dapo",
        shuffle_dataset=False, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        # TRL turns gradient checkpointing on by default (a recompute pass to save memory);
        # r1ray does not checkpoint, and the memory fits: off is TRL's faster setting here
        gradient_checkpointing=False,
        seed=cfg.seed, bf16=cfg.model.dtype == "bfloat16", max_grad_norm=cfg.learner.grad_clip, adam_epsilon=cfg.learner.adam_eps,
        model_init_kwargs={"attn_implementation": attn})
    timer = StepTimer()
    trainer = GRPOTrainer(model=start, reward_funcs=[reward], args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    tail = logs[-max(1, len(logs) // 3):]
    rl_time = sum(timer.seconds)
    return {"samples_per_s": round(steps * P * G / rl_time, 2), "rl_seconds": round(rl_time, 1),
            "seconds_per_step": round(rl_time / steps, 2), "wall_seconds": round(wall, 1),
            "final_reward": round(statistics.mean(h["reward"] for h in tail), 4), "threads": threads,
            "attn_implementation": attn, "step_seconds": [round(x, 2) for x in timer.seconds]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for both sides (key=value)")
    ap.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"],
                    help="r1ray's train.mode(s) to run (async is learner-bound at SmolLM2's scale: --modes sync)")
    ap.add_argument("--trl-attn", default="learner", choices=["learner", "eager", "sdpa"],
                    help="TRL's attn_implementation (learner: the one r1ray's learner resolves to, "
                         "the faster here; sdpa: transformers' default)")
    a = ap.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("TRL is a benchmark-only dependency: run `make bench-trl` (installs benchmarks/requirements-trl.txt)")
    import os

    import ray
    import torch
    import yaml

    from actors.learner import attention_backend
    from async_vs_sync import cold_start_checkpoint, run_mode
    from drivers.config import build_config
    from drivers.placement import cpu_threads

    base = yaml.safe_load(Path(a.config).read_text())
    base.setdefault("learner", {})["warmup_steps"] = 0
    overrides = list(a.set)
    out = scratch_dir("r1ray_trl_")
    start = cold_start_checkpoint(base, overrides, out, a.sft_steps)
    try:
        result = {m: run_mode(base, overrides, out, m, start, a.steps) for m in a.modes}
    finally:
        ray.shutdown()
    for mode, m in result.items():
        m["seconds_per_step"] = round(m["rl_seconds"] / a.steps, 2)
        m["threads"] = cpu_threads(build_config(base, overrides + [f"train.mode={mode}"]), os.cpu_count() or 1)
    cfg = build_config(base, overrides)
    attn = (attention_backend(cfg.learner.attn_implementation, getattr(torch, cfg.model.dtype), torch.cuda.is_available())
            if a.trl_attn == "learner" else a.trl_attn)
    result["trl"] = run_trl(base, overrides, start, out, a.steps, threads=os.cpu_count() or 1, attn=attn)
    trl_rate = result["trl"]["samples_per_s"]
    ratios = {f"r1ray_{m}_over_trl": round(result[m]["samples_per_s"] / trl_rate, 2) for m in a.modes}
    print(json.dumps({"device": "cpu", "config": a.config, "overrides": overrides, "steps": a.steps,
                      "sft_steps": a.sft_steps, **result, **ratios,
                      "goal_min": 3.0, "meets_goal": max(ratios.values()) >= 3.0}, indent=1))


if __name__ == "__main__":
    main()
