"""GRPO core math against values computed by hand (in comments) or by naive loops written here."""
import math

import pytest
import torch

from actors.grpo import (ADVANTAGE_ESTIMATORS, POLICY_LOSSES, ROLLOUT_CORRECTIONS, aggregate,
                         group_advantages, grpo_loss, mismatch_metrics, overlong_penalty, token_entropy,
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
    torch.testing.assert_close(group_advantages(r, 4, "drgrpo"),
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
    for name in ADVANTAGE_ESTIMATORS:
        for g in (1, 3, 7):       # 7 x 0.2: the float32 mean is off by 1e-8, grpo once gave -0.0147
            adv = group_advantages(torch.full((42,), 0.2), g, name)
            assert torch.equal(adv, torch.zeros(42)), (name, g)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'max'.*'drgrpo', 'grpo', 'rloo'"):
        group_advantages(torch.zeros(4), 2, "max")


def test_rloo_advantages_by_hand():
    # [1, 0, 0, 1]: r_i minus the mean of the other three -> 1 - 1/3, 0 - 2/3, 0 - 2/3, 1 - 1/3
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0, 0, 1]), 4, "rloo"),
                               torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    # G=2 (0, 1): each one's baseline is the other reward -> -1, +1 ; G=1: no other sample -> 0
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 1.0, 3.0, 3.0]), 2, "rloo"),
                               torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(group_advantages(torch.tensor([1.0, 5.0]), 1, "rloo"), torch.zeros(2))


def test_every_estimator_matches_a_naive_loop():
    g = torch.Generator().manual_seed(4)
    r = torch.rand(15, generator=g)
    G = 5
    for name in ADVANTAGE_ESTIMATORS:
        expect = []
        for i in range(15):
            group = [float(x) for x in r[i // G * G:(i // G + 1) * G]]
            mean = sum(group) / G
            others = [x for j, x in enumerate(group) if j != i % G]
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
            expect.append({"grpo": (group[i % G] - mean) / (std + 1e-6), "drgrpo": group[i % G] - mean,
                           "rloo": group[i % G] - sum(others) / len(others)}[name])
        torch.testing.assert_close(group_advantages(r, G, name), torch.tensor(expect), msg=name)


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
    loss, m = grpo_loss(logp, old, ADV, MASK, policy_loss="gspo", agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-s0 + s1) / 2, abs=1e-6)  # no clipping at eps .2
    assert m["ratio_max"] == pytest.approx(s1, abs=1e-6)            # the pad's 3.0 is not in s0
    # GSPO's tiny ranges (3e-4 / 4e-4): seq1 (A<0) clips at 1 - 3e-4 -> .9997
    loss, m = grpo_loss(logp, old, ADV, MASK, policy_loss="gspo", agg="seq-mean-token-mean",
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
    assert m["correction_weight_mean"] == pytest.approx(1.25, abs=1e-6) and m["correction_masked_frac"] == 0.5
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 2, -0.5 / 2]]))  # weights are constants
    # the same through the registry name, and no truncation without a cap
    loss2, _ = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), behavior_logp=behavior,
                         rollout_correction="tis", is_cap=None)
    assert loss2.item() == pytest.approx((-3 - 0.5) / 2, abs=1e-6)


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


# ----------------------------------------------------------------------------- policy losses (registry)
def test_gspo_gradient_matches_a_naive_loop():
    g = torch.Generator().manual_seed(5)
    B, T = 3, 5
    old = -torch.rand(B, T, generator=g) * 3
    logp0 = old + (torch.rand(B, T, generator=g) - 0.5) * 0.8
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    adv = torch.tensor([0.8, -1.3, 0.4])
    el, eh = 0.05, 0.1                      # tight: some sequences are clipped
    logp = logp0.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, old, adv, mask, policy_loss="gspo", eps_low=el, eps_high=eh)
    loss.backward()
    naive = logp0.clone().requires_grad_(True)
    total, n_tok = torch.zeros(()), int(mask.sum())
    for b in range(B):
        n = int(mask[b].sum())
        s = torch.exp(sum(naive[b, t] - old[b, t] for t in range(n)) / n)
        a = float(adv[b])
        total = total - n * torch.min(s * a, torch.clamp(s, 1 - el, 1 + eh) * a) / n_tok
    total.backward()
    assert loss.item() == pytest.approx(total.item(), abs=1e-6)
    torch.testing.assert_close(logp.grad, naive.grad)
    assert logp.grad.abs().sum() > 0 and (logp.grad[mask == 0] == 0).all()


def test_ppo_clip_is_the_default_policy_loss_and_unknown_names_fail():
    logp, old = _inputs()
    assert grpo_loss(logp, old, ADV, MASK, policy_loss="ppo_clip")[0].item() == pytest.approx(0.24, abs=1e-6)
    with pytest.raises(ValueError, match=r"unknown policy loss 'reinforce'.*'gspo', 'ppo_clip'"):
        grpo_loss(logp, old, ADV, MASK, policy_loss="reinforce")
    with pytest.raises(ValueError, match=r"unknown rollout correction 'cispo'"):
        grpo_loss(logp, old, ADV, MASK, behavior_logp=old, rollout_correction="cispo")


# ----------------------------------------------------------------------------- rollout corrections
def _on_policy(behavior_ratios, mask=None):
    """logp == old (policy ratio 1, no clipping), behavior = old - log(r): w depends only on r."""
    r = torch.tensor(behavior_ratios)
    old = -torch.ones_like(r) - torch.arange(r.shape[1]) * 0.1
    logp = old.clone().requires_grad_(True)
    return logp, old, old - r.log(), torch.ones_like(r) if mask is None else torch.tensor(mask)


def test_mis_token_drops_tokens_outside_the_bounds_and_keeps_the_ratio_inside():
    logp, old, behavior, mask = _on_policy([[0.4, 0.6, 1.5, 1.9, 2.5]])
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), mask, behavior_logp=behavior,
                        rollout_correction="mis_token", mis_low=0.5, mis_high=2.0)
    w = torch.tensor([[0.0, 0.6, 1.5, 1.9, 0.0]])      # IcePop: r inside [.5, 2], 0 outside
    assert loss.item() == pytest.approx(-w.sum().item() / 5, abs=1e-6)
    assert m["correction_masked_frac"] == pytest.approx(2 / 5)
    assert m["correction_weight_mean"] == pytest.approx(4.0 / 5, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -w / 5)     # the dropped tokens get no gradient
    # wider bounds keep all: the weights are then the plain IS ratios
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), mask, behavior_logp=behavior,
                        rollout_correction="mis_token", mis_low=0.1, mis_high=5.0)
    assert loss.item() == pytest.approx(-(0.4 + 0.6 + 1.5 + 1.9 + 2.5) / 5, abs=1e-6)
    assert m["correction_masked_frac"] == 0.0


def test_mis_sequence_drops_whole_sequences_by_their_geometric_mean_ratio():
    # seq0: (1.8, 1.8) -> geo mean 1.8, kept with w 1 (the product 3.24 would be outside) ;
    # seq1: (4, .25, pad 1000) -> 1 (pad ignored), kept, although mis_token drops both its tokens ;
    # seq2: (.3, .3, .3) -> .3, dropped ; seq3: (3, 3, 3) -> 3, dropped. 10 completion tokens.
    logp, old, behavior, mask = _on_policy(
        [[1.8, 1.8, 1.0], [4.0, 0.25, 1000.0], [0.3, 0.3, 0.3], [3.0, 3.0, 3.0]],
        mask=[[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0, 1.0, 1.0])
    loss, m = grpo_loss(logp, old, adv, mask, behavior_logp=behavior, rollout_correction="mis_sequence",
                        mis_low=0.5, mis_high=2.0)
    assert loss.item() == pytest.approx((2 * -1.0 + 2 * 2.0) / 10, abs=1e-6)   # seq0 and seq1 only
    assert m["correction_masked_frac"] == pytest.approx(6 / 10)
    assert m["correction_weight_mean"] == pytest.approx(4 / 10, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.1, -0.1, 0], [0.2, 0.2, 0], [0, 0, 0], [0, 0, 0]]))
    _, m_tok = grpo_loss(logp, old, adv, mask, behavior_logp=behavior, rollout_correction="mis_token")
    assert m_tok["correction_masked_frac"] == pytest.approx(8 / 10)   # all but seq0's two tokens


def test_no_correction_weighs_one_and_still_measures_the_mismatch():
    logp, old, behavior, mask = _on_policy([[0.4, 3.0]])
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), mask, behavior_logp=behavior, rollout_correction="none")
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert m["correction_weight_mean"] == 1.0 and m["correction_masked_frac"] == 0.0
    assert m["mismatch_abs_mean"] == pytest.approx((abs(L(0.4)) + L(3.0)) / 2, abs=1e-6)
    # old == behavior (the engine's logprobs as the proximal policy): every correction is the identity
    for name in ROLLOUT_CORRECTIONS:
        loss, m = grpo_loss(logp, old, torch.tensor([1.0]), mask, behavior_logp=old, rollout_correction=name)
        assert loss.item() == pytest.approx(-1.0, abs=1e-6) and m["correction_masked_frac"] == 0.0, name


def test_mismatch_metrics_compare_the_learner_logp_with_the_engine_on_completion_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -9.0]], requires_grad=True)
    behavior = torch.tensor([[-1.1, -1.5, -3.0], [-0.5, -1.0, 0.0]])   # seq1's pad differs by 9
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    m = mismatch_metrics(logp, behavior, mask)
    # |diff| on the 5 completion tokens: .1, .5, 0, 0, .3 -> mean .18, max .5 (not the pad's 9)
    assert m["mismatch_abs_mean"] == pytest.approx(0.18, abs=1e-6)
    assert m["mismatch_abs_max"] == pytest.approx(0.5, abs=1e-6)
    # grpo_loss reports them against the *learner's* logp, whatever old_logp is
    old = logp.detach() + 0.05
    _, lm = grpo_loss(logp, old, torch.tensor([1.0, 1.0]), mask, behavior_logp=behavior)
    assert lm["mismatch_abs_mean"] == pytest.approx(0.18, abs=1e-6)
    assert lm["mismatch_abs_max"] == pytest.approx(0.5, abs=1e-6)
    assert "mismatch_abs_mean" not in grpo_loss(logp, old, torch.tensor([1.0, 1.0]), mask)[1]
    assert mismatch_metrics(logp, behavior, torch.zeros(2, 3))["mismatch_abs_max"] == 0.0


# ----------------------------------------------------------------------------- config names
def test_config_names_are_the_registry_names_and_select_the_functions():
    import typing

    from drivers.config import AlgoConfig, build_config

    for field, registry in [("advantage", ADVANTAGE_ESTIMATORS), ("policy_loss", POLICY_LOSSES),
                            ("rollout_correction", ROLLOUT_CORRECTIONS)]:
        assert set(typing.get_args(AlgoConfig.model_fields[field].annotation)) == set(registry), field
    cfg = build_config({}, ["algo.advantage=rloo", "algo.policy_loss=gspo", "algo.rollout_correction=mis_token",
                            "algo.mis_low=0.1", "algo.mis_high=5"])
    r = torch.tensor([1.0, 0, 0, 1])
    torch.testing.assert_close(group_advantages(r, 4, cfg.algo.advantage), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    logp, old = _inputs()
    kw = cfg.algo.model_dump(include={"policy_loss", "rollout_correction", "mis_low", "mis_high", "agg"})
    s0, s1 = math.sqrt(0.75), 0.77 ** (1 / 3)
    # behavior = old - log 2 on every token: mis_token (bounds .1..5) keeps all, w = 2
    loss, m = grpo_loss(logp, old, ADV, MASK, behavior_logp=old - L(2), **kw)
    assert loss.item() == pytest.approx(2 * (-2 * s0 + 3 * s1) / 5, abs=1e-6)
    assert m["correction_weight_mean"] == pytest.approx(2.0, abs=1e-6)
    # the defaults are today's GRPO: grpo advantages, token ratio, truncated IS at 2
    d = build_config({}).algo
    assert (d.advantage, d.policy_loss, d.rollout_correction, d.is_cap, d.old_logp) == \
        ("grpo", "ppo_clip", "tis", 2.0, "learner")
