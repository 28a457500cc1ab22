"""The embedded model and tokenizer: built locally, R1 template, deterministic, vLLM-compatible."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drivers.models import PRESETS, R1_SYSTEM, SPECIAL_TOKENS, build_tokenizer, init_model


def test_tokenizer_is_byte_level_and_lossless():
    tok = build_tokenizer()
    for text in ["What is 2 + 3?", "héllo 你好 \n\t", "a" * 50, "\x00\x7f"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert len(ids) <= len(text.encode("utf-8"))
    # every digit is a token of its own (no merges learned on numbers)
    ids = tok.encode("1234567890", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == list("1234567890")
    # the R1 template is compressed by the learned merges
    prompt = tok.apply_chat_template([{"role": "user", "content": "Q"}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    assert len(prompt) < 120 < len(R1_SYSTEM)
    assert build_tokenizer().get_vocab() == tok.get_vocab()  # deterministic


def test_special_tokens_are_single_ids():
    tok = build_tokenizer()
    for special in SPECIAL_TOKENS:
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in tok.all_special_ids, (special, ids)
    text = "<think> 2 plus 3 </think> <answer> 5 </answer>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_renders_the_r1_template():
    tok = build_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt == R1_SYSTEM + " User: What is 2 + 3?. Assistant:"
    sft = tok.apply_chat_template([{"role": "user", "content": "Q"},
                                   {"role": "assistant", "content": "<think>t</think> <answer>a</answer>"}],
                                  tokenize=False)
    assert sft.endswith(". Assistant: <think>t</think> <answer>a</answer><|endoftext|>")


def test_one_prompt_rendering_keeps_the_tiny_ids():
    """actors/prompts.py gives the embedded template exactly the ids of a plain user turn, and SFT
    rows are prompt + " " + completion + EOS, with and without the template."""
    from actors.prompts import chat_messages, prompt_ids
    from drivers.sft import sft_rows

    tok = build_tokenizer()
    q, a = "What is 12 + 30?", " <think> 2 + 0 = 2 , 1 + 3 = 4 </think> <answer> 42 </answer> "
    assert chat_messages(tok, q) == [{"role": "user", "content": q}]       # the template carries R1_SYSTEM
    plain = list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False))
    assert prompt_ids(tok, q) == plain
    completion = tok.encode(" " + a.strip(), add_special_tokens=False) + [tok.eos_token_id]
    assert sft_rows(tok, [{"prompt": q, "completion": a}]) == ([plain + completion], [len(plain)])
    raw = tok.encode(q + " ", add_special_tokens=False)
    assert sft_rows(tok, [{"prompt": q + " ", "completion": a}], chat=False) == ([raw + completion], [len(raw)])


def test_tiny_preset_builds_saves_and_reloads(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(tiny_model_path)
    meta = json.loads((path / "r1ray_model.json").read_text())
    assert 1_000_000 <= meta["params"] <= 10_000_000  # "a few million parameters"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) == meta["params"]
    assert tok.chat_template and "<think>" in tok.chat_template


def test_init_is_deterministic_per_seed(tmp_path, tiny_model_path):
    from safetensors.torch import load_file

    again = init_model("tiny", tmp_path / "again", seed=0)
    other = init_model("tiny", tmp_path / "other", seed=1)
    a = load_file(Path(tiny_model_path) / "model.safetensors")
    b = load_file(again / "model.safetensors")
    c = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_have_a_head_dim_vllm_cpu_accepts(preset):
    arch = PRESETS[preset]
    assert arch["hidden_size"] // arch["num_attention_heads"] in {32, 64, 80, 96, 112, 128}
    assert arch["hidden_size"] % arch["num_attention_heads"] == 0
    assert arch["num_attention_heads"] % arch["num_key_value_heads"] == 0


def test_qwen05b_arch_matches_the_real_parameter_count():
    # Qwen2.5-0.5B has 494,032,768 parameters (tied embeddings); count from the config
    # on the meta device, without allocating 2 GB.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**PRESETS["qwen2.5-0.5b-arch"]))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768


def test_init_model_console_script(tmp_path):
    out = tmp_path / "m"
    res = subprocess.run([str(Path(sys.executable).parent / "r1ray"), "init-model", "--preset",
                          "tiny", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["preset"] == "tiny" and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
