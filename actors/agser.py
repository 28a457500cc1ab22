"""AGSER: attention-guided self-reflection for zero-shot hallucination detection (Liu et al. 2025).

For a query X (M tokens) and the model's greedy answer Y:
  1. score every query token by how much the model attends to it (two variants below);
  2. X_att = the top k = ceil(2/3 M) tokens in their original order, X_non_att = the rest;
  3. Y_att = f(X_att), Y_non_att = f(X_non_att);
  4. r = lambda * RougeL(Y_att, Y) - RougeL(Y_non_att, Y). Low r: likely hallucination.

Score variants, read at one position i (the last prompt token, the one that emits the answer)
and averaged over layers (all layers by default; the paper's ablation: first layer only is worse):
  - "attention": the attention weight A[l, h, i, j], mean over heads;
  - "value": the norm of the value-weighted contribution sum_h A[l,h,i,j] (x_j W_V^h) W_O^h (the seed's).

Rouge-L tokenisation: rouge-score's default tokenizer drops every non-ASCII character (Chinese
answers would all score 0), so words here are Unicode \\w+ runs, lower-cased, and each CJK
character is one word (the same convention as the language-consistency reward).

The pure functions need only torch and rouge-score; JudgeWorker runs the models.
"""
from __future__ import annotations

import math
import re
import time

import torch

_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]|[^\W_]+", re.UNICODE)


class UnicodeWordTokenizer:
    """rouge-score tokenizer: lower-cased Unicode words; each CJK/kana/hangul character is a word."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


_SCORER = None


def rouge_l(candidate: str, reference: str) -> float:
    """Rouge-L F-measure (rouge-score package, UnicodeWordTokenizer); 0 when either side is empty."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWordTokenizer())
    return float(_SCORER.score(reference, candidate)["rougeL"].fmeasure)


def attention_scores(attn_row: torch.Tensor) -> torch.Tensor:
    """[L, H, M] attention weights from the read position to the M query tokens -> [L, M] (head mean)."""
    return attn_row.float().mean(dim=1)


def value_weighted_scores(attn_row: torch.Tensor, head_out: torch.Tensor) -> torch.Tensor:
    """|| sum_h A[l,h,j] * u[l,h,j,:] || per layer and query token.

    attn_row: [L, H, M] attention from the read position; head_out: [L, H, M, D] = x_j W_V^h W_O^h,
    each query token's value vector through head h's slice of the output projection. Returns [L, M].
    """
    return torch.einsum("lhm,lhmd->lmd", attn_row.float(), head_out.float()).norm(dim=-1)


def aggregate_layers(scores: torch.Tensor, layers: str | list[int] = "all") -> torch.Tensor:
    """[L, M] -> [M]: mean over all layers ("all"), the first ("first"), the last ("last") or a list."""
    if layers == "all":
        return scores.mean(dim=0)
    if layers == "first":
        return scores[0]
    if layers == "last":
        return scores[-1]
    if isinstance(layers, list | tuple) and layers:
        return scores[list(layers)].mean(dim=0)
    raise ValueError(f"layers must be 'all', 'first', 'last' or a non-empty list of indices, got {layers!r}")


def split_query(token_ids: list[int], scores, frac: float = 2 / 3,
                units: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(X_att, X_non_att): the top k = ceil(frac * U) units by score and the rest, both in order.

    units[j] is the unit (word) of token j (non-decreasing); a unit's score is the sum of its
    tokens' scores. None: every token is its own unit (the paper's token split). Equal scores go
    to the earlier unit. frac must be in (0, 1).
    """
    m = len(token_ids)
    if len(scores) != m:
        raise ValueError(f"{len(scores)} scores for {m} query tokens")
    if not 0 < frac < 1:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    units = list(range(m)) if units is None else list(units)
    if len(units) != m or any(b < a for a, b in zip(units, units[1:])):
        raise ValueError("units must give one non-decreasing unit index per token")
    totals: dict[int, float] = {}
    for u, sc in zip(units, scores):
        totals[u] = totals.get(u, 0.0) + float(sc)
    k = math.ceil(frac * len(totals))
    top = set(sorted(totals, key=lambda u: (-totals[u], u))[:k])
    return ([t for t, u in zip(token_ids, units) if u in top],
            [t for t, u in zip(token_ids, units) if u not in top])


def word_units(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """The whitespace-separated word of each token, from the tokenizer's character offsets.

    A token's word is the one holding its first non-space character; a token of spaces only
    belongs to the word that follows it.
    """
    word_of, word = [], -1
    for i, ch in enumerate(text):
        if not ch.isspace() and (i == 0 or text[i - 1].isspace()):
            word += 1
        word_of.append(word)
    last = max(word, 0)
    units = []
    for a, b in offsets:
        pos = next((i for i in range(a, len(text)) if not text[i].isspace()), None)
        units.append(last if pos is None else max(word_of[pos], 0))
    return units


def agser_score(y: str, y_att: str, y_non_att: str, lam: float = 1.0) -> dict:
    """r = lam * RougeL(Y_att, Y) - RougeL(Y_non_att, Y), with both parts."""
    r_att, r_non = rouge_l(y_att, y), rouge_l(y_non_att, y)
    return {"r_att": r_att, "r_non_att": r_non, "score": lam * r_att - r_non}


def roc_auc(scores: list[float], labels: list[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count 1/2); label 1 should score higher."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        raise ValueError(f"AUC needs both labels (got {len(pos)} positive, {len(neg)} negative)")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def answer_text(completion: str) -> str:
    """What Rouge compares: the <answer> span; after an unclosed <answer> (cut at max_tokens) the
    rest; else the whole completion without think tags."""
    from actors.rewards import ANSWER, extract_answer

    inner = extract_answer(completion)
    if inner is not None:
        return inner
    if ANSWER in completion:
        return completion[completion.rfind(ANSWER) + len(ANSWER):].strip()
    return completion.replace("<think>", " ").replace("</think>", " ")


class JudgeWorker:
    """Scores hallucination with AGSER: attention through transformers, generation through vLLM.

    The judge is a fixed model by path or the current policy (update_weights from the learner,
    like a rollout worker). Run as a pool of Ray actors (drivers.ray_utils.ActorGroup).
    """

    def __init__(self, model_path: str, *, dtype: str = "float32", max_tokens: int = 32, frac: float = 2 / 3,
                 lam: float = 1.0, layers: str | list[int] = "all", unit: str = "word", max_model_len: int = 1024,
                 kv_cache_gib: int = 1, cpu_threads: int = 0):
        from transformers import AutoModelForCausalLM

        from actors.rollout import RolloutWorker
        from drivers.config import RolloutConfig

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.engine = RolloutWorker(model_path, RolloutConfig(temperature=0.0, max_tokens=max_tokens,
                                                              max_model_len=max_model_len, kv_cache_gib=kv_cache_gib),
                                    dtype=dtype)
        self.tokenizer = self.engine.tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                          attn_implementation="eager").eval()
        if unit not in ("word", "token"):
            raise ValueError(f"unit must be 'word' or 'token', got {unit!r}")
        self.frac, self.lam, self.layers, self.max_tokens, self.unit = frac, lam, layers, max_tokens, unit
        self.calls = {"generate": 0, "forward": 0}
        from actors.prompts import prompt_text

        rendered = prompt_text(self.tokenizer, "\x00Q\x00")
        prefix, suffix = rendered.split("\x00Q\x00")
        # byte-level BPE attaches a space to the word after it: the query takes the template's
        # trailing space, so prefix + query + suffix are the ids the chat template itself gives
        self._lead = " " if prefix.endswith(" ") else ""
        self._prefix = self.tokenizer.encode(prefix.removesuffix(" "), add_special_tokens=False)
        self._suffix = self.tokenizer.encode(suffix, add_special_tokens=False)

    # ------------------------------------------------------------------ model runs
    def query_ids(self, question: str) -> list[int]:
        """The question's tokens as they appear inside the chat template."""
        return self.tokenizer.encode(self._lead + question, add_special_tokens=False)

    def query_units(self, question: str) -> list[int] | None:
        """The word of every query token (unit="word"), or None (unit="token")."""
        if self.unit == "token":
            return None
        text = self._lead + question
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return word_units(text, enc["offset_mapping"])

    def template_parts(self) -> tuple[list[int], list[int]]:
        """The chat template's token ids before and after the query."""
        return list(self._prefix), list(self._suffix)

    def prompt_ids(self, query_ids: list[int]) -> list[int]:
        """The chat-template prompt around query tokens (the same template the policy answers in)."""
        return self._prefix + list(query_ids) + self._suffix

    def _generate(self, prompts: list[list[int]], n: int = 1, **sampling) -> list:
        """Rollouts (text, and the prompt ids the engine answered) of each prompt, n per prompt."""
        self.calls["generate"] += len(prompts) * n
        return self.engine.generate([""] * len(prompts), n=n, prompt_ids=prompts, **sampling)

    @torch.no_grad()
    def token_scores(self, query_ids: list[list[int]], layers: str | list[int] | None = None) -> list[dict]:
        """Per query: {"attention": [M], "value": [M]} read at the last prompt position (one batched
        forward), and "ids": the unpadded prompt ids of that forward (the query at len(prefix)).
        layers: which layers are averaged (default: the judge's)."""
        layers = self.layers if layers is None else layers
        prompts = [self.prompt_ids(q) for q in query_ids]
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
        values = []  # v_proj outputs per layer: [B, T, KV * d]
        hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: values.append(o))
                 for layer in self.model.model.layers]
        try:
            out = self.model(input_ids=ids, attention_mask=mask, output_attentions=True)
        finally:
            for h in hooks:
                h.remove()
        self.calls["forward"] += len(prompts)
        cfg = self.model.config
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = cfg.hidden_size // heads
        start = len(self._prefix)
        results = []
        for b, q in enumerate(query_ids):
            read, span = len(prompts[b]) - 1, slice(start, start + len(q))
            attn_row = torch.stack([a[b, :, read, span] for a in out.attentions])           # [L, H, M]
            head_out = []
            for layer, v in zip(self.model.model.layers, values):
                v_b = v[b, span].view(len(q), kv, d).repeat_interleave(heads // kv, dim=1)  # [M, H, d]
                w_o = layer.self_attn.o_proj.weight.view(cfg.hidden_size, heads, d)         # [D, H, d]
                head_out.append(torch.einsum("mhd,Dhd->hmD", v_b.float(), w_o.float()))     # [H, M, D]
            results.append({
                "ids": ids[b, :len(prompts[b])].tolist(),
                "attention": aggregate_layers(attention_scores(attn_row), layers),
                "value": aggregate_layers(value_weighted_scores(attn_row, torch.stack(head_out)), layers)})
        return results

    # ------------------------------------------------------------------ scoring
    def score(self, questions: list[str], answers: list[str] | None = None,
              variants: tuple[str, ...] = ("attention", "value"), layers: str | list[int] | None = None) -> list[dict]:
        """AGSER per question. answers: the rollouts' completions to judge (None: greedy answers here);
        layers: the layers whose scores are averaged (default: the judge's).

        Returns per question {"answer", variant: {"score", "r_att", "r_non_att", "y_att", "y_non_att",
        "x_att", "x_non_att"}, "scored_ids": the prompt ids the attention was read from,
        "answer_prompt_ids": the prompt ids vLLM answered (None for a given answer), "seconds"}.
        """
        t0 = time.perf_counter()
        query_ids = [self.query_ids(q) for q in questions]
        answered = [None] * len(questions)
        if answers is None:
            outs = self._generate([self.prompt_ids(q) for q in query_ids])
            answers, answered = [o.text for o in outs], [o.prompt_ids for o in outs]
        scores = self.token_scores(query_ids, layers)
        units = [self.query_units(q) for q in questions]
        splits = [(v, i, split_query(q, s[v], self.frac, units[i]))
                  for i, (q, s) in enumerate(zip(query_ids, scores)) for v in variants]
        # both re-queries of every question and variant in one batched generate call
        texts = [o.text for o in self._generate([self.prompt_ids(part) for _, _, pair in splits for part in pair])]
        results = [{"question": q, "answer": a, "scored_ids": s["ids"], "answer_prompt_ids": p}
                   for q, a, s, p in zip(questions, answers, scores, answered)]
        for n, (variant, i, (att, non)) in enumerate(splits):
            y_att, y_non = texts[2 * n], texts[2 * n + 1]
            results[i][variant] = {**agser_score(answer_text(answers[i]), answer_text(y_att),
                                                 answer_text(y_non), self.lam),
                                   "y_att": y_att, "y_non_att": y_non,
                                   "x_att": self.tokenizer.decode(att), "x_non_att": self.tokenizer.decode(non)}
        for r in results:
            r["seconds"] = (time.perf_counter() - t0) / max(len(questions), 1)
        return results

    def self_consistency(self, questions: list[str], n: int = 20, temperature: float = 1.0,
                         seed: int = 0) -> list[dict]:
        """SelfCheckGPT-style baseline: n samples per question, mean Rouge-L to the greedy answer
        ("score"; "sample_scores": each sample's, in sampling order, for the baseline at fewer samples)."""
        query_ids = [self.query_ids(q) for q in questions]
        prompts = [self.prompt_ids(q) for q in query_ids]
        greedy = [o.text for o in self._generate(prompts)]
        samples = [o.text for o in self._generate(prompts, n=n, temperature=temperature, top_p=1.0, seed=seed)]
        out = []
        for i, g in enumerate(greedy):
            each = [rouge_l(answer_text(s), answer_text(g)) for s in samples[i * n:(i + 1) * n]]
            out.append({"answer": g, "score": sum(each) / n, "sample_scores": each})
        return out

    def update_weights(self, handles, version: int) -> dict:
        """Load the learner's weights (object-store buckets) into the vLLM engine and the HF model."""
        from actors.weight_sync import ObjectStoreTransport

        info = self.engine.update_weights(handles, version)
        state = dict(ObjectStoreTransport.iter_weights(handles))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"judge: unexpected weights {unexpected[:5]}")
        return info

    def checksum(self) -> float:
        """The vLLM engine's weight checksum (equal to a rollout worker's after the same sync)."""
        return self.engine.checksum()

    def reset_calls(self) -> dict:
        """The model-call counters so far, then zero them."""
        calls, self.calls = dict(self.calls), {"generate": 0, "forward": 0}
        return calls

    def close(self) -> None:
        """Stop the vLLM engine."""
        self.engine.close()
