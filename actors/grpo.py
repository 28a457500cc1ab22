"""GRPO and the field's variants as pure PyTorch functions (no Ray, vLLM or DeepSpeed).

Each function states its formula in its docstring; docs/algorithms.md explains each one and
cites its paper. Shapes: B sequences, T completion positions, V vocabulary. Nothing here
mutates its arguments. Masks select completion tokens only (never prompt or pad).

Three registries of small functions, selected by name from the config (drivers/config.py
`AlgoConfig`); a new variant is one function plus one registry line:
- `ADVANTAGE_ESTIMATORS` (algo.advantage): grpo, drgrpo, rloo; entry point `group_advantages`.
- `POLICY_LOSSES` (algo.policy_loss): ppo_clip (token ratio; DAPO clip-higher with eps_high
  0.28), gspo (sequence ratio).
- `ROLLOUT_CORRECTIONS` (algo.rollout_correction): none, tis, mis_token, mis_sequence: weights
  for the mismatch between the rollout engine (behaviour) and the learner's proximal policy.
`grpo_loss` composes a policy loss, a correction, the k3 KL and one of `AGGREGATIONS`, and
reports the engine/learner mismatch. Also: `token_logprobs`, `token_entropy`,
`overlong_penalty` (DAPO's soft overlong reward shaping), `zero_variance_groups`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_LOG_RATIO_LIMIT = 20.0  # exp(±20) bounds ratios and KL terms; far outside any clip range


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [B] tensor, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"B={rewards.numel()} is not a multiple of group_size={group_size}")
    return rewards.float().view(-1, group_size)


def _select(registry: dict, name: str, what: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(registry)}") from None


# ----------------------------------------------------------------------------- advantages
# An estimator maps grouped rewards [n_groups, G] (float32) to advantages of the same shape.
def grpo_advantage(grouped: Tensor, eps: float = 1e-6, unbiased: bool = True) -> Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps).

    std_g is the sample standard deviation (unbiased=True, Bessel's n-1, as torch.std, TRL and
    verl use); unbiased=False gives the population std. G == 1 gives 0.
    """
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if grouped.shape[1] == 1:
        return torch.zeros_like(centred)
    return centred / (grouped.std(dim=1, keepdim=True, unbiased=unbiased) + eps)


def drgrpo_advantage(grouped: Tensor) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean_g (no division by the std, hence no difficulty bias)."""
    return grouped - grouped.mean(dim=1, keepdim=True)


def rloo_advantage(grouped: Tensor) -> Tensor:
    """RLOO: A_i = r_i - (sum_g - r_i) / (G - 1), the mean of the other G - 1 rewards as the
    baseline (= G / (G - 1) * (r_i - mean_g)). G == 1 gives 0 (no other sample)."""
    G = grouped.shape[1]
    if G == 1:
        return torch.zeros_like(grouped)
    return grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (G - 1)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantage,
    "drgrpo": drgrpo_advantage,
    "rloo": rloo_advantage,
}


def group_advantages(rewards: Tensor, group_size: int, estimator: str = "grpo", **kw) -> Tensor:
    """Outcome advantages, one per sequence, by `ADVANTAGE_ESTIMATORS[estimator]`.

    rewards: [B], B = n_groups * group_size, groups contiguous (prompt p owns rows
    p*G .. p*G+G-1). Returns [B] float32. kw go to the estimator (grpo: eps, unbiased).
    A group whose rewards are all equal gets advantage exactly 0 with every estimator (float32
    rounding of its mean would otherwise leave ~1e-8, which grpo's 1 / (0 + eps) blows up to
    ~1e-2, and dynamic sampling tests for == 0).
    """
    fn = _select(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
    grouped = _grouped(rewards, group_size)
    flat = grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values
    adv = fn(grouped, **kw)
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(-1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> int:
    """Number of groups whose rewards are all equal (they carry no learning signal)."""
    grouped = _grouped(rewards, group_size)
    return int((grouped.max(dim=1).values == grouped.min(dim=1).values).sum())


# ----------------------------------------------------------------------------- per-token statistics
def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[tokens], computed one sequence at a time.

    logits: [B, T, V] (any float dtype), tokens: [B, T] int64 -> [B, T] float32. Only one
    [T, V] float32 row is materialised at a time (as gather - logsumexp, no softmax copy).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row = row_logits.float()
        if temperature != 1.0:
            row = row / temperature
        picked = row.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position: [B, T, V] -> [B, T] float32."""
    rows = []
    for row_logits in logits:
        row = row_logits.float() / temperature
        logp = torch.log_softmax(row, dim=-1)
        rows.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(rows)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values over mask == 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return torch.where(mask > 0, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1.0)


def _sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence mean over its completion tokens: [B, T] -> [B] (0 for an empty row)."""
    m = mask.to(values.dtype)
    return torch.where(m > 0, values, torch.zeros_like(values)).sum(-1) / m.sum(-1).clamp(min=1.0)


def aggregate(per_token: Tensor, mask: Tensor, agg: str = "token-mean",
              max_len: int | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean:               sum over all tokens / number of tokens          (DAPO)
    seq-mean-token-mean:      mean over sequences of each one's token mean    (original GRPO)
    seq-mean-token-sum-norm:  sum over all tokens / (B * max_len)             (Dr. GRPO)
    max_len is the generation budget (a constant); None uses T.
    """
    m = mask.to(per_token.dtype)
    kept = torch.where(m > 0, per_token, torch.zeros_like(per_token))  # padding never leaks
    if agg == "token-mean":
        return kept.sum() / m.sum().clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        return (kept.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if agg == "seq-mean-token-sum-norm":
        return kept.sum() / (per_token.shape[0] * (max_len or per_token.shape[1]))
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


# ----------------------------------------------------------------------------- policy losses
# A policy loss maps (logp, old_logp, adv [B, T], mask; eps_low, eps_high) to
# (per-token surrogate loss [B, T], the ratio used [B, T]); grpo_loss weights, adds KL, aggregates.
def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), elementwise."""
    return -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)


def _log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return (logp - old_logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
                  eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """PPO / GRPO token ratio rho_t = exp(logp_t - old_t), asymmetric clip (DAPO clip-higher
    when eps_high > eps_low): L_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)."""
    ratio = _log_ratio(logp, old_logp).exp()
    return clipped_surrogate(ratio, adv, eps_low, eps_high), ratio


def gspo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
              eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """GSPO sequence ratio s_i = exp(mean_t(logp_it - old_it)) (over sequence i's completion
    tokens; the gradient flows through every token), used for each token of sequence i:
    L_it = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)."""
    seq = _sequence_mean(_log_ratio(logp, old_logp), mask)
    ratio = seq.exp().unsqueeze(-1).expand_as(logp)
    return clipped_surrogate(ratio, adv, eps_low, eps_high), ratio


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
}


# ----------------------------------------------------------------------------- rollout corrections
# A correction maps log_w = old_logp - behavior_logp [B, T] (detached) and the mask to
# (weight [B, T], masked [B, T] bool: tokens it truncated or dropped). The weight multiplies
# each token's surrogate and carries no gradient. Bounds arrive as keywords; each takes its own.
def no_correction(log_w: Tensor, mask: Tensor, **_) -> tuple[Tensor, Tensor]:
    """w_t = 1: the engine's samples are taken as the proximal policy's."""
    return torch.ones_like(log_w), torch.zeros_like(log_w, dtype=torch.bool)


def tis_correction(log_w: Tensor, mask: Tensor, *, is_cap: float | None = 2.0, **_) -> tuple[Tensor, Tensor]:
    """Truncated IS: w_t = min(exp(old_t - behavior_t), is_cap); masked = truncated (w > cap).
    is_cap None: no truncation."""
    ratio = log_w.exp()
    if is_cap is None:
        return ratio, torch.zeros_like(ratio, dtype=torch.bool)
    return ratio.clamp(max=is_cap), ratio > is_cap


def mis_token_correction(log_w: Tensor, mask: Tensor, *, mis_low: float = 0.5, mis_high: float = 2.0,
                         **_) -> tuple[Tensor, Tensor]:
    """Token-masked IS (IcePop): r_t = exp(old_t - behavior_t); w_t = r_t if
    mis_low <= r_t <= mis_high, else 0 (the token is dropped from the gradient)."""
    ratio = log_w.exp()
    masked = (ratio < mis_low) | (ratio > mis_high)
    return torch.where(masked, torch.zeros_like(ratio), ratio), masked


def mis_sequence_correction(log_w: Tensor, mask: Tensor, *, mis_low: float = 0.5, mis_high: float = 2.0,
                            **_) -> tuple[Tensor, Tensor]:
    """Sequence-masked IS: the geometric-mean ratio r_i = exp(mean_t(old_it - behavior_it)) over
    sequence i's completion tokens (length-independent, so the bounds of mis_token fit);
    every token of i gets w = 0 if r_i lies outside [mis_low, mis_high], else w = 1."""
    seq = _sequence_mean(log_w, mask).exp()
    masked = ((seq < mis_low) | (seq > mis_high)).unsqueeze(-1).expand_as(log_w)
    return (~masked).to(log_w.dtype), masked


ROLLOUT_CORRECTIONS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "none": no_correction,
    "tis": tis_correction,
    "mis_token": mis_token_correction,
    "mis_sequence": mis_sequence_correction,
}


def mismatch_metrics(logp: Tensor, behavior_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """Engine/learner mismatch over completion tokens: mismatch_abs_mean = token mean and
    mismatch_abs_max = max of |logp - behavior_logp| (logp detached: the learner's current
    weights against the rollout engine's logprobs)."""
    diff = (logp.detach() - behavior_logp).abs()
    has = bool((mask > 0).any())
    return {"mismatch_abs_mean": masked_mean(diff, mask).item(),
            "mismatch_abs_max": diff.masked_fill(mask == 0, 0.0).max().item() if has else 0.0}


# ----------------------------------------------------------------------------- the loss
def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
              ref_logp: Tensor | None = None, *, eps_low: float = 0.2, eps_high: float = 0.2,
              beta: float = 0.0, agg: str = "token-mean", policy_loss: str = "ppo_clip",
              max_len: int | None = None, behavior_logp: Tensor | None = None,
              rollout_correction: str = "tis", is_cap: float | None = 2.0,
              mis_low: float = 0.5, mis_high: float = 2.0) -> tuple[Tensor, dict[str, float]]:
    """w * POLICY_LOSSES[policy_loss] + beta * k3 KL, aggregated; returns (loss, metrics).

    logp:       [B, T] learner logprobs of the sampled tokens (carries the gradient)
    old_logp:   [B, T] the policy the ratio is taken against (the proximal policy)
    advantages: [B] (broadcast over tokens) or [B, T]
    mask:       [B, T] 1 on completion tokens, 0 on padding
    ref_logp:   [B, T] frozen reference policy; required when beta > 0
    per token:  L_t = w_t * surrogate_t + beta * (exp(ref - logp) - (ref - logp) - 1)
    behavior_logp: [B, T] the logprobs of the policy that actually sampled (the rollout engine).
      When given, w = ROLLOUT_CORRECTIONS[rollout_correction](old - behavior) (no gradient;
      is_cap bounds tis, [mis_low, mis_high] the mis_* ones), and the mismatch is measured.
      Without it, w = 1. old == behavior (the engine's logprobs as the proximal policy) leaves
      nothing to correct: w = 1 under every correction whose bounds include 1.
    metrics: policy_loss, kl, clip_frac_low, clip_frac_high, ratio_mean, ratio_max, n_tokens; and
      with behavior_logp: mismatch_abs_mean, mismatch_abs_max, correction_weight_mean,
      correction_masked_frac (share of tokens the correction truncated or dropped).
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must share the shape [B, T]")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    surrogate_fn = _select(POLICY_LOSSES, policy_loss, "policy loss")
    correction_fn = _select(ROLLOUT_CORRECTIONS, rollout_correction, "rollout correction")
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv

    surrogate, ratio = surrogate_fn(logp, old_logp, adv, m, eps_low=eps_low, eps_high=eps_high)
    metrics: dict[str, float] = {}
    if behavior_logp is not None:
        log_w = _log_ratio(old_logp, behavior_logp).detach()
        weight, masked = correction_fn(log_w, m, is_cap=is_cap, mis_low=mis_low, mis_high=mis_high)
        surrogate = surrogate * weight
        with torch.no_grad():
            metrics.update(mismatch_metrics(logp, behavior_logp, m),
                           correction_weight_mean=masked_mean(weight, m).item(),
                           correction_masked_frac=masked_mean(masked.to(m.dtype), m).item())

    per_token = surrogate
    kl = None
    if ref_logp is not None:
        d = (ref_logp - logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
        kl = d.exp() - d - 1.0
        if beta > 0:
            per_token = surrogate + beta * kl
    loss = aggregate(per_token, m, agg, max_len)

    with torch.no_grad():
        n_tokens = m.sum()
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(m.dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(m.dtype)
        metrics.update(
            policy_loss=aggregate(surrogate, m, agg, max_len).item(),
            kl=masked_mean(kl, m).item() if kl is not None else 0.0,
            clip_frac_low=masked_mean(low, m).item(),
            clip_frac_high=masked_mean(high, m).item(),
            ratio_mean=masked_mean(ratio, m).item(),
            ratio_max=(ratio.masked_fill(m == 0, float("-inf")).max().item()
                       if n_tokens > 0 else 1.0),
            n_tokens=float(n_tokens.item()),
        )
    return loss, metrics


# ----------------------------------------------------------------------------- reward shaping
def overlong_penalty(length: Tensor | int, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment of a response of `length` tokens.

    0 if L <= max_len - cache_len; ((max_len - cache_len) - L) / cache_len inside the buffer
    (falls linearly from 0 to -1); -1 beyond max_len. Works elementwise on tensors.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got {cache_len}, {max_len}")
    length = torch.as_tensor(length, dtype=torch.float32)
    start = max_len - cache_len
    inside = (start - length) / cache_len
    return torch.where(length <= start, torch.zeros_like(length),
                       torch.where(length <= max_len, inside, torch.full_like(length, -1.0)))
