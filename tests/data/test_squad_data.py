"""SQuAD v1.1 / v2.0 JSON files generated at test time -> examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sedma_torch.data.squad import load_squad, references

CONTEXT_A = "Denver won the game. The stadium was in Santa Clara."
CONTEXT_B = "The Amazon river flows through Brazil and Peru."


def squad_json(version: str = "1.1") -> dict:
    """Two articles, three paragraphs' worth of questions, in the official layout."""
    qa_impossible = {
        "id": "q4",
        "question": "Who painted the river?",
        "answers": [],
        "plausible_answers": [{"text": "Amazon", "answer_start": 4}],
        "is_impossible": True,
    }
    article_b = [
        {
            "id": "q3",
            "question": "Which river?",
            "answers": [{"text": "Amazon", "answer_start": 4}],
            **({"is_impossible": False} if version == "2.0" else {}),
        }
    ]
    if version == "2.0":
        article_b.append(qa_impossible)
    return {
        "version": version,
        "data": [
            {
                "title": "Game",
                "paragraphs": [
                    {
                        "context": CONTEXT_A,
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Who won?",
                                "answers": [
                                    {"text": "Denver", "answer_start": 0},
                                    {"text": "Denver", "answer_start": 0},
                                ],
                                "evidences": ["ignored extra key"],
                            },
                            {
                                "id": "q2",
                                "question": "Where was the stadium?",
                                "answers": [{"text": "Santa Clara", "answer_start": 40}],
                            },
                        ],
                    }
                ],
            },
            {"title": "River", "paragraphs": [{"context": CONTEXT_B, "qas": article_b}]},
        ],
    }


def write(tmp_path: Path, data: dict, name: str = "squad.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_v11_file_gives_one_example_per_question_with_answer_offsets(tmp_path):
    examples = load_squad(write(tmp_path, squad_json("1.1")))
    assert [e.id for e in examples] == ["q1", "q2", "q3"]
    q2 = examples[1]
    assert q2.title == "Game" and q2.context == CONTEXT_A
    assert q2.answers == ["Santa Clara"] and q2.answer_starts == [40]
    assert q2.context[40 : 40 + len("Santa Clara")] == "Santa Clara"
    assert examples[0].answers == ["Denver", "Denver"] and not examples[0].is_impossible
    assert references(examples) == {
        "q1": ["Denver", "Denver"],
        "q2": ["Santa Clara"],
        "q3": ["Amazon"],
    }


def test_v20_unanswerable_question_has_no_answers(tmp_path):
    examples = load_squad(write(tmp_path, squad_json("2.0")))
    q4 = next(e for e in examples if e.id == "q4")
    assert q4.is_impossible and q4.answers == [] and q4.answer_starts == []
    assert not next(e for e in examples if e.id == "q3").is_impossible


def test_articles_and_limit_select_questions(tmp_path):
    path = write(tmp_path, squad_json("2.0"))
    assert [e.id for e in load_squad(path, articles=[1])] == ["q3", "q4"]
    assert [e.id for e in load_squad(path, articles=slice(0, 1))] == ["q1", "q2"]
    assert [e.id for e in load_squad(path, limit=3)] == ["q1", "q2", "q3"]
    assert [e.id for e in load_squad(path, articles=[1], limit=1)] == ["q3"]
    with pytest.raises(ValueError, match=r"out of range.*2 articles"):
        load_squad(path, articles=[2])
    with pytest.raises(ValueError, match="limit must be"):
        load_squad(path, limit=0)


def test_missing_or_malformed_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SQuAD file not found at .*nope\.json.*dev-v1\.1"):
        load_squad(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_squad(bad)
    with pytest.raises(ValueError, match="'data' list"):
        load_squad(write(tmp_path, {"version": "1.1"}, "nodata.json"))
    data = squad_json()
    del data["data"][0]["paragraphs"][0]["qas"][0]["question"]
    with pytest.raises(ValueError, match=r"malformed question in article 'Game'"):
        load_squad(write(tmp_path, data, "noquestion.json"))


def test_real_subset_has_501_questions_in_12_articles(shared_data):
    path = shared_data / "squad" / "dev-v1.1-subset.json"
    examples = load_squad(path)
    assert len(examples) == 501
    assert len({e.title for e in examples}) == 12
    for e in examples:
        for text, start in zip(e.answers, e.answer_starts, strict=True):
            assert e.context[start : start + len(text)] == text


# transformers' tests/fixtures/tests_samples/SQUAD/sample.json layout: flat records under
# "data", answers as Hugging Face datasets' {"answer_start": [...], "text": [...]}
FLAT = [
    {
        "id": "f1",
        "question": "Who won?",
        "context": CONTEXT_A,
        "answers": {"answer_start": [0, 0], "text": ["Denver", "Denver"]},
    },
    {
        "id": "f2",
        "question": "Who painted the river?",
        "context": CONTEXT_B,
        "answers": {"answer_start": [], "text": []},
    },
    {
        "id": "f3",
        "question": "Where was the stadium?",
        "context": CONTEXT_A,
        "answers": [{"text": "Santa Clara", "answer_start": 40}],
    },
]


@pytest.mark.parametrize("layout", ["data", "top_level_list"])
def test_flat_question_list_reads_like_the_nested_layout(tmp_path, layout):
    raw = {"version": 2.0, "data": FLAT} if layout == "data" else FLAT
    examples = load_squad(write(tmp_path, raw))
    assert [e.id for e in examples] == ["f1", "f2", "f3"]
    f1, f2, f3 = examples
    assert f1.answers == ["Denver", "Denver"] and f1.answer_starts == [0, 0]
    assert f1.context == CONTEXT_A and f1.question == "Who won?" and not f1.is_impossible
    assert f2.is_impossible and f2.answers == [] and f2.answer_starts == []
    assert f3.answers == ["Santa Clara"] and f3.answer_starts == [40]
    assert [e.id for e in load_squad(write(tmp_path, raw), limit=2)] == ["f1", "f2"]


def test_files_without_questions_name_the_formats_read(tmp_path):
    for name, raw in [
        ("empty.json", {"version": "1.1", "data": []}),
        ("noqas.json", {"data": [{"title": "t", "paragraphs": []}]}),
    ]:
        with pytest.raises(ValueError, match=r"holds no questions.*flat list of questions"):
            load_squad(write(tmp_path, raw, name))
    bad = [{"id": "x", "question": "q"}]  # no context
    with pytest.raises(ValueError, match=r"malformed question 0 of the flat list.*context"):
        load_squad(write(tmp_path, bad, "nocontext.json"))
