"""SQuAD EM/F1 against hand-computed values (official normalisation, max over references)."""

from __future__ import annotations

import pytest

from sedma_torch.metrics.squad import (
    exact_match,
    f1,
    normalize_answer,
    reference_answers,
    squad_scores,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("U.S.A.", "usa"),
        ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("  A\tTHE\nan ", ""),
        ("1,000 km (approx.)", "1000 km approx"),
    ],
)
def test_normalize_answer_drops_case_punctuation_articles_and_extra_space(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_compares_normalised_strings():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Towers", "Eiffel Tower") == 0.0
    assert exact_match("", "") == 1.0


def test_f1_counts_shared_tokens_after_normalisation():
    # pred -> [cat, sat, on, mat], ref -> [cat, on, mat]: 3 shared, P = 3/4, R = 1
    assert f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    # duplicates count min(count): red 1 + blue 1 = 2 shared of 3 and 3 -> P = R = 2/3
    assert f1("red red blue", "red blue blue") == pytest.approx(2 / 3)
    assert f1("Paris", "London") == 0.0
    assert f1("Paris!", "paris") == 1.0


def test_f1_of_empty_answers_follows_the_v2_rule():
    assert f1("", "") == 1.0
    assert f1("something", "") == 0.0
    assert f1("", "something") == 0.0
    assert f1("the", "") == 1.0  # "the" normalises to nothing


def test_reference_answers_keep_non_empty_ones_or_the_empty_answer():
    assert reference_answers(["the", "Paris", ""]) == ["Paris"]
    assert reference_answers([]) == [""]
    assert reference_answers(["a", "the"]) == [""]


def test_squad_scores_take_the_best_reference_and_average_over_questions():
    refs = {
        "q1": ["Denver Broncos", "The Broncos"],  # pred "Broncos": EM 1 (2nd), F1 1
        "q2": ["Santa Clara, California", "Levi's Stadium"],  # pred "Santa Clara": F1 0.8
        "q3": [],  # unanswerable; pred "" -> EM 1, F1 1
        "q4": ["gold"],  # no prediction -> 0
    }
    preds = {"q1": "Broncos", "q2": "Santa Clara", "q3": "", "extra": "ignored"}
    # q2: pred [santa, clara], ref [santa, clara, california]: P = 1, R = 2/3 -> F1 = 0.8
    out = squad_scores(preds, refs)
    assert out["exact_match"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert out["f1"] == pytest.approx((1 + 0.8 + 1 + 0) / 4)


def test_squad_scores_reject_bad_references():
    with pytest.raises(ValueError, match="references is empty"):
        squad_scores({"q": "a"}, {})
    with pytest.raises(TypeError, match="list of answer texts"):
        squad_scores({"q": "a"}, {"q": "a"})
    with pytest.raises(TypeError, match="expects a str"):
        normalize_answer(None)  # type: ignore[arg-type]


def test_squad_v2_scores_break_down_into_has_ans_and_no_ans_by_hand():
    # computed by hand with the official evaluate-v2.0.py rules (has_ans = bool(answers))
    refs = {
        "a1": ["the cat"],  # pred "cat": EM 1, F1 1
        "a2": ["big red dog"],  # pred "red dog house": 2 common, P = R = 2/3 -> F1 2/3
        "n1": [],  # pred "": EM 1, F1 1
        "n2": [],  # pred "something": EM 0, F1 0
    }
    preds = {"a1": "cat", "a2": "red dog house", "n1": "", "n2": "something"}
    out = squad_scores(preds, refs)
    assert out == pytest.approx(
        {
            "exact_match": 2 / 4,
            "f1": (1 + 2 / 3 + 1 + 0) / 4,
            "HasAns_exact": 1 / 2,
            "HasAns_f1": (1 + 2 / 3) / 2,
            "NoAns_exact": 1 / 2,
            "NoAns_f1": 1 / 2,
        }
    )
    # only unanswerable questions: no HasAns keys (the official script skips empty groups)
    assert set(squad_scores({"n1": ""}, {"n1": []})) == {
        "exact_match",
        "f1",
        "NoAns_exact",
        "NoAns_f1",
    }
    # v1.1 data (every question answerable): no breakdown, as before
    assert set(squad_scores({"a1": "cat"}, {"a1": ["cat"]})) == {"exact_match", "f1"}
