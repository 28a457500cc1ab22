"""`r1ray agser-eval` and the facts worlds (countries, books) that test it on the embedded default.

agser-eval: rows {"question", "answers": [accepted strings], optional "relation", "subject", ...};
the label of a row is whether the model's greedy answer is correct by `judge_answer` (1 = correct,
0 = hallucinated): an accepted string in its first sentence, no other answer of the relation ahead
(rules: data/facts/README.md). AGSER (both score variants), r_att alone and a SelfCheckGPT-style
self-consistency baseline score every row; the AUC of each says how well it separates correct
from hallucinated answers. Real facts sets for it: data/facts/.
"""
from __future__ import annotations

import functools
import json
import random
import re
import time
import unicodedata
from pathlib import Path

# relation: (question phrasings (the first is asked in evaluation), possible values)
RELATIONS = {
    "capital": (["What is the capital of {e}?", "Name the capital city of {e}.", "{e} has which capital?",
                 "Tell me the capital of {e}."],
                ["Plim", "Varo", "Kesh", "Dunmar", "Tollis", "Brev", "Ostra", "Quill", "Morrow", "Fenn"]),
    "language": (["Which language is spoken in {e}?", "What do people speak in {e}?",
                  "Name the language of {e}.", "{e} speaks which language?"],
                 ["Olvish", "Tarric", "Bemmic", "Surran", "Kolish", "Avian", "Drennic", "Pellan", "Utric", "Gask"]),
    "currency": (["What is the currency of {e}?", "Which money is used in {e}?", "Name the currency of {e}.",
                  "{e} pays with which currency?"],
                 ["crown", "mark", "shell", "talon", "drim", "pence", "ruble", "lira", "bead", "coin"]),
}
_SYLLABLES = ["zor", "va", "nia", "bel", "kar", "ti", "os", "lun", "dra", "mes", "qui", "ran", "tho",
              "pel", "ga", "ru", "sel", "fen", "dor", "al", "wen", "xi", "ba", "mor"]


def facts_world(n_known: int = 40, n_unknown: int = 40, seed: int = 0, phrasings: int = 4) -> dict:
    """A world of invented countries with a capital, a language and a currency each.

    Returns {"sft": [{"prompt", "completion"}] for the known countries only, each fact in
    `phrasings` phrasings (knowledge that survives rewording, as a real model's does), "eval":
    [{"question", "answers", "known"}] for every country and relation, in the first phrasing}.
    Names are unique and never reused.
    """
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_known + n_unknown:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([2, 3]))).capitalize()
        if name not in names:
            names.append(name)
    sft, evaluation = [], []
    for idx, entity in enumerate(names):
        known = idx < n_known
        for templates, values in RELATIONS.values():
            value = rng.choice(values)
            if known:
                sft += [{"prompt": t.format(e=entity), "completion": f"<answer> {value} </answer>"}
                        for t in templates[:phrasings]]
            evaluation.append({"question": templates[0].format(e=entity), "answers": [value], "known": known})
    return {"sft": sft, "eval": evaluation}


# The paper's Books set in miniature: "Who wrote <title>?" with a two-word author. Titles and
# authors are built from shared word pools, so an unknown title is made of familiar words.
BOOK_TITLE_WORDS = (
    ["Silent", "Hollow", "Crimson", "Distant", "Broken", "Golden", "Quiet", "Frozen", "Hidden", "Burning",
     "Pale", "Wild", "Iron", "Lost", "Bitter", "Velvet"],
    ["Garden", "River", "Tower", "Orchard", "Harbor", "Mirror", "Lantern", "Forest", "Bridge", "Meadow",
     "Crown", "Winter", "Island", "Letter", "Voyage", "Shadow"],
    ["Morrow", "Kesh", "Dunmar", "Tollis", "Varo", "Ostra", "Fenn", "Brevik", "Plim", "Quillon", "Sarn",
     "Ulm", "Arden", "Corvo", "Lisk", "Thale"])
BOOK_AUTHOR_WORDS = (
    ["Ana", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Katya", "Luca"],
    ["Quill", "Marsh", "Holt", "Renner", "Sallow", "Venn", "Okafor", "Lindqvist", "Petrov", "Achebe",
     "Moreau", "Tanaka"])
BOOK_QUESTIONS = ["Who wrote {t}?", "Who is the author of {t}?", "{t} was written by whom?",
                  "Name the writer of {t}."]


def books_world(n_known: int = 96, n_unknown: int = 96, seed: int = 0, phrasings: int = 1) -> dict:
    """Invented books "The <Adjective> <Noun> of <Place>", each by a two-word author.

    The same shape as facts_world: {"sft": the known books' authors, each asked in `phrasings`
    phrasings, "eval": every book asked "Who wrote <title>?" with "known"}. Answers of two words
    give Rouge-L partial credit (a hallucinated author is often half right). Titles are unique.
    """
    if not 1 <= phrasings <= len(BOOK_QUESTIONS):
        raise ValueError(f"phrasings must be in 1..{len(BOOK_QUESTIONS)}, got {phrasings}")
    adjectives, nouns, places = BOOK_TITLE_WORDS
    if n_known + n_unknown > len(adjectives) * len(nouns) * len(places):
        raise ValueError(f"at most {len(adjectives) * len(nouns) * len(places)} distinct titles")
    rng = random.Random(seed)
    titles: list[str] = []
    while len(titles) < n_known + n_unknown:
        title = f"The {rng.choice(adjectives)} {rng.choice(nouns)} of {rng.choice(places)}"
        if title not in titles:
            titles.append(title)
    sft, evaluation = [], []
    for idx, title in enumerate(titles):
        known = idx < n_known
        author = " ".join(rng.choice(words) for words in BOOK_AUTHOR_WORDS)
        if known:
            sft += [{"prompt": q.format(t=title), "completion": f"<answer> {author} </answer>"}
                    for q in BOOK_QUESTIONS[:phrasings]]
        evaluation.append({"question": BOOK_QUESTIONS[0].format(t=title), "answers": [author], "known": known})
    return {"sft": sft, "eval": evaluation}


WORLDS = {"countries": facts_world, "books": books_world}


def write_facts_world(out: str | Path, world: str = "countries", **kwargs) -> dict:
    """A facts world ("countries" or "books") written as out/sft.jsonl and out/eval.jsonl; returns the counts."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {sorted(WORLDS)}, got {world!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = WORLDS[world](**kwargs)
    for name in ("sft", "eval"):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows[name])
    return {"world": world, "sft_rows": len(rows["sft"]), "eval_rows": len(rows["eval"]), "out": str(out)}


def load_agser_rows(path: str | Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """{"question", "answers"} rows; bad rows are counted and skipped with their line numbers."""
    rows, skipped = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                skipped.append((lineno, f"not UTF-8 JSON ({type(err).__name__})"))
                continue
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
                skipped.append((lineno, "missing or empty 'question'"))
            elif not isinstance(row.get("answers"), list) or not row["answers"] or \
                    not all(isinstance(a, str) and a.strip() for a in row["answers"]):
                skipped.append((lineno, "'answers' must be a non-empty list of strings"))
            else:
                rows.append(row)
    return rows, skipped


def matches(answer: str, accepted: list[str]) -> bool:
    """Case- and whitespace-insensitive equality of the final answer with an accepted string.

    The strict rule of the invented facts worlds; `judge_answer` is the one agser-eval labels with.
    """
    from actors.agser import answer_text

    norm = " ".join(answer_text(answer).lower().split())
    return any(norm == " ".join(a.lower().split()) for a in accepted)


# --- judging a free-form answer (data/facts/README.md, "Labels") ---------------------------------
_DROPPED = "'\u2019\u2018\u02bb\u02bc`\u00b4"          # apostrophes: "pa'anga" == "paanga"
_TRANSLIT = str.maketrans({"ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE",
                           "œ": "oe", "Œ": "OE", "ß": "ss", "ı": "i", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D",
                           **{c: None for c in _DROPPED}})
# Symbols and codes: one capital and up to two small letters ("Fe", "I"), or 2-4 capitals ("EUR").
_SYMBOL = re.compile(r"[A-Z][a-z]{0,2}|[A-Z]{2,4}")
# Symbols that are also English words or common abbreviations ("I", "In", "As", "No", "Mt."): they
# count only as the whole answer, after "is"/":"/"="/"symbol", or quoted, bold or in parentheses.
AMBIGUOUS_SYMBOLS = frozenset({"i", "in", "as", "at", "be", "he", "no", "am", "pm", "mt", "co", "re", "pa",
                               "ho", "la", "er", "md", "al", "u"})
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\.\w\.)\s+|\n+")


def fold_text(text: str) -> str:
    """Accents stripped (NFKD without combining marks), ł đ ø æ œ ß ı þ ð spelt in ASCII, apostrophes
    dropped; case and other punctuation kept."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text.translate(_TRANSLIT)


def normalize_text(text: str) -> str:
    """fold_text, casefolded, punctuation to spaces (currency signs kept), spaces collapsed."""
    text = fold_text(text).casefold()
    return " ".join("".join(c if c.isalnum() or unicodedata.category(c) == "Sc" else " " for c in text).split())


def answer_span(answer: str) -> str:
    """The part of an answer that is judged: the <answer> span when there is one (else the completion
    without think tags), cut to its first sentence that is not a question (an echoed question)."""
    from actors.agser import answer_text

    sentences = [s.strip() for s in _SENTENCE_END.split(answer_text(answer).strip()) if s.strip()]
    return next((s for s in sentences if not s.endswith("?")), sentences[0] if sentences else "")


@functools.lru_cache(maxsize=65536)
def _alias_matcher(alias: str) -> tuple[str, re.Pattern | None, str]:
    """(kind, pattern, needle) of an accepted string. Kinds: "sign" (€), "symbol" / "ambiguous"
    (exact case, whole token: Fe, EUR, In) or "phrase" (case-insensitive words, any punctuation
    between them, a plural "s"/"es" allowed on the last); ("none", None, "") for a string with
    nothing to match. The needle is a substring of every match (casefolded for phrases): a pre-test."""
    folded = fold_text(alias).strip()
    words = re.findall(r"[^\W_]+", folded)
    if not words:
        signs = "".join(c for c in folded if not c.isspace())
        return ("sign", re.compile(re.escape(signs)), signs) if signs else ("none", None, "")
    if _SYMBOL.fullmatch(folded):
        kind = "ambiguous" if folded.casefold() in AMBIGUOUS_SYMBOLS else "symbol"
        return kind, re.compile(rf"(?<![^\W_]){re.escape(folded)}(?![^\W_])"), folded
    plural = "(?:e?s)?" if words[-1][-1].isalpha() else ""
    body = r"[\W_]+".join(re.escape(w) for w in words)
    return ("phrase", re.compile(rf"(?<![^\W_]){body}{plural}(?![^\W_])", re.IGNORECASE),
            max(words, key=len).casefold())


_CONFIRMS_BEFORE = re.compile(r"(?:(?<![^\W_])(?:is|symbol)|[:=])\W*$", re.IGNORECASE)
_CONFIRMS_AFTER = re.compile(r"\W*$|\s*[.,;:!?)\]\"*]")
_WRAPPED = re.compile(r"[\"*(\[]\s*$")


def _alias_spans(alias: str, span: str, lowered: str | None = None) -> list[tuple[int, int]]:
    """Where an accepted string occurs in a folded answer span (`lowered`: its casefold), by the rules
    of its kind."""
    kind, pattern, needle = _alias_matcher(alias)
    if pattern is None or needle not in (span if kind != "phrase" else lowered or span.casefold()):
        return []
    spans = []
    for m in pattern.finditer(span):
        if kind == "ambiguous":
            before, after = span[:m.start()], span[m.end():]
            alone = not re.search(r"[^\W_]", before + after)            # the whole answer is the token
            stated = _CONFIRMS_BEFORE.search(before) and _CONFIRMS_AFTER.match(after)
            wrapped = _WRAPPED.search(before) and re.match(r"\s*[\"*)\]]", after)
            if not (alone or stated or wrapped):
                continue
        spans.append((m.start(), m.end()))
    return spans


def judge_answer(answer: str, accepted: list[str], others: list[str] | tuple = (), subject: str | None = None) -> bool:
    """Is a free-form answer correct? True when an accepted string occurs in the judged span
    (`answer_span`) and no other answer of the relation (`others`, e.g. `distractors(rows)[i]`) is
    mentioned ahead of it. Rules, in data/facts/README.md: accents, case and punctuation do not
    count, except that symbols and codes (Fe, EUR) match in their exact case as whole tokens and
    symbols that are English words (I, In, As, No) only when plainly stated; where two matches
    overlap the longer wins ("US dollar" over "dollar", "Northern Sotho" over "Sotho"); a match
    inside a mention of the question's `subject` (Tonga the language in "the language of Tonga")
    does not count. A span that is exactly an accepted name (not a symbol) is always correct.
    """
    span = fold_text(answer_span(answer))
    whole = normalize_text(span)
    if any(_alias_matcher(a)[0] == "phrase" and whole == normalize_text(a) for a in accepted):
        return True
    lowered = span.casefold()
    hits = [(s, e, True) for a in accepted for s, e in _alias_spans(a, span, lowered)]
    if not hits:
        return False
    hits += [(s, e, False) for a in others for s, e in _alias_spans(a, span, lowered)]
    if subject:
        masked = _alias_spans(subject, span)
        hits = [h for h in hits if not any(ms <= h[0] and h[1] <= me for ms, me in masked)]
    kept = [h for h in hits if not any(o[0] <= h[0] and h[1] <= o[1] and o[1] - o[0] > h[1] - h[0] for o in hits)]
    if not kept:
        return False
    first = min(kept, key=lambda h: (h[0], not h[2]))   # the earliest; on a tie an accepted one
    return first[2]


def distractors(rows: list[dict]) -> list[list[str]]:
    """For each row, the accepted strings of the other rows of its relation (the rows' "relation";
    rows without one form one group), less those that normalise like one of the row's own."""
    by_relation: dict = {}
    for row in rows:
        for a in row["answers"]:
            by_relation.setdefault(row.get("relation"), {}).setdefault(normalize_text(a), a)
    out = []
    for row in rows:
        own = {normalize_text(a) for a in row["answers"]}
        out.append([a for norm, a in by_relation[row.get("relation")].items() if norm not in own])
    return out


def judge_rows(answers: list[str], rows: list[dict]) -> list[int]:
    """1/0 labels of answers to rows by judge_answer, with each row's distractors and subject."""
    others = distractors(rows)
    return [int(judge_answer(a, r["answers"], o, r.get("subject"))) for a, r, o in zip(answers, rows, others)]


def relation_breakdown(rows: list[dict], labels: list[int]) -> dict[str, dict]:
    """Per relation (rows without one under "none"): rows, correct, hallucinated and accuracy."""
    out: dict[str, dict] = {}
    for row, y in zip(rows, labels):
        d = out.setdefault(str(row.get("relation") or "none"), {"rows": 0, "correct": 0})
        d["rows"] += 1
        d["correct"] += int(y)
    for d in out.values():
        d["hallucinated"] = d["rows"] - d["correct"]
        d["accuracy"] = d["correct"] / d["rows"]
    return dict(sorted(out.items()))


def run_agser_eval(model: str, data: str, *, n_samples: int = 20, max_tokens: int = 40,
                   dtype: str = "float32", layers: str = "all", frac: float = 2 / 3, unit: str = "word",
                   seed: int = 0, cpu_threads: int = 0, layer_choices: tuple = ()) -> dict:
    """AUCs of AGSER (attention / value variants), r_att alone and self-consistency (n samples, and
    its first 3 / 5 / 10 of them: the baseline at a smaller budget); calls per query. The judge
    uses cpu_threads threads (0: every core; an evaluation has the machine to itself).
    layer_choices: other layer sets ("first", "last", [indices]) scored too, on the same answers."""
    import os

    import ray

    from actors.agser import JudgeWorker, roc_auc
    from drivers.ray_utils import ActorGroup, init_ray

    if not 0 < frac < 1:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    rows, skipped = load_agser_rows(data)
    for lineno, why in skipped[:20]:
        print(f"skipped data row {lineno}: {why}")
    if not rows:
        raise ValueError(f"{data}: no usable rows ({len(skipped)} skipped)")
    t0 = time.perf_counter()
    init_ray()
    threads = cpu_threads or os.cpu_count() or 1
    judges = ActorGroup(JudgeWorker, 1, name="judge", env={"OMP_NUM_THREADS": str(threads)},
                        kwargs_fn=lambda r, a, p: dict(model_path=model, dtype=dtype, max_tokens=max_tokens,
                                                       layers=layers, frac=frac, unit=unit, cpu_threads=threads))
    judge = judges.actors[0]
    try:
        questions = [r["question"] for r in rows]
        t1 = time.perf_counter()
        agser = ray.get(judge.score.remote(questions))
        agser_calls, agser_s = ray.get(judge.reset_calls.remote()), time.perf_counter() - t1
        answers = [a["answer"] for a in agser]
        by_layers = {str(c): ray.get(judge.score.remote(questions, answers, layers=c)) for c in layer_choices}
        ray.get(judge.reset_calls.remote())
        t1 = time.perf_counter()
        baseline = ray.get(judge.self_consistency.remote(questions, n=n_samples, seed=seed))
        base_calls, base_s = ray.get(judge.reset_calls.remote()), time.perf_counter() - t1
    finally:
        judges.kill()
    labels = judge_rows([a["answer"] for a in agser], rows)
    n = len(rows)
    out = {"rows": n, "skipped": len(skipped), "correct": sum(labels), "hallucinated": n - sum(labels),
           "layers": layers, "unit": unit, "frac": frac}
    if any(r.get("relation") for r in rows):
        out["by_relation"] = relation_breakdown(rows, labels)
    for group in (True, False):  # the facts world marks rows of trained ("known") entities
        ys = [y for y, r in zip(labels, rows) if r.get("known") is group]
        if ys:
            out[f"accuracy_{'known' if group else 'unknown'}"] = sum(ys) / len(ys)
    if 0 < sum(labels) < n:
        out["auc"] = {"agser_attention": roc_auc([a["attention"]["score"] for a in agser], labels),
                      "agser_value": roc_auc([a["value"]["score"] for a in agser], labels),
                      "r_att_attention": roc_auc([a["attention"]["r_att"] for a in agser], labels),
                      "r_att_value": roc_auc([a["value"]["r_att"] for a in agser], labels),
                      "r_non_att_attention": roc_auc([-a["attention"]["r_non_att"] for a in agser], labels),
                      f"self_consistency_n{n_samples}": roc_auc([b["score"] for b in baseline], labels)}
        for choice, scored in by_layers.items():
            for variant in ("attention", "value"):
                out["auc"][f"agser_{variant}_layers_{choice}"] = roc_auc([a[variant]["score"] for a in scored], labels)
        for m in (3, 5, 10):       # the same samples, fewer of them: the baseline at a smaller budget
            if m < n_samples:
                out["auc"][f"self_consistency_n{m}"] = roc_auc(
                    [sum(b["sample_scores"][:m]) / m for b in baseline], labels)
    else:
        out["auc"] = None  # one label only: nothing to separate
    # model calls per query: AGSER = 1 greedy + 2 re-queries per variant + 1 attention forward
    per_variant = {"generate": 3, "forward": 1}
    out["calls_per_query"] = {
        "agser_one_variant": sum(per_variant.values()),
        "agser_both_variants_as_run": (agser_calls["generate"] + agser_calls["forward"]) / n,
        "self_consistency": (base_calls["generate"] + base_calls["forward"]) / n}
    out["calls_ratio_agser_vs_baseline"] = out["calls_per_query"]["agser_one_variant"] / \
        out["calls_per_query"]["self_consistency"]
    out["seconds"] = {"agser_both_variants": round(agser_s, 2), "self_consistency": round(base_s, 2),
                      "total": round(time.perf_counter() - t0, 1)}
    out["per_row"] = [{"label": y, "known": r.get("known"), "attention": a["attention"]["score"],
                       "value": a["value"]["score"], "self_consistency": b["score"]}
                      for a, b, y, r in zip(agser, baseline, labels, rows)]
    out["examples"] = [{"question": a["question"], "label": y, "answer": a["answer"],
                        "x_att": a["attention"]["x_att"], "y_att": a["attention"]["y_att"],
                        "x_non_att": a["attention"]["x_non_att"], "y_non_att": a["attention"]["y_non_att"],
                        "score": a["attention"]["score"]} for a, y in list(zip(agser, labels))[:4]]
    return out
