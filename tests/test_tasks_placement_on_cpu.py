"""Pure driver pieces: task data, bad-row handling, data order, placement arithmetic."""
from pathlib import Path

import pytest

from drivers.placement import plan_placement
from drivers.tasks import arithmetic_examples, load_jsonl, split_heldout, step_prompts, worked_example


def test_arithmetic_examples_and_heldout_split():
    ex = arithmetic_examples(12, 3, ["+", "-"])
    assert len([e for e in ex if "+" in e["prompt"]]) == 13 * 4
    assert {"prompt": "What is 12 - 3?", "answer": "9", "worked": "12 - 3 = 9"} in ex
    assert all(int(e["answer"]) >= 0 for e in ex)            # no negative results
    train, held = split_heldout(ex, 10, seed=0)
    assert len(held) == 10 and len(train) == len(ex) - 10
    assert not {e["prompt"] for e in held} & {e["prompt"] for e in train}
    assert split_heldout(ex, 10, seed=0) == (train, held)    # seeded
    with pytest.raises(ValueError):
        split_heldout(ex, len(ex), seed=0)
    assert worked_example(ex[0]) == "<think> 0 + 0 = 0 </think> <answer> 0 </answer>"
    products = arithmetic_examples(12, 12, ["*"], a_min=2, b_min=2)       # the smollm2-zero task
    assert len(products) == 11 * 11 and products[0]["prompt"] == "What is 2 * 2?"
    assert {"prompt": "What is 12 * 12?", "answer": "144", "worked": "12 * 12 = 144"} in products


def test_step_prompts_is_a_pure_function_of_seed_and_step():
    ex = [{"prompt": str(i), "answer": str(i)} for i in range(10)]
    first_epoch = [step_prompts(ex, s, 5, seed=3) for s in range(2)]
    # each epoch is a permutation: steps 0 and 1 together cover every example once
    assert sorted(int(e["prompt"]) for b in first_epoch for e in b) == list(range(10))
    assert step_prompts(ex, 1, 5, seed=3) == first_epoch[1]  # no hidden state: resume-safe
    assert step_prompts(ex, 1, 5, seed=4) != first_epoch[1]
    assert len(step_prompts(ex, 7, 4, seed=3)) == 4           # crosses epoch boundaries


def test_bad_rows_are_counted_with_line_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([
        b'{"prompt": "What is 1 + 1?", "answer": "2"}',
        b'{"prompt": "no answer"}',
        b'not json',
        b'{"prompt": "", "answer": "3"}',
        b'\xff\xfe bad bytes',
        b'',
        b'{"question": "GSM8K style?", "answer": "#### 4"}',
        b'[1, 2]',
        b'{"prompt": "' + b"x" * 9000 + b'", "answer": "1"}',
    ]))
    data = load_jsonl(path)
    assert [e["prompt"] for e in data.examples] == ["What is 1 + 1?", "GSM8K style?"]
    assert data.examples[1]["answer"] == "4" and "worked" not in data.examples[1]
    general = load_jsonl(path, general=True)       # prompts without a verifiable answer: answer None
    assert [e["answer"] for e in general.examples] == [None, None, None]
    assert [line for line, _ in general.skipped] == [3, 4, 5, 8, 9]
    assert [line for line, _ in data.skipped] == [2, 3, 4, 5, 8, 9]
    reasons = dict(data.skipped)
    assert "answer" in reasons[2] and "JSON" in reasons[3] and "prompt" in reasons[4]
    assert "UTF-8" in reasons[5] and "object" in reasons[8] and "too long" in reasons[9]


def test_placement_arithmetic():
    cpu = plan_placement(rollout_workers=2, tensor_parallel=1, learner_ranks=2, reward_workers=3,
                         gpus_per_node=0, cores=2)
    assert cpu["rollout"].count == 2 and cpu["rollout"].num_gpus == 0 and cpu["rollout"].threads == 1
    assert cpu["learner"].threads == 1 and cpu["reward"].num_cpus == 0.5 and cpu["total_gpus"] == 0
    # sync: each phase takes every core in turn; async: the two sides split them
    one = dict(rollout_workers=1, tensor_parallel=1, learner_ranks=1, reward_workers=1, gpus_per_node=0)
    sync2 = plan_placement(**one, cores=2)
    assert (sync2["rollout"].threads, sync2["learner"].threads) == (2, 2)
    async2 = plan_placement(**one, cores=2, mode="async")
    assert (async2["rollout"].threads, async2["learner"].threads) == (1, 1)
    async16 = plan_placement(rollout_workers=2, tensor_parallel=1, learner_ranks=2, reward_workers=1, gpus_per_node=0,
                             cores=16, mode="async", rollout_share=0.25)
    assert (async16["rollout"].threads, async16["learner"].threads) == (2, 6)      # 4 / 2 engines, 12 / 2 ranks
    assert plan_placement(**one, cores=4, mode="async", rollout_share=0.99)["learner"].threads == 1   # one is left
    assert plan_placement(**one, cores=1, mode="async")["rollout"].threads == 1
    assert plan_placement(**one, cores=10, mode="async", rollout_share=0.25)["rollout"].threads == 3   # 2.5 -> 3
    with pytest.raises(ValueError, match="mode"):
        plan_placement(**one, cores=2, mode="hybrid")
    with pytest.raises(ValueError, match="rollout_share"):
        plan_placement(**one, cores=2, rollout_share=1.0)
    # 2 engines x TP 2 + 4 ranks on separate GPUs = 8 GPUs = one 8-GPU node
    sep = plan_placement(rollout_workers=2, tensor_parallel=2, learner_ranks=4, reward_workers=1,
                         gpus_per_node=8, cores=32)
    assert sep["total_gpus"] == 8 and sep["gpu_nodes"] == 1
    assert sep["rollout"].num_gpus == 2 and sep["learner"].num_gpus == 1
    # colocated: the same 4 GPUs hold engines and ranks, half a GPU per actor per device
    col = plan_placement(rollout_workers=2, tensor_parallel=2, learner_ranks=4, reward_workers=1,
                         gpus_per_node=8, cores=32, colocate=True)
    assert col["total_gpus"] == 4 and col["rollout"].num_gpus == 1.0 and col["learner"].num_gpus == 0.5
    # a Config's plan (what the actors ask Ray for): colocated engine and rank take half the GPU each
    from drivers.config import build_config
    from drivers.placement import config_plan

    colo = config_plan(build_config({"rollout": {"colocate": True}}), cores=16, gpus_per_node=1)
    assert (colo["rollout"].num_gpus, colo["learner"].num_gpus, colo["total_gpus"]) == (0.5, 0.5, 1)
    assert config_plan(build_config({}), cores=16, gpus_per_node=2)["total_gpus"] == 2
    big = plan_placement(rollout_workers=6, tensor_parallel=4, learner_ranks=16, reward_workers=1,
                         gpus_per_node=8, cores=32)
    assert big["total_gpus"] == 40 and big["gpu_nodes"] == 5
    with pytest.raises(ValueError):
        plan_placement(rollout_workers=1, tensor_parallel=16, learner_ranks=1, reward_workers=1,
                       gpus_per_node=8, cores=8)


def test_column_addition_worked_steps():
    from drivers.tasks import column_addition

    assert column_addition(37, 5) == "7 + 5 = 12 , 3 + 1 = 4"       # carry into the tens
    assert column_addition(40, 3) == "0 + 3 = 3 , 4 = 4"
    assert column_addition(99, 9) == "9 + 9 = 18 , 9 + 1 = 10"
    assert column_addition(7, 2) == "7 + 2 = 9"
    assert column_addition(123, 45) == "3 + 5 = 8 , 2 + 4 = 6 , 1 = 1"


def test_gsm8k_answers_split_into_reasoning_and_final_number():
    from drivers.tasks import split_gsm8k_answer

    ex = split_gsm8k_answer("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018")
    assert ex == {"answer": "1018", "worked": "She sells 16 - 3 - 4 = 9 eggs. She makes 9 * 2 = $18."}
    assert split_gsm8k_answer("42") == {"answer": "42"}
    assert split_gsm8k_answer("#### ") == {"answer": "####"}
    path = Path(__file__).resolve().parents[1] / "data/gsm8k/train.jsonl"
    data = load_jsonl(path)
    assert len(data.examples) == 7473 and not data.skipped
    assert all(e["answer"].lstrip("-").replace(".", "").isdigit() for e in data.examples)


def test_the_run_table_says_how_held_out_accuracy_was_measured():
    from drivers.train import format_table

    row = {"eval/accuracy": 0.5, "eval/format": 0.0, "eval/length": 40.0}
    greedy = format_table({"start": row, "end": row}).splitlines()
    assert greedy[0].split() == ["held-out", "(greedy)", "start", "of", "RL", "end", "of", "RL"]
    sampled = format_table({"start": row, "end": {**row, "eval/accuracy": 0.625}, "eval_k": 4,
                            "eval_temperature": 0.6}).splitlines()
    assert sampled[0].startswith("held-out (pass@1, k 4, T 0.6)")
    assert sampled[1].split() == ["accuracy", "0.500", "0.625"]
    assert len({len(line) for line in sampled}) == 1           # the columns line up


def test_busy_seconds_merges_overlapping_spans_within_the_step():
    from drivers.tracking import busy_seconds

    # by hand: clipped to [0, 5.5] the spans are [0, .5], [0, 2], [1, 3], [5, 5.5]; union 3 + 0.5
    assert busy_seconds([(0, 2), (1, 3), (5, 6), (-1, 0.5)], 0, 5.5) == 3.5
    assert busy_seconds([], 0, 10) == 0.0 and busy_seconds([(20, 30)], 0, 10) == 0.0
    assert busy_seconds([(2, 4), (2, 4), (3, 3.5)], 0, 10) == 2.0



def test_cpu_threads_from_a_config_and_by_hand():
    from drivers.config import build_config
    from drivers.placement import cpu_threads

    def threads(*overrides):
        return cpu_threads(build_config({}, list(overrides)), cores=8)

    assert threads() == {"rollout": 8, "learner": 8}                                     # sync: turns
    assert threads("train.mode=async") == {"rollout": 4, "learner": 4}
    assert threads("train.mode=async", "rollout.cpu_threads=6") == {"rollout": 6, "learner": 2}  # what is left
    assert threads("train.mode=async", "rollout.cpu_threads=6", "learner.cpu_threads=5") == {"rollout": 6, "learner": 5}
    assert threads("rollout.num_workers=2", "learner.num_ranks=4") == {"rollout": 4, "learner": 2}


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(tmp_path, monkeypatch):
    """model.dtype auto: bf16 on a CPU that lists avx512_bf16 or amx_bf16, fp32 on one that does
    not (oneDNN would emulate bf16, slower than fp32) or whose flags cannot be read."""
    import torch

    from drivers.config import build_config
    from drivers.placement import native_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpuinfo = tmp_path / "cpuinfo"
    for flags, want in [("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", "bfloat16"),
                        ("fpu sse2 avx2 amx_tile amx_bf16", "bfloat16"),
                        ("fpu sse2 avx2 avx512f avx512_vnni", "float32")]:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert native_dtype(str(cpuinfo)) == want
    assert native_dtype(str(tmp_path / "absent")) == "float32"
    # the config resolves auto once, to this machine's answer; explicit values stay as written
    assert build_config({"model": {"dtype": "auto"}}).model.dtype == native_dtype()
    assert build_config({"model": {"dtype": "float32"}}).model.dtype == "float32"


def test_learner_attention_is_eager_only_for_bf16_on_cpu():
    """learner.attn_implementation auto: eager for bf16 on a CPU (PyTorch's CPU flash-attention
    backward is slow in bf16), sdpa for fp32 and on GPUs; an explicit choice stays."""
    import torch

    from actors.learner import attention_backend

    assert attention_backend("auto", torch.bfloat16, cuda=False) == "eager"
    assert attention_backend("auto", torch.float32, cuda=False) == "sdpa"
    assert attention_backend("auto", torch.bfloat16, cuda=True) == "sdpa"
    assert attention_backend("sdpa", torch.bfloat16, cuda=False) == "sdpa"
    assert attention_backend("eager", torch.float32, cuda=True) == "eager"
