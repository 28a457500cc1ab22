"""The vLLM rollout worker on the tiny model: group sampling and logprob parity with transformers."""
import pytest
import torch


@pytest.fixture(scope="module")
def sampled(rollout_worker, ray_session):
    prompts = ["What is 2 + 3?", "Name a prime number."]
    return ray_session.get(rollout_worker.generate.remote(prompts, n=4, temperature=1.0, max_tokens=32))


def test_groups_are_contiguous_and_complete(sampled, rollout_worker, ray_session):
    assert [r.prompt_index for r in sampled] == [0] * 4 + [1] * 4
    for r in sampled:
        assert 1 <= len(r.completion_ids) <= 32
        assert len(r.logprobs) == len(r.completion_ids)
        assert r.finish_reason in {"stop", "length"}
        assert r.policy_version == ray_session.get(rollout_worker.info.remote())["policy_version"]
        assert all(lp <= 0.0 for lp in r.logprobs)
    # same prompt, same rendered ids; different prompts differ
    assert sampled[0].prompt_ids == sampled[3].prompt_ids != sampled[4].prompt_ids


def test_vllm_logprobs_match_transformers_fp32(sampled, tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    worst = 0.0
    for r in sampled:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1:-1]
        hf = torch.log_softmax(logits.float(), dim=-1).gather(
            -1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        worst = max(worst, (hf - torch.tensor(r.logprobs)).abs().max().item())
    print(f"max |logp_vllm - logp_hf| = {worst:.2e} over {sum(len(r.logprobs) for r in sampled)} tokens")
    assert worst <= 1e-3
