"""GRPO and the field's variants as pure PyTorch functions (no Ray, vLLM or DeepSpeed).

Each function states its formula in its docstring. Shapes: B sequences, T completion positions, V vocabulary.
Nothing here mutates its arguments. Masks select completion tokens only (never prompt or pad).

- `group_advantages`: GRPO's group-normalised outcome advantage ("std") or Dr. GRPO's ("none").
- `token_logprobs`, `token_entropy`: per-token statistics of logits, one sequence at a time.
- `grpo_loss`: clipped surrogate (asymmetric clip = DAPO clip-higher), token or sequence ratio
  (GSPO), k3 KL to a reference, three aggregations, optional truncated importance weights for
  the behaviour/learner mismatch or the policy lag of asynchronous rollouts.
- `overlong_penalty`: DAPO's soft overlong reward shaping.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_LOG_RATIO_LIMIT = 20.0  # exp(±20) bounds ratios and KL terms; far outside any clip range


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [B] tensor, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"B={rewards.numel()} is not a multiple of group_size={group_size}")
    return rewards.float().view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "std", eps: float = 1e-6,
                     unbiased: bool = True) -> Tensor:
    """Outcome advantages, one per sequence.

    rewards: [B], B = n_groups * group_size, groups contiguous (prompt p owns rows
    p*G .. p*G+G-1). Returns [B] float32:
      scale="std":  (r - mean_g) / (std_g + eps)   (GRPO, the seed's formula)
      scale="none": r - mean_g                      (Dr. GRPO: no std, no difficulty bias)
    std_g is the sample standard deviation (unbiased=True, Bessel's n-1, as torch.std, TRL and
    verl use); unbiased=False gives the population std (unit variance within each group).
    A group whose rewards are all equal gets advantage 0 (no NaN), also when group_size == 1.
    """
    grouped = _grouped(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    if scale != "std":
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if group_size == 1:
        return torch.zeros_like(centred).reshape(-1)
    std = grouped.std(dim=1, keepdim=True, unbiased=unbiased)
    return (centred / (std + eps)).reshape(-1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> int:
    """Number of groups whose rewards are all equal (they carry no learning signal)."""
    grouped = _grouped(rewards, group_size)
    return int((grouped.max(dim=1).values == grouped.min(dim=1).values).sum())


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


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
              ref_logp: Tensor | None = None, *, eps_low: float = 0.2, eps_high: float = 0.2,
              beta: float = 0.0, agg: str = "token-mean", ratio_level: str = "token",
              max_len: int | None = None, behavior_logp: Tensor | None = None,
              is_cap: float | None = 2.0) -> tuple[Tensor, dict[str, float]]:
    """Clipped GRPO surrogate + beta * k3 KL, aggregated; returns (loss, metrics).

    logp:       [B, T] learner logprobs of the sampled tokens (carries the gradient)
    old_logp:   [B, T] the policy the ratio is taken against (the proximal policy)
    advantages: [B] (broadcast over tokens) or [B, T]
    mask:       [B, T] 1 on completion tokens, 0 on padding
    ref_logp:   [B, T] frozen reference policy; required when beta > 0
    ratio_level="token":    rho_t = exp(logp_t - old_t)
    ratio_level="sequence": GSPO, s_i = exp(mean_t(logp - old)) for every token of sequence i
    per token:  L_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
                    + beta * (exp(ref - logp) - (ref - logp) - 1)
    behavior_logp: [B, T] the logprobs of the policy that actually sampled (the rollout engine).
      When given, each token's surrogate is weighted by w = min(exp(old - behavior), is_cap)
      (no gradient): TRL/verl's vLLM importance-sampling correction, and AReaL's decoupled
      objective for stale samples (old = proximal policy, behavior = the stale sampler).
    metrics: policy_loss, kl, clip_frac_low, clip_frac_high, ratio_mean, ratio_max, n_tokens,
      and is_weight_mean / is_truncated_frac when behavior_logp is given.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must share the shape [B, T]")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv

    log_ratio = (logp - old_logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    if ratio_level == "sequence":
        seq = (log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        log_ratio = seq.unsqueeze(-1).expand_as(logp)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate = -torch.minimum(ratio * adv, clipped * adv)

    metrics: dict[str, float] = {}
    if behavior_logp is not None:
        log_w = (old_logp - behavior_logp).detach().clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
        weight = log_w.exp() if is_cap is None else log_w.exp().clamp(max=is_cap)
        surrogate = surrogate * weight
        with torch.no_grad():
            metrics["is_weight_mean"] = masked_mean(weight, m).item()
            truncated = (log_w.exp() > is_cap) if is_cap is not None else torch.zeros_like(m)
            metrics["is_truncated_frac"] = masked_mean(truncated.to(m.dtype), m).item()

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
