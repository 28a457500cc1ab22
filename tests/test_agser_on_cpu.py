"""AGSER: the split, the score aggregation and the Rouge combination by hand; the judge on a real model."""
import json
import math
import re

import pytest
import torch

from actors.agser import (UnicodeWordTokenizer, agser_score, aggregate_layers, attention_scores, roc_auc,
                          rouge_l, split_query, value_weighted_scores, word_units)


def test_split_keeps_the_top_two_thirds_in_order():
    ids, scores = [10, 11, 12, 13, 14], [0.1, 0.5, 0.2, 0.9, 0.3]
    assert split_query(ids, scores) == ([11, 12, 13, 14], [10])          # k = ceil(10/3) = 4
    assert split_query(ids[:3], scores[:3]) == ([11, 12], [10])           # k = 2
    assert split_query([1, 2, 3], [0.5, 0.5, 0.5]) == ([1, 2], [3])       # ties: earlier first
    assert split_query([7], [1.0]) == ([7], [])                           # k = ceil(2/3) = 1
    assert split_query(ids, scores, frac=0.4) == ([11, 13], [10, 12, 14])


def test_split_by_words_sums_token_scores_per_word():
    ids, units = [1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 2, 3]
    scores = [0.1, 0.1, 0.5, 0.2, 0.2, 0.05]                              # words: .2, .5, .4, .05
    assert split_query(ids, scores, units=units) == ([1, 2, 3, 4, 5], [6])   # k = ceil(8/3) = 3 words
    assert split_query(ids, scores, frac=0.5, units=units) == ([3, 4, 5], [1, 2, 6])


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="2 scores for 3"):
        split_query([1, 2, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match="frac"):
        split_query([1, 2], [0.1, 0.2], frac=1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        split_query([1, 2], [0.1, 0.2], units=[1, 0])


def test_word_units_from_offsets():
    text = " What is the capital?"
    # byte-level style tokens: " What", " is", " ", "the", " capital", "?"
    offsets = [(0, 5), (5, 8), (8, 9), (9, 12), (12, 20), (20, 21)]
    assert word_units(text, offsets) == [0, 1, 2, 2, 3, 3]


def test_rouge_l_by_hand_and_for_chinese():
    assert rouge_l("the cat", "the cat sat") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))   # 0.8
    assert rouge_l("Paris", "paris") == 1.0 and rouge_l("", "Paris") == 0.0
    # each CJK character is a word: LCS 2 of 2 and 5 -> P 1, R 0.4
    assert rouge_l("北京", "北京是首都") == pytest.approx(2 * 0.4 / 1.4)
    assert UnicodeWordTokenizer().tokenize("Café au lait, 北京!") == ["café", "au", "lait", "北", "京"]
    from rouge_score import rouge_scorer   # why the default tokenizer is not used: it drops CJK

    assert rouge_scorer.RougeScorer(["rougeL"]).score("北京是首都", "北京")["rougeL"].fmeasure == 0.0


def test_agser_score_combination():
    r = agser_score("Paris", "Paris", "London")
    assert r == {"r_att": 1.0, "r_non_att": 0.0, "score": 1.0}
    r = agser_score("the river Seine", "the Seine", "the river Thames", lam=0.5)
    assert r["r_att"] == pytest.approx(0.8) and r["r_non_att"] == pytest.approx(2 / 3)
    assert r["score"] == pytest.approx(0.5 * 0.8 - 2 / 3)


def test_answer_text_compares_the_answer_part():
    from actors.agser import answer_text

    assert answer_text(" <think> a </think> <answer> Katya Quill </answer>") == "Katya Quill"
    assert answer_text(" <answer> Katya Lindq") == "Katya Lindq"        # cut at max_tokens: no tag word
    assert answer_text("<think> x </think> plain") == "  x   plain"
    assert rouge_l(answer_text(" <answer> Ana"), answer_text("<answer> Ana Holt </answer>")) == pytest.approx(2 / 3)


def test_roc_auc_by_hand():
    assert roc_auc([0.9, 0.8, 0.3, 0.3], [1, 0, 1, 0]) == pytest.approx(2.5 / 4)
    assert roc_auc([3, 2, 1], [1, 1, 0]) == 1.0 and roc_auc([1, 2, 3], [1, 1, 0]) == 0.0
    with pytest.raises(ValueError, match="both labels"):
        roc_auc([1, 2], [1, 1])


def test_score_aggregation_against_loops():
    torch.manual_seed(0)
    L, H, M, D = 3, 4, 5, 6
    attn, u = torch.rand(L, H, M), torch.randn(L, H, M, D)
    ref = torch.zeros(L, M)
    for l in range(L):
        for j in range(M):
            ref[l, j] = sum(attn[l, h, j] * u[l, h, j] for h in range(H)).norm()
    assert torch.allclose(value_weighted_scores(attn, u), ref, atol=1e-5)
    assert torch.allclose(attention_scores(attn), attn.mean(1))
    s = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    assert aggregate_layers(s).tolist() == [3.0, 3.0] and aggregate_layers(s, "first").tolist() == [1.0, 2.0]
    assert aggregate_layers(s, [1, 2]).tolist() == [4.0, 3.5] and aggregate_layers(s, "last").tolist() == [5.0, 1.0]
    with pytest.raises(ValueError, match="layers"):
        aggregate_layers(s, "middle")


def _reference_scores(model, prefix, query, suffix):
    """Independent: recompute A and x W_V W_O per layer from the modules, one unpadded query."""
    ids = torch.tensor([prefix + query + suffix])
    out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    read, span = ids.shape[1] - 1, range(len(prefix), len(prefix) + len(query))
    att, val = [], []
    for l, layer in enumerate(model.model.layers):
        A = out.attentions[l][0, :, read]                                   # [H, T]
        v = layer.self_attn.v_proj(layer.input_layernorm(out.hidden_states[l]))[0]   # [T, KV*d]
        W = layer.self_attn.o_proj.weight                                   # [D, H*d]
        att.append([float(A[:, j].mean()) for j in span])
        val.append([float(sum(A[h, j] * (W[:, h * d:(h + 1) * d] @ v[j, (h // (H // KV)) * d:(h // (H // KV) + 1) * d])
                              for h in range(H)).norm()) for j in span])
    return torch.tensor(att).mean(0), torch.tensor(val).mean(0)


def test_judge_worker_scores_match_an_independent_computation_and_counts_calls(ray_session, tiny_model_path):
    from transformers import AutoModelForCausalLM

    from actors.agser import JudgeWorker

    judge = ray_session.remote(num_cpus=1)(JudgeWorker).remote(tiny_model_path, max_tokens=8)
    try:
        questions = ["What is 2 + 3?", "What is the capital of Zorvania, the old one?", "Who?"]
        qids = [ray_session.get(judge.query_ids.remote(q)) for q in questions]
        prefix, suffix = ray_session.get(judge.template_parts.remote())
        batched = ray_session.get(judge.token_scores.remote(qids))                  # padded batch
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="eager").eval()
        with torch.no_grad():
            for q, got in zip(qids, batched):
                att, val = _reference_scores(model, prefix, q, suffix)
                assert torch.allclose(got["attention"], att, atol=1e-5)
                assert torch.allclose(got["value"], val, rtol=1e-4, atol=1e-5)
        ray_session.get(judge.reset_calls.remote())
        results = ray_session.get(judge.score.remote(questions))
        calls = ray_session.get(judge.reset_calls.remote())
        assert calls == {"generate": 3 + 3 * 2 * 2, "forward": 3}    # greedy + 2 re-queries x 2 variants
        for r in results:
            for v in ("attention", "value"):
                assert -1.0 <= r[v]["score"] <= 1.0 and r[v]["score"] == pytest.approx(r[v]["r_att"] - r[v]["r_non_att"])
                words = len(r["question"].split())
                assert len(r[v]["x_att"].split()) == math.ceil(2 / 3 * words)   # whole words kept
        # the rollout's own answer can be judged instead of a fresh greedy one: 1 generate fewer
        ray_session.get(judge.score.remote(questions[:1], answers=["<answer> 5 </answer>"]))
        assert ray_session.get(judge.reset_calls.remote()) == {"generate": 4, "forward": 1}
    finally:
        ray_session.kill(judge)


def test_agser_on_smollm2_reads_the_ids_vllm_answered_and_matches_a_recomputation(ray_session, smollm2_path):
    """The real model, a few rows of each facts set: the prompt vLLM answered, the prompt the
    attention was read from and the chat template's own rendering are the same ids; the query's
    word units are its words; the scores and the split match an independent recomputation."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.agser import JudgeWorker, answer_text
    from actors.prompts import prompt_ids

    facts = Path(__file__).resolve().parents[1] / "data" / "facts"
    rows = [json.loads(line) for name in ("element_symbol", "country_currency", "country_language")
            for line in (facts / f"{name}.jsonl").read_text().splitlines()[:2]]
    questions = [r["question"] for r in rows]
    judge = ray_session.remote(num_cpus=1)(JudgeWorker).remote(smollm2_path, max_tokens=16)
    try:
        results = ray_session.get(judge.score.remote(questions))
        qids = [ray_session.get(judge.query_ids.remote(q)) for q in questions]
        units = [ray_session.get(judge.query_units.remote(q)) for q in questions]
        prefix, suffix = ray_session.get(judge.template_parts.remote())
        batched = ray_session.get(judge.token_scores.remote(qids))       # one padded batch
    finally:
        ray_session.kill(judge)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, attn_implementation="eager").eval()
    for q, ids, unit, r, got in zip(questions, qids, units, results, batched):
        rendered = prompt_ids(tok, q)                   # how the policy is prompted with q
        assert r["answer_prompt_ids"] == rendered       # the ids vLLM answered (its own echo)
        assert r["scored_ids"] == rendered              # the ids the attention was read from
        assert rendered[len(prefix):len(prefix) + len(ids)] == ids and rendered[len(prefix) + len(ids):] == suffix
        words = [tok.decode([t for t, u in zip(ids, unit) if u == w]).strip() for w in range(max(unit) + 1)]
        assert words == q.split()                       # word units map onto the BPE tokens
        with torch.no_grad():
            att, val = _reference_scores(model, prefix, ids, suffix)
        for variant, ref in (("attention", att), ("value", val)):
            assert torch.allclose(got[variant], ref, rtol=1e-4, atol=1e-6)
            keep, drop = split_query(ids, got[variant], 2 / 3, unit)      # the split of those scores
            assert r[variant]["x_att"] == tok.decode(keep) and r[variant]["x_non_att"] == tok.decode(drop)
            y = answer_text(r["answer"])
            assert r[variant]["score"] == pytest.approx(rouge_l(answer_text(r[variant]["y_att"]), y)
                                                        - rouge_l(answer_text(r[variant]["y_non_att"]), y))


def test_judge_pool_runs_inside_training_and_logs_to_wandb(ray_session, kill_actor, tiny_model_path, tmp_path):
    import time

    from drivers.config import build_config
    from drivers.tracking import read_offline_history
    from drivers.train import Run

    cfg = build_config({
        "run": {"name": "judge", "output_dir": str(tmp_path / "judge")}, "model": {"path": tiny_model_path},
        "task": {"a_max": 20, "b_max": 3, "heldout": 4},
        "rollout": {"group_size": 4, "max_tokens": 16, "max_model_len": 256},
        "train": {"steps": 3, "prompts_per_step": 4, "checkpoint_every": 3},
        "judge": {"enabled": True, "share": 0.5, "max_tokens": 8}})
    run = Run(cfg)
    try:
        run.cfg.train.steps = 2
        run.train()
        kill_actor(run.judges.actors[0])      # a judge dies: step 3 sends its answers to a dead actor
        run.cfg.train.steps = 3
        run.train()
        assert run.state.restarts == 1 and run.state.requeued_prompts == 2
        # the policy judge got every weight sync: its engine matches the rollout worker's
        judge_sum = ray_session.get(run.judges.actors[0].checksum.remote())
        assert judge_sum == pytest.approx(ray_session.get(run.rollout.actors[0].checksum.remote()))
        # all-scenario reward: a general prompt's completion gains reward_weight x the judge's score
        from actors.rewards import RewardResult

        run.cfg.judge.reward_weight = 0.5
        q, text = "What is the capital of Zorvia?", "<think>hm</think><answer> 12 </answer>"
        expect = ray_session.get(run.judges.actors[0].score.remote([q], [text], ("attention",)))[0]
        results = [RewardResult(0.2, components={"format": 1.0}), RewardResult(None, status="timeout")]
        run.judge_rewards([(q, text, results[0]), (q, text, results[1])])
        assert results[0].components == {"format": 1.0, "judge": expect["attention"]["score"]}
        assert results[0].reward == pytest.approx(0.2 + 0.5 * expect["attention"]["score"])
        assert results[1].reward is None and "judge" not in results[1].components   # a failed score stays failed
    finally:
        run.close()
    rows = [r for r in run.logger.history() if "agser/score_mean" in r]
    # each step's answers are launched (logged at a later step, or by the end of its train() call)
    # or skipped while the judge is busy; the step after a train() call always launches
    of_steps = [r["agser/of_step"] for r in rows]
    skipped = [r["agser/skipped_steps"] for r in run.logger.history() if "agser/skipped_steps" in r]
    assert of_steps == sorted(set(of_steps)) and of_steps[0] == 1 and of_steps[-1] == 3
    assert len(of_steps) + skipped[-1] == 3
    assert all(r["train/step"] >= r["agser/of_step"] for r in rows)
    assert all(r["agser/judged"] == 2 and -1 <= r["agser/score_mean"] <= 1 for r in rows)
    wandb_file = next((tmp_path / "judge").glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.time() + 120
    while time.time() < deadline:
        logged = [r for r in read_offline_history(wandb_file) if "agser/score_mean" in r]
        if logged and logged[-1]["_step"] == 3:
            break
        time.sleep(1)
    assert {r["_step"] for r in logged} == {r["train/step"] for r in rows}


def test_agser_rows_and_facts_world(tmp_path):
    from drivers.agser_eval import facts_world, load_agser_rows, matches

    path = tmp_path / "qa.jsonl"
    path.write_bytes(b"\n".join([
        b'{"question": "What is the capital of Pelvadra?", "answers": ["Kesh"]}',
        b'{"question": "", "answers": ["x"]}',
        b'{"question": "No answers?", "answers": []}',
        b'\xff\xfe',
        b'{"question": "Bad answers", "answers": [1]}',
    ]))
    rows, skipped = load_agser_rows(path)
    assert len(rows) == 1 and [n for n, _ in skipped] == [2, 3, 4, 5]
    assert matches(" <answer>  kesh </answer>", ["Kesh"]) and not matches("<answer> Kes </answer>", ["Kesh"])
    world = facts_world(n_known=3, n_unknown=2, seed=1, phrasings=4)
    assert len(world["sft"]) == 3 * 3 * 4 and len(world["eval"]) == 5 * 3
    known = {r["question"] for r in world["eval"] if r["known"]}
    assert known <= {r["prompt"] for r in world["sft"]}                  # evaluated phrasing was trained
    unknown = [r["question"] for r in world["eval"] if not r["known"]]
    names = {q.rsplit(" ", 1)[-1].rstrip("?") for q in unknown}
    assert not any(n in r["prompt"] for n in names for r in world["sft"])   # never seen in training


def test_books_world_and_its_command(tmp_path, capsys):
    from drivers.agser_eval import books_world, run_agser_eval, write_facts_world
    from drivers.cli import main

    world = books_world(n_known=5, n_unknown=4, seed=2, phrasings=2)
    assert len(world["sft"]) == 5 * 2 and len(world["eval"]) == 9
    titles = [r["question"].removeprefix("Who wrote ").removesuffix("?") for r in world["eval"]]
    assert len(set(titles)) == 9 and all(re.fullmatch(r"The \w+ \w+ of \w+", t) for t in titles)
    assert all(len(r["answers"][0].split()) == 2 for r in world["eval"])       # two-word authors
    trained = {r["prompt"]: r["completion"] for r in world["sft"]}
    for row, title in zip(world["eval"], titles):
        if row["known"]:  # asked as trained, in both phrasings, with its author
            assert trained[row["question"]] == trained[f"Who is the author of {title}?"] == \
                f"<answer> {row['answers'][0]} </answer>"
        else:             # never seen in training
            assert not any(title in prompt for prompt in trained)
    assert [r["known"] for r in world["eval"]] == [True] * 5 + [False] * 4
    with pytest.raises(ValueError, match="phrasings"):
        books_world(phrasings=5)
    with pytest.raises(ValueError, match="world must be one of"):
        write_facts_world(tmp_path, world="movies")
    with pytest.raises(ValueError, match="frac must be in"):   # before any actor starts
        run_agser_eval("no-such-model", "no-such-file.jsonl", frac=1.5)

    assert main(["facts-world", "--world", "books", "--out", str(tmp_path / "w"), "--known", "3",
                 "--unknown", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["world"] == "books" and summary["sft_rows"] == 3 and summary["eval_rows"] == 5
    rows = [json.loads(line) for line in (tmp_path / "w" / "eval.jsonl").read_text().splitlines()]
    assert [r["known"] for r in rows] == [True] * 3 + [False] * 2


def test_an_external_smollm2_judge_monitors_a_tiny_policy_without_holding_up_a_step(
        ray_session, tiny_model_path, smollm2_path, tmp_path):
    """judge.model_path = the real model while the policy is the tiny one: its weights stay fixed
    (no sync), its throughput is logged, and a step only ever spends a launch on it, never a wait."""
    from drivers.config import build_config
    from drivers.train import Run

    cfg = build_config({
        "run": {"name": "ext-judge", "output_dir": str(tmp_path / "ext")}, "model": {"path": tiny_model_path},
        "task": {"a_max": 20, "b_max": 3, "heldout": 4},
        "rollout": {"group_size": 4, "max_tokens": 16, "max_model_len": 512},
        "train": {"steps": 5, "prompts_per_step": 4, "checkpoint_every": 5},
        "judge": {"enabled": True, "model_path": smollm2_path, "share": 0.5, "max_tokens": 16}})
    run = Run(cfg)
    try:
        before = ray_session.get(run.judges.actors[0].checksum.remote())
        run.train()
        assert ray_session.get(run.judges.actors[0].checksum.remote()) == before   # fixed: never synced
    finally:
        run.close()
    history = [r for r in run.logger.history() if "agser/wait_seconds" in r]
    judged = [r for r in run.logger.history() if "agser/score_mean" in r]
    assert len(history) == 5 and judged
    of_steps = [r["agser/of_step"] for r in judged]
    assert of_steps == sorted(set(of_steps)) and of_steps[-1] <= 5
    # every step judged or skipped, never both: launches + skipped steps = steps
    assert len(of_steps) + history[-1]["agser/skipped_steps"] == 5
    busy = min(r["agser/judged"] / r["agser/queries_per_s"] for r in judged)    # seconds of one launch
    waits = [r["agser/wait_seconds"] for r in history]
    print(f"external judge: {len(of_steps)} launches, {history[-1]['agser/skipped_steps']} steps skipped, "
          f"{min(r['agser/queries_per_s'] for r in judged):.2f}-{max(r['agser/queries_per_s'] for r in judged):.2f} "
          f"queries/s, a launch {busy:.2f} s, the most a step waited {max(waits) * 1000:.1f} ms")
    assert max(waits) < 0.25 * busy, (waits, busy)
