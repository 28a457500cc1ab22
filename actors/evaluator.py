"""CheckpointEvaluator: held-out evaluation of saved checkpoints on its own worker.

The driver saves a checkpoint and hands over its path; the evaluator loads it into its own
vLLM engine, answers the held-out prompts, scores them, and returns the metrics with their
wall-clock interval. Training never waits for it (asynchronous evaluation).
"""
from __future__ import annotations

import time


def eval_metrics(rollouts: list, results: list, n_prompts: int) -> dict:
    """Accuracy (the mean over every sample: pass@1), format rate, mean length and failed-verifier count (pure)."""
    ok = [r for r in results if r.status == "ok"]
    lengths = [len(r.completion_ids) for r in rollouts]
    return {"eval/accuracy": sum(r.components.get("accuracy", 0.0) for r in ok) / max(len(ok), 1),
            "eval/format": sum(r.components.get("format", 0.0) for r in ok) / max(len(ok), 1),
            "eval/length": sum(lengths) / max(len(lengths), 1), "eval/n": n_prompts,
            "eval/failed": len(results) - len(ok)}


class CheckpointEvaluator:
    """A rollout engine plus a verifier pool, in one actor, for evaluating saved checkpoints."""

    def __init__(self, model_path: str, rollout, *, dtype: str, reward: dict, eval_k: int = 1,
                 eval_temperature: float = 0.0):
        """rollout: the config's rollout section; reward: RewardWorker's scoring keywords."""
        from actors.rewards import VerifierPool
        from actors.rollout import RolloutWorker

        self.worker = RolloutWorker(model_path, rollout, dtype=dtype)
        self.pool = VerifierPool(num_procs=1, timeout_s=reward.pop("timeout_s", 5.0))
        self.reward = reward
        self.sampling = dict(n=eval_k, temperature=eval_temperature)

    def evaluate(self, checkpoint: str, step: int, prompts: list[str], answers: list[str]) -> dict:
        """Load `checkpoint` (an HF directory), answer (eval_k samples at eval_temperature; greedy by default), score; metrics + wall-clock interval."""
        from actors.rewards import score_batch

        started = time.time()
        self.worker.update_weights(checkpoint, step, transport="checkpoint")
        rollouts = self.worker.generate(prompts, seed=0, **self.sampling)
        results = score_batch([r.text for r in rollouts], answers, [len(r.completion_ids) for r in rollouts],
                              pool=self.pool, **self.reward)
        return {**eval_metrics(rollouts, results, len(prompts)), "eval/of_step": step,
                "eval/started": started, "eval/finished": time.time()}

    def info(self) -> dict:
        """The engine's info (start-up errors surface here)."""
        return self.worker.info()
