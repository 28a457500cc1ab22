"""GRPO core math against values computed by hand (in comments) or by naive loops written here."""
import math

import pytest
import torch

from actors.grpo import (aggregate, group_advantages, grpo_loss, overlong_penalty, token_entropy,
                         token_logprobs, zero_variance_groups)

L = math.log


# ----------------------------------------------------------------------------- advantages
def test_std_advantages_by_hand():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    # group 1: mean .25, sample std sqrt((.75^2 + 3 * .25^2) / 3) = .5 -> 1.5, -.5, -.5, -.5
    expect = torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(r, 4, eps=0.0 + 1e-12), expect)
    # population std sqrt(.75 / 4) = .4330127 -> 1.7320508, -.5773503
    pop = group_advantages(r, 4, unbiased=False, eps=1e-12)
    torch.testing.assert_close(pop[:4], torch.tensor([1.7320508, -0.5773503, -0.5773503, -0.5773503]))
    assert zero_variance_groups(r, 4) == 1


def test_dr_grpo_advantages_and_small_groups():
    r = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2])
    torch.testing.assert_close(group_advantages(r, 4, scale="none"),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    # G=2, rewards (0, 1): sample std .7071068 -> -/+ .7071068 (eps 1e-6 shifts the 6th digit)
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 1.0]), 2),
                               torch.tensor([-0.7071058, 0.7071058]), atol=1e-6, rtol=0)


def test_all_equal_groups_give_zero_not_nan():
    for g in (1, 3):
        adv = group_advantages(torch.full((6,), 0.7), g)
        assert torch.equal(adv, torch.zeros(6)) and not adv.isnan().any()
    assert zero_variance_groups(torch.full((6,), 0.7), 3) == 2
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="max")


# ----------------------------------------------------------------------------- logprobs
def test_token_logprobs_by_hand_and_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])
    tokens = torch.tensor([[2, 0]])
    # logsumexp(1,2,3) = 3.4076059
    torch.testing.assert_close(token_logprobs(logits, tokens), torch.tensor([[-0.4076059, -2.4076059]]))
    # T=2: logits (.5, 1, 1.5), logsumexp = 1.5 + log(1 + e^-.5 + e^-1) = 2.1802697
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=2.0),
                               torch.tensor([[-0.6802697, -1.6802697]]))
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens, temperature=0.0)


def test_token_logprobs_matches_full_log_softmax_in_bf16_and_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tokens, 0.7), ref)
    bf = token_logprobs(logits.bfloat16(), tokens, 0.7)
    assert bf.dtype == torch.float32
    ref_bf = torch.log_softmax(logits.bfloat16().float() / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(bf, ref_bf)


def test_token_entropy_by_hand():
    # uniform over 4 -> log 4; one-hot-ish (0, -inf..) -> 0
    logits = torch.tensor([[[0.0, 0, 0, 0], [0.0, -1e9, -1e9, -1e9]]])
    torch.testing.assert_close(token_entropy(logits), torch.tensor([[L(4), 0.0]]))


# ----------------------------------------------------------------------------- the loss
# Shared hand case: B=2, T=3, seq 0 has 2 tokens (+1 pad), seq 1 has 3. A = (+1, -1).
# ratios: seq0 (1.5, 0.5, pad 3.0), seq1 (1.0, 1.1, 0.7)
RATIOS = torch.tensor([[1.5, 0.5, 3.0], [1.0, 1.1, 0.7]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -1.0])


def _inputs():
    old = torch.tensor([[-1.0, -2.0, 5e3], [-0.5, -1.5, -3.0]])  # pad holds garbage
    logp = (old + RATIOS.log()).requires_grad_(True)
    return logp, old


def test_token_mean_clip_and_metrics_by_hand():
    logp, old = _inputs()
    loss, m = grpo_loss(logp, old, ADV, MASK)
    # seq0 (A=+1): min(1.5, 1.2) -> -1.2 ; min(.5, .8) -> -.5
    # seq1 (A=-1): min(-1,-1) -> 1 ; min(-1.1,-1.1) -> 1.1 ; min(-.7,-.8) -> .8
    # token-mean: (-1.2 - .5 + 1 + 1.1 + .8) / 5 = .24
    assert loss.item() == pytest.approx(0.24, abs=1e-6)
    assert m["clip_frac_high"] == pytest.approx(0.2) and m["clip_frac_low"] == pytest.approx(0.2)
    assert m["ratio_mean"] == pytest.approx(0.96, abs=1e-6)   # (1.5+.5+1+1.1+.7)/5
    assert m["ratio_max"] == pytest.approx(1.5, abs=1e-6)     # the pad's 3.0 is masked
    assert m["n_tokens"] == 5 and m["kl"] == 0.0 and m["policy_loss"] == pytest.approx(0.24, abs=1e-6)


def test_gradient_is_zero_on_the_clipped_side():
    logp, old = _inputs()
    loss, _ = grpo_loss(logp, old, ADV, MASK)
    loss.backward()
    # d/dlogp of -rho*A is -rho*A, / 5 tokens; clipped tokens (seq0 t0, seq1 t2) and pad get 0
    expect = torch.tensor([[0.0, -0.5 / 5, 0.0], [1.0 / 5, 1.1 / 5, 0.0]])
    torch.testing.assert_close(logp.grad, expect)


def test_asymmetric_clip_higher():
    logp, old = _inputs()
    # eps_high .28: seq0 t0 -> -1.28 ; (-1.28 - .5 + 1 + 1.1 + .8) / 5 = .224
    assert grpo_loss(logp, old, ADV, MASK, eps_high=0.28)[0].item() == pytest.approx(0.224, abs=1e-6)
    # eps_low .1: seq1 t2 -> min(-.7, -.9) -> .9 ; (-1.2 - .5 + 1 + 1.1 + .9) / 5 = .26
    assert grpo_loss(logp, old, ADV, MASK, eps_low=0.1)[0].item() == pytest.approx(0.26, abs=1e-6)


def test_aggregations_by_hand():
    logp, old = _inputs()
    # per-seq means: seq0 (-1.2 - .5) / 2 = -.85 ; seq1 2.9 / 3 ; mean = .0583333
    seq = grpo_loss(logp, old, ADV, MASK, agg="seq-mean-token-mean")[0].item()
    assert seq == pytest.approx((-0.85 + 2.9 / 3) / 2, abs=1e-6)
    # Dr. GRPO: 1.2 / (B * max_len)
    assert grpo_loss(logp, old, ADV, MASK, agg="seq-mean-token-sum-norm", max_len=4)[0].item() \
        == pytest.approx(1.2 / 8, abs=1e-6)
    assert grpo_loss(logp, old, ADV, MASK, agg="seq-mean-token-sum-norm")[0].item() \
        == pytest.approx(1.2 / 6, abs=1e-6)
    with pytest.raises(ValueError, match="agg"):
        grpo_loss(logp, old, ADV, MASK, agg="sum")


def test_sequence_level_ratio_gspo():
    logp, old = _inputs()
    # s0 = exp(mean(log 1.5, log .5)) = sqrt(.75) = .8660254 ; s1 = (1.1 * .7) ** (1/3) = .9164864
    s0, s1 = math.sqrt(0.75), 0.77 ** (1 / 3)
    loss, m = grpo_loss(logp, old, ADV, MASK, ratio_level="sequence", agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-s0 + s1) / 2, abs=1e-6)  # no clipping at eps .2
    # GSPO's tiny ranges (3e-4 / 4e-4): seq1 (A<0) clips at 1 - 3e-4 -> .9997
    loss, m = grpo_loss(logp, old, ADV, MASK, ratio_level="sequence", agg="seq-mean-token-mean",
                        eps_low=3e-4, eps_high=4e-4)
    assert loss.item() == pytest.approx((-s0 + (1 - 3e-4)) / 2, abs=1e-6)
    assert m["clip_frac_low"] == pytest.approx(3 / 5)  # all 3 tokens of seq1


def test_k3_kl_by_hand_and_zero_when_ref_equals_logp():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach()
    ref = torch.tensor([[-1.0 + L(2), -2.0 - L(2)]])
    adv, mask = torch.tensor([0.0]), torch.ones(1, 2)
    # d = ref - logp = +-log 2: exp(d) - d - 1 = .3068528 and .1931472 ; token mean .25
    loss, m = grpo_loss(logp, old, adv, mask, ref, beta=0.1)
    assert m["kl"] == pytest.approx(0.25, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * 0.25, abs=1e-6)
    loss0, m0 = grpo_loss(logp, old, adv, mask, logp.detach(), beta=0.5)
    assert m0["kl"] == 0.0 and loss0.item() == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)


def test_truncated_importance_weights():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = logp.detach()
    behavior = old - torch.tensor([[L(3), L(0.5)]])  # w = min(3, 2) = 2 and .5
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), behavior_logp=behavior)
    assert loss.item() == pytest.approx((-2 - 0.5) / 2, abs=1e-6)
    assert m["is_weight_mean"] == pytest.approx(1.25, abs=1e-6) and m["is_truncated_frac"] == 0.5
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 2, -0.5 / 2]]))  # weights are constants


def test_gradient_matches_a_naive_per_token_loop():
    g = torch.Generator().manual_seed(1)
    B, T = 3, 6
    old = -torch.rand(B, T, generator=g) * 3
    logp0 = old + (torch.rand(B, T, generator=g) - 0.5)  # ratios ~ exp(+-.5): some clipped
    ref = old + (torch.rand(B, T, generator=g) - 0.5) * 0.2
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    adv = torch.tensor([0.8, -1.3, 0.4])
    beta, el, eh = 0.05, 0.2, 0.28
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        logp = logp0.clone().requires_grad_(True)
        grpo_loss(logp, old, adv, mask, ref, beta=beta, eps_low=el, eps_high=eh, agg=agg,
                  max_len=8)[0].backward()
        naive = logp0.clone().requires_grad_(True)
        total = torch.zeros(())
        n_tok = int(mask.sum())
        for b in range(B):
            length = int(mask[b].sum())
            for t in range(length):
                rho = torch.exp(naive[b, t] - old[b, t])
                a = float(adv[b])
                surr = -torch.min(rho * a, torch.clamp(rho, 1 - el, 1 + eh) * a)
                d = ref[b, t] - naive[b, t]
                term = surr + beta * (torch.exp(d) - d - 1)
                norm = {"token-mean": n_tok, "seq-mean-token-mean": length * B,
                        "seq-mean-token-sum-norm": B * 8}[agg]
                total = total + term / norm
        total.backward()
        torch.testing.assert_close(logp.grad, naive.grad, msg=agg)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_on_policy_loss_is_minus_mean_advantage(agg):
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    adv = torch.tensor([0.5, -2.0, 1.0])
    loss, m = grpo_loss(logp, logp.clone(), adv, mask, agg=agg, max_len=10)
    lengths = [3, 5, 1]
    expect = {"token-mean": -(0.5 * 3 - 2.0 * 5 + 1.0 * 1) / 9,
              "seq-mean-token-mean": -(0.5 - 2.0 + 1.0) / 3,
              "seq-mean-token-sum-norm": -(0.5 * 3 - 2.0 * 5 + 1.0 * 1) / (3 * 10)}[agg]
    assert sum(lengths) == m["n_tokens"]
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    assert m["clip_frac_low"] == m["clip_frac_high"] == 0.0 and m["ratio_max"] == 1.0


def test_zero_advantage_groups_give_zero_loss_and_gradient():
    logp = torch.randn(4, 3).requires_grad_(True)
    adv = group_advantages(torch.ones(4), 4)
    loss, _ = grpo_loss(logp, logp.detach() + 0.3, adv, torch.ones(4, 3))
    loss.backward()
    assert loss.item() == 0.0 and not logp.grad.isnan().any() and logp.grad.abs().sum() == 0


def test_aggregate_ignores_padding_values():
    per_token = torch.tensor([[1.0, float("inf")], [2.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert aggregate(per_token, mask).item() == pytest.approx(7 / 3)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="share the shape"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


# ----------------------------------------------------------------------------- overlong
def test_overlong_penalty_by_hand():
    # L_max 20, L_cache 4: free up to 16, then (16 - L) / 4, -1 beyond 20
    got = overlong_penalty(torch.tensor([10, 16, 17, 18, 20, 21]), 20, 4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert overlong_penalty(18, 20, 4).item() == -0.5
    with pytest.raises(ValueError):
        overlong_penalty(3, 10, 0)


def test_grpo_module_is_pure_math():
    import subprocess
    import sys

    code = ("import sys, actors.grpo; heavy = [m for m in ('ray', 'vllm', 'deepspeed') "
            "if m in sys.modules]; assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-500:]
