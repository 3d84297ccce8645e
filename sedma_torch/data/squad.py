"""SQuAD v1.1 / v2.0 JSON, or a flat list of questions -> extractive QA examples."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SquadExample:
    """One question on one paragraph.

    ``answers`` are the reference texts and ``answer_starts`` their character offsets in
    ``context`` (same order). An unanswerable SQuAD v2.0 question has ``is_impossible=True``
    and no answers.
    """

    id: str
    title: str
    context: str
    question: str
    answers: list[str] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)
    is_impossible: bool = False


def _missing_file_message(path: Path) -> str:
    return (
        f"SQuAD file not found at {str(path)!r}. Provide a SQuAD v1.1 or v2.0 JSON file "
        "(the official dev-v1.1.json / dev-v2.0.json from "
        "https://rajpurkar.github.io/SQuAD-explorer/, or the 12-article subset "
        "shared/data/squad/dev-v1.1-subset.json) and point the dataset path at it "
        "(e.g. `python eval.py dataset=squad dataset.path=/path/to/dev-v1.1.json`). "
        "Nothing is downloaded."
    )


EXPECTED_FORMATS = (
    "expected the official SQuAD v1.1/v2.0 JSON (a JSON object with a 'data' list of "
    "articles: {'version', 'data': [{'title', 'paragraphs': [{'context', 'qas': [{'id', "
    "'question', 'answers': [{'text', 'answer_start'}]}]}]}]}) or a flat list of "
    "questions, top level or under 'data' "
    "([{'id', 'question', 'context', 'answers'}], answers as [{'text', 'answer_start'}] or "
    "{'text': [...], 'answer_start': [...]}, empty = unanswerable), e.g. transformers' "
    "tests/fixtures/tests_samples/SQUAD/sample.json"
)


def _select_articles(data: list, articles: slice | list[int] | None, path: Path) -> list:
    if articles is None:
        return data
    if isinstance(articles, slice):
        return data[articles]
    if not isinstance(articles, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in articles
    ):
        raise TypeError(
            f"load_squad: articles must be a slice, a list of ints or None, got {articles!r}"
        )
    bad = [i for i in articles if not -len(data) <= i < len(data)]
    if bad:
        raise ValueError(
            f"load_squad: article indices {bad} out of range for {path} "
            f"({len(data)} articles, allowed 0..{len(data) - 1})"
        )
    return [data[i] for i in articles]


def load_squad(
    path: str | Path,
    *,
    limit: int | None = None,
    articles: slice | list[int] | None = None,
) -> list[SquadExample]:
    """Read a SQuAD v1.1 or v2.0 JSON file into a list of :class:`SquadExample`.

    Args:
        path: the JSON file: official SQuAD (``{"version": .., "data": [{"title",
            "paragraphs": [..]}]}``) or a flat list of ``{id, question, context, answers}``
            records, top level or under ``data`` (Hugging Face ``datasets`` exports,
            transformers' ``sample.json``; ``answers`` as a list of ``{text, answer_start}``
            or ``{"text": [..], "answer_start": [..]}``, empty = unanswerable).
        limit: keep only the first ``limit`` questions (after article selection); >= 1.
        articles: keep only these articles (indices into ``data``, or a slice).

    v2.0 questions with ``is_impossible: true`` get no answers; extra keys are ignored. A
    file with no questions raises a ``ValueError`` naming the formats read.
    """
    path = Path(path)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"load_squad: limit must be an int >= 1 or None, got {limit!r}")
    if not path.is_file():
        raise FileNotFoundError(_missing_file_message(path))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_squad: {path} is not valid JSON ({exc})") from exc
    records = raw if isinstance(raw, list) else raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"load_squad: {path} is not a SQuAD file: {EXPECTED_FORMATS}")
    if records and all(isinstance(r, dict) and "paragraphs" not in r for r in records):
        if articles is not None:
            raise ValueError(
                f"load_squad: {path} is a flat list of questions (no articles); articles= "
                "selects articles of the official nested layout only"
            )
        examples = _flat_examples(records, path)
        return examples if limit is None else examples[:limit]
    examples = _nested_examples(records, articles, path, limit)
    if not examples:
        raise ValueError(f"load_squad: {path} holds no questions; {EXPECTED_FORMATS}")
    return examples


def _flat_answers(record: dict) -> tuple[list[str], list[int]]:
    answers = record.get("answers", [])
    if isinstance(answers, dict):  # Hugging Face datasets: {"text": [...], "answer_start": [...]}
        texts, starts = list(answers["text"]), list(answers["answer_start"])
        if len(texts) != len(starts):
            raise ValueError("answers.text and answers.answer_start differ in length")
        return [str(t) for t in texts], [int(s) for s in starts]
    return [str(a["text"]) for a in answers], [int(a["answer_start"]) for a in answers]


def _flat_examples(records: list, path: Path) -> list[SquadExample]:
    """Examples from a flat list of ``{id, question, context, answers}`` records (the layout
    of Hugging Face ``datasets`` SQuAD exports and transformers' ``sample.json``)."""
    examples = []
    for i, record in enumerate(records):
        try:
            texts, starts = _flat_answers(record)
            impossible = bool(record.get("is_impossible", False)) or not texts
            examples.append(
                SquadExample(
                    id=str(record["id"]),
                    title=str(record.get("title", "")),
                    context=record["context"],
                    question=record["question"],
                    answers=[] if impossible else texts,
                    answer_starts=[] if impossible else starts,
                    is_impossible=impossible,
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"load_squad: {path}: malformed question {i} of the flat list: {exc!r} (needs "
                f"id, question, context, answers); {EXPECTED_FORMATS}"
            ) from exc
    return examples


def _nested_examples(
    data: list, articles: slice | list[int] | None, path: Path, limit: int | None
) -> list[SquadExample]:
    examples: list[SquadExample] = []
    for a_idx, article in enumerate(_select_articles(data, articles, path)):
        title = article.get("title", f"article_{a_idx}")
        for p_idx, paragraph in enumerate(article.get("paragraphs", [])):
            try:
                context = paragraph["context"]
                qas = paragraph["qas"]
            except (KeyError, TypeError) as exc:
                raise ValueError(
                    f"load_squad: {path}: article {title!r} paragraph {p_idx} lacks "
                    f"'context' or 'qas' ({exc})"
                ) from exc
            for qa in qas:
                try:
                    impossible = bool(qa.get("is_impossible", False))
                    answers = [] if impossible else qa["answers"]
                    example = SquadExample(
                        id=str(qa["id"]),
                        title=title,
                        context=context,
                        question=qa["question"],
                        answers=[ans["text"] for ans in answers],
                        answer_starts=[int(ans["answer_start"]) for ans in answers],
                        is_impossible=impossible,
                    )
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(
                        f"load_squad: {path}: malformed question in article {title!r} "
                        f"paragraph {p_idx}: {exc!r} (needs id, question, answers[text, "
                        "answer_start])"
                    ) from exc
                examples.append(example)
                if limit is not None and len(examples) >= limit:
                    return examples
    return examples


def references(examples: list[SquadExample]) -> dict[str, list[str]]:
    """Question id -> reference answer texts (empty for unanswerable questions)."""
    return {ex.id: list(ex.answers) for ex in examples}


__all__ = ["SquadExample", "load_squad", "references"]
