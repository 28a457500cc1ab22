"""The real-world facts sets of data/facts/ and the answer judge that labels them (pure Python)."""
import json
from pathlib import Path

import pytest

from drivers.agser_eval import (answer_span, distractors, judge_answer, judge_rows, load_agser_rows, matches,
                                normalize_text, relation_breakdown)

FACTS = Path(__file__).resolve().parents[1] / "data" / "facts"
SETS = {"element_symbol": {"element_symbol", "symbol_element"}, "country_currency": {"country_currency"},
        "country_language": {"country_language"}}


@pytest.fixture(scope="module")
def sets():
    out = {}
    for name in SETS:
        rows, skipped = load_agser_rows(FACTS / f"{name}.jsonl")
        assert skipped == [], name
        out[name] = rows
    return out


def test_sets_load_whole_and_are_well_formed(sets):
    assert sorted(p.stem for p in FACTS.glob("*.jsonl")) == sorted(SETS)
    assert sum(len(rows) for rows in sets.values()) >= 500
    questions = []
    for name, rows in sets.items():
        assert len(rows) >= 150, name
        assert {r["relation"] for r in rows} == SETS[name]
        for r in rows:
            assert set(r) == {"question", "answers", "relation", "subject"}                 # extra fields kept
            assert r["answers"][0].strip() and len(set(r["answers"])) == len(r["answers"])
            assert r["subject"] in r["question"] and r["question"].endswith("?")
            assert "capital" not in r["question"].lower()                                # capitals: held out
        questions += [r["question"] for r in rows]
    assert len(questions) == len(set(questions))
    assert len({normalize_text(q) for q in questions}) == len(questions)


def test_the_committed_files_are_what_the_builder_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_facts", FACTS / "build_facts.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    counts = builder.write(tmp_path)
    assert counts == {"element_symbol": 236, "country_currency": 197, "country_language": 194}
    for name in SETS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (FACTS / f"{name}.jsonl").read_bytes(), name


def test_spot_checks(sets):
    def answers(name, relation, subject):
        [row] = [r for r in sets[name] if r["relation"] == relation and r["subject"] == subject]
        return row["answers"]

    elements = {"iron": "Fe", "gold": "Au", "sodium": "Na", "potassium": "K", "tungsten": "W", "lead": "Pb",
                "mercury": "Hg", "silver": "Ag", "tin": "Sn", "iodine": "I", "oganesson": "Og", "hydrogen": "H"}
    for name, symbol in elements.items():
        assert answers("element_symbol", "element_symbol", name) == [symbol]
        assert answers("element_symbol", "symbol_element", symbol)[0] == name
    assert "aluminum" in answers("element_symbol", "symbol_element", "Al")
    assert "wolfram" in answers("element_symbol", "symbol_element", "W")
    assert len(sets["element_symbol"]) == 2 * 118

    currency = {"Japan": "yen", "United Kingdom": "pound sterling", "United States": "US dollar", "India": "Indian rupee",
                "Switzerland": "Swiss franc", "Croatia": "euro", "Brazil": "real", "Poland": "złoty", "China": "yuan",
                "Senegal": "West African CFA franc", "Cameroon": "Central African CFA franc", "Ecuador": "USD",
                "South Africa": "rand", "Mexico": "Mexican peso", "Thailand": "baht"}
    for country, name in currency.items():
        assert name in answers("country_currency", "country_currency", country), country
    assert answers("country_currency", "country_currency", "Japan") == ["Japanese yen", "yen", "JPY"]
    assert answers("country_currency", "country_currency", "Germany") == ["euro", "EUR", "€"]
    bulgaria = answers("country_currency", "country_currency", "Bulgaria")
    assert bulgaria[0] == "euro" and "lev" in bulgaria                               # euro since 1 January 2026
    assert not any(r["subject"] == "Zimbabwe" for r in sets["country_currency"])       # disputed: left out

    language = {"France": "French", "Brazil": "Portuguese", "Japan": "Japanese", "Iran": "Persian", "Kenya": "Swahili",
                "Canada": "French", "Switzerland": "Romansh", "India": "Hindi", "Paraguay": "Guarani",
                "Belgium": "Dutch", "Austria": "German", "Israel": "Hebrew", "Pakistan": "Urdu"}
    for country, name in language.items():
        assert name in answers("country_language", "country_language", country), country
    assert "Spanish" not in answers("country_language", "country_language", "Brazil")
    assert "Catalan" not in answers("country_language", "country_language", "Spain")   # regional only


def test_answer_check_sentences_aliases_and_wrong_answers():
    yen = ["Japanese yen", "yen", "JPY"]
    assert judge_answer("The currency of Japan is the Japanese yen.", yen)
    assert judge_answer("Japan uses the yen (JPY) for everything.", yen)
    assert judge_answer("<think>hmm</think> <answer> JPY </answer>", yen)
    assert judge_answer("What is the currency of Japan? It is the yen.", yen)              # echoed question skipped
    assert not judge_answer("The currency of Japan is the won. The yen was used before.", yen)  # first sentence only
    assert not judge_answer("The currency of Japan is the jpy.", ["JPY"])                    # codes: exact case
    euro = ["euro", "EUR", "€"]
    assert judge_answer("Germany pays in Euros.", euro) and judge_answer("Prices are in €.", euro)
    assert not judge_answer("Germany uses the Europe-wide mark.", euro)                    # "euro" inside a word
    assert not judge_answer("The currency of Brazil is unrealistic to guess.", ["Brazilian real", "real"])
    assert not judge_answer("The currency of Albania is the Aleksandr.", ["Albanian lek", "lek"])
    assert not judge_answer("The currency of Peru is the Solomon.", ["Peruvian sol", "sol"])
    assert not judge_answer("", yen) and not judge_answer("The currency is Fenn.", ["Fe"])


def test_answer_check_accents_and_spellings():
    assert judge_answer("The currency of Poland is the zloty.", ["Polish złoty", "złoty"])
    assert judge_answer("The currency of Poland is the złoty.", ["zloty"])
    assert judge_answer("Vietnam uses the Vietnamese dong.", ["Vietnamese đồng", "đồng"])
    assert judge_answer("Costa Rica: the colon", ["Costa Rican colón", "colón"])
    assert judge_answer("Tonga uses the pa'anga.", ["Tongan paʻanga", "paʻanga"])
    assert judge_answer("The currency of Ecuador is the U.S. Dollar. It replaced the sucre.", ["US dollar", "U.S. dollar"])
    assert judge_answer("THE OFFICIAL LANGUAGE OF GERMANY IS GERMAN", ["German"])
    assert judge_answer("It is Māori and English.", ["Māori"]) and judge_answer("Maori", ["Māori"])


def test_answer_check_short_symbols():
    assert judge_answer("The chemical symbol of iron is Fe.", ["Fe"])
    assert judge_answer("**Fe**", ["Fe"]) and judge_answer("Fe", ["Fe"])
    assert not judge_answer("The chemical symbol of iron is FE.", ["Fe"])                # symbols: exact case
    assert not judge_answer("The chemical symbol of cobalt is CO.", ["Co"])              # carbon monoxide
    assert not judge_answer("Iron's symbol is Fer.", ["Fe"])
    # symbols that are English words count only when plainly stated
    assert judge_answer("The chemical symbol of iodine is I.", ["I"])
    assert judge_answer("I", ["I"]) and judge_answer('The symbol is "I".', ["I"]) and judge_answer("Iodine (I)", ["I"])
    assert not judge_answer("I think it is Io.", ["I"]) and not judge_answer("I believe so.", ["I"])
    assert judge_answer("The chemical symbol for indium is In.", ["In"])
    assert not judge_answer("In chemistry, indium is written Id.", ["In"])
    assert judge_answer("Helium's symbol: He", ["He"]) and not judge_answer("He said it is Hl.", ["He"])
    assert judge_answer("The symbol of arsenic is As, a metalloid.", ["As"])
    assert not judge_answer("As far as I know it is Ar.", ["As"])
    assert judge_answer("No", ["No"]) and not judge_answer("No, I do not know.", ["No"])
    assert not judge_answer("It is Be.", ["B"]) and judge_answer("It is B.", ["B"])


def test_answer_check_other_answers_ahead_are_wrong():
    cad, others = ["Canadian dollar", "CAD"], ["US dollar", "euro", "Australian dollar"]
    assert judge_answer("The currency of Canada is the Canadian dollar, not the US dollar.", cad, others)
    assert not judge_answer("The currency of Canada is the US dollar, like the Canadian dollar.", cad, others)
    assert not judge_answer("Canada uses the Australian dollar.", ["dollar"], others)       # the longer match wins
    xof = ["West African CFA franc", "CFA franc", "XOF"]
    assert judge_answer("Senegal uses the CFA franc.", xof, ["Central African CFA franc"])
    assert not judge_answer("Senegal uses the Central African CFA franc.", xof, ["Central African CFA franc"])
    swiss = ["German", "French", "Italian", "Romansh"]
    assert judge_answer("Switzerland has four: German, French, Italian and Romansh.", swiss, ["English"])
    assert not judge_answer("Switzerland speaks English and German.", swiss, ["English"])
    # a match inside the question's subject does not count: Tonga the country, not Tonga the language
    tongan = ["Tongan", "English"]
    assert judge_answer("The official language of Tonga is Tongan.", tongan, ["Tonga"], subject="Tonga")
    assert not judge_answer("The official language of Tonga is French.", tongan, ["Tonga", "French"], "Tonga")
    assert judge_answer("The official language of Laos is Lao.", ["Lao", "Laotian"], [], subject="Laos")


def test_every_row_labels_its_own_answers_right_and_another_rows_wrong(sets):
    sentence = {"element_symbol": "The chemical symbol of {s} is {a}.",
                "symbol_element": "The element with the symbol {s} is {a}.",
                "country_currency": "The currency of {s} is the {a}.",
                "country_language": "The official language of {s} is {a}."}
    for rows in sets.values():
        right = [sentence[r["relation"]].format(s=r["subject"], a=r["answers"][-1 if i % 2 else 0])
                 for i, r in enumerate(rows)]
        assert judge_rows(right, rows) == [1] * len(rows)
        wrong = []
        for i, r in enumerate(rows):   # the gold answer of the next row of the relation that differs
            own = {normalize_text(a) for a in r["answers"]}
            other = next(o for o in rows[i + 1:] + rows[:i] if o["relation"] == r["relation"]
                         and normalize_text(o["answers"][0]) not in own)
            wrong.append(sentence[r["relation"]].format(s=r["subject"], a=other["answers"][0]))
        assert judge_rows(wrong, rows) == [0] * len(rows)


def test_distractors_breakdown_and_loader_keep_extra_fields(tmp_path):
    rows = [{"question": "q1", "answers": ["euro", "EUR"], "relation": "c", "subject": "France"},
            {"question": "q2", "answers": ["Euro", "€"], "relation": "c", "subject": "Italy"},
            {"question": "q3", "answers": ["yen"], "relation": "c", "subject": "Japan"},
            {"question": "q4", "answers": ["Fe"], "relation": "s", "subject": "iron"},
            {"question": "q5", "answers": ["Kesh"]}]
    assert distractors(rows) == [["€", "yen"], ["EUR", "yen"], ["euro", "EUR", "€"], [], []]
    assert judge_rows(["The euro.", "Yen.", "It is the yen.", "Fe", "<answer> kesh </answer>"], rows) == [1, 0, 1, 1, 1]
    assert relation_breakdown(rows, [1, 0, 1, 1, 1]) == {
        "c": {"rows": 3, "correct": 2, "hallucinated": 1, "accuracy": 2 / 3},
        "none": {"rows": 1, "correct": 1, "hallucinated": 0, "accuracy": 1.0},
        "s": {"rows": 1, "correct": 1, "hallucinated": 0, "accuracy": 1.0}}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    loaded, skipped = load_agser_rows(path)
    assert loaded == rows and skipped == []


def test_answer_check_agrees_with_exact_matching_where_that_says_correct():
    for answer, accepted in [("<answer> kesh </answer>", ["Kesh"]), ("  Ana Quill ", ["Ana Quill"]),
                             ("<answer>crown</answer>", ["crown", "mark"])]:
        assert matches(answer, accepted) and judge_answer(answer, accepted)
    assert not judge_answer("<answer> Kes </answer>", ["Kesh"])
    assert answer_span("<answer> The yen. Or the won? </answer>") == "The yen."
