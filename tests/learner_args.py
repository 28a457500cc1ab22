"""Learner constructor arguments from one flat keyword set, as the learner tests write them.

The Learner takes the config's `learner` and `algo` sections (drivers/config.py); tests name
single fields. Fields of LearnerConfig go to the learner section, fields of AlgoConfig to algo,
the rest (rank, world_size, ports, dtype, ...) stay keywords. Unless a test says otherwise the
proximal policy is the engine's own logprobs (old_logp "rollout", no correction), as the learner
tests were written.
"""
from __future__ import annotations


def learner_kwargs(**flat) -> dict:
    from drivers.config import AlgoConfig, LearnerConfig

    learner = {k: flat.pop(k) for k in list(flat) if k in LearnerConfig.model_fields}
    algo = {k: flat.pop(k) for k in list(flat) if k in AlgoConfig.model_fields}
    algo.setdefault("old_logp", "rollout")
    if algo["old_logp"] == "rollout":
        algo.setdefault("rollout_correction", "none")
    return dict(flat, learner=LearnerConfig(**learner), algo=AlgoConfig(**algo))
