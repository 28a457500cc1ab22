"""pass@k / cons@k against hand-computed values; `r1ray sft` then `r1ray eval` on the tiny model."""
import json
from fractions import Fraction
from math import prod

import pytest

from drivers.evaluate import majority_vote, pass_at_k, summarize_eval


def _pass_at_k_product(n, c, k):
    # an independent form: 1 - prod_{i=n-c+1}^{n} (1 - k / i)
    if n - c < k:
        return 1.0
    return 1.0 - float(prod(Fraction(i - k, i) for i in range(n - c + 1, n + 1)))


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)      # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)   # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 3, 2) == 1.0                            # fewer than k wrong samples
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    for n, c, k in [(16, 5, 4), (64, 7, 8), (20, 1, 1), (33, 30, 4)]:
        assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_product(n, c, k), abs=1e-12)
    for bad in [(4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(*bad)


def test_majority_vote_ties_go_to_the_first_seen_answer_and_numbers_compare_exactly():
    assert majority_vote(["3", "4", "4", "3"]) == 0            # 2-2 tie: "3" came first
    assert majority_vote(["4", "3", "3", "4", "5"]) == 0
    assert majority_vote(["7", "18.0", "18", "$18"]) == 1      # 18.0 == 18 == $18
    assert majority_vote([None, None]) is None
    assert majority_vote([None, "5", None]) == 1               # unparseable answers do not vote
    assert majority_vote(["x + 1", "x  +  1", "y"]) == 0       # whitespace-normalised text


def test_summarize_eval_by_hand():
    def s(correct, answer, length):
        return {"correct": correct, "answer": answer, "length": length}

    per_prompt = [
        [s(True, "5", 10), s(False, "6", 20), s(False, "6", 30), s(True, "5", 40)],  # tie 5/6 -> "5": right
        [s(False, "1", 4), s(False, "2", 4), s(True, "3", 4), s(False, "2", 4)],     # "2" wins: wrong
    ]
    m = summarize_eval(per_prompt, [2, 4])
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)   # C(2,2)/C(4,2), C(3,2)/C(4,2)
    assert m["pass@4"] == 1.0 and m["cons@4"] == 0.5
    assert m["mean_length"] == pytest.approx((100 + 16) / 8)


def test_sft_then_eval_commands_on_the_tiny_model(ray_session, tiny_model_path, tmp_path, capsys, outcome_seed,
                                                   outcome_threads):
    """`r1ray sft` teaches the random tiny model the R1 layout; `r1ray eval` measures it.

    Margin (benchmarks/outcome_margins.py, seeds 0-2 x 1 and 2 threads, 2-core AMD EPYC): SFT format
    0.953-1.0 against the 0.5 asserted; nll_last / nll_first 0.049-0.066 against 0.5. The earlier
    budget (lr 2e-3, no warm-up) left the layout unlearned on this CPU (format 0.0 after 100
    steps, 0.27 after 200); with lr 0 the format stays at the base model's 0.0.
    """
    from drivers.cli import main
    from outcomes import report_outcome
    from drivers.tasks import arithmetic_examples, worked_example

    import random

    examples = arithmetic_examples(a_max=20, b_max=9, ops=["+"])
    random.Random(0).shuffle(examples)
    train, held = examples[:160], examples[160:176]
    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for ex in train:
            f.write(json.dumps({"prompt": ex["prompt"], "completion": worked_example(ex)}) + "\n")
        f.write(json.dumps({"prompt": "no completion here"}) + "\n")            # a bad row: skipped
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": e["prompt"], "answer": e["answer"]}) + "\n" for e in held))

    out = tmp_path / "sft-model"
    threads = ["--threads", str(outcome_threads)]
    assert main(["sft", "--model", tiny_model_path, "--data", str(data), "--out", str(out), "--epochs", "10",
                 "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "20", "--seed", str(outcome_seed)]
                + threads) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 160 and summary["skipped"] == 1 and summary["steps"] == 100
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    metrics = {}
    for name, model in (("base", tiny_model_path), ("sft", str(out))):
        assert main(["eval", "--model", model, "--data", str(test), "--k", "4", "--max-tokens", "48",
                     "--seed", str(outcome_seed), "--out", str(tmp_path / f"{name}.json")] + threads) == 0
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())
    print(json.dumps(metrics))
    base, sft = metrics["base"], metrics["sft"]
    report_outcome("sft_then_eval", "sft format >= 0.5 (base 0.0); nll_last < 0.5 nll_first",
                   sft_format=sft["format"], base_format=base["format"],
                   nll_ratio=summary["nll_last"] / summary["nll_first"], sft_pass1=sft["pass@1"])
    assert summary["nll_last"] < 0.5 * summary["nll_first"], summary
    assert sft["prompts"] == 16 and sft["samples_per_prompt"] == 4 and sft["verifier_failures"] == 0
    # 100 steps teach the R1 layout (the sums take the tiny recipe's 220 x 32 and RL)
    assert base["format"] == 0.0 and sft["format"] >= 0.5
    assert base["mean_length"] > sft["mean_length"]                # the base rambles to max_tokens
    assert 0.0 <= sft["pass@1"] <= sft["pass@2"] <= sft["pass@4"] <= 1.0


def test_sft_attention_dropout_acts_in_training_and_is_not_saved(ray_session, tiny_model_path, tmp_path):
    from transformers import AutoConfig

    from drivers.sft import run_sft

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Who wrote book {i}?", "completion": f"<answer> Ana {i} </answer>"})
                            + "\n" for i in range(8)))
    with pytest.raises(ValueError, match="attention_dropout"):        # before any actor starts
        run_sft(tiny_model_path, str(data), str(tmp_path / "bad"), attention_dropout=1.0)
    nll = {}
    for p in (0.0, 0.5):  # one step each from the same weights, batch and seed
        summary = run_sft(tiny_model_path, str(data), str(tmp_path / f"p{p}"), epochs=1, batch_size=8,
                          lr=1e-3, attention_dropout=p)
        assert summary["attention_dropout"] == p and summary["steps"] == 1
        nll[p] = summary["nll_first"]
        assert AutoConfig.from_pretrained(tmp_path / f"p{p}").attention_dropout == 0.0   # the model's own value
    assert abs(nll[0.5] - nll[0.0]) > 1e-3 * nll[0.0], nll   # dropout changed the training forward
