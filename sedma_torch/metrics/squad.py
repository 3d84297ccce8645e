"""SQuAD answer metrics: exact match and token F1 with the official answer normalisation.

The normalisation and the per-answer scores follow the official SQuAD v2.0 evaluation
script (``evaluate-v2.0.py``, which agrees with v1.1 on answerable questions): lower-case,
drop punctuation, drop the articles "a", "an", "the", collapse white space. A question's
score is the maximum over its reference answers; an unanswerable (v2.0) question has the
single reference ``""``, matched only by an empty prediction.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation and the articles a/an/the, collapse white space."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a str, got {type(text).__name__}")
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    """Token-level F1 between normalised prediction and reference, in [0, 1].

    When either side normalises to no tokens, the score is 1.0 if both do, else 0.0
    (the official v2.0 rule for unanswerable questions).
    """
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def reference_answers(answers: Sequence[str]) -> list[str]:
    """The official reference list: answers that normalise to something, else ``[""]``."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Mean exact match and F1 over the questions of ``references``, as fractions in [0, 1].

    Args:
        predictions: question id -> predicted answer text (``""`` = no answer).
        references: question id -> reference answer texts (empty list = unanswerable).

    Each question scores the maximum over its references. A question without a prediction
    scores 0 (as in the official script); predictions for unknown ids are ignored.

    When some question is unanswerable (SQuAD v2.0 data), the result also has the official
    v2.0 script's breakdown: ``HasAns_exact`` / ``HasAns_f1`` (mean over the questions with
    at least one reference answer) and ``NoAns_exact`` / ``NoAns_f1`` (over those with
    none), as fractions; ``HasAns_*`` only when some question is answerable.
    """
    if not references:
        raise ValueError("squad_scores: references is empty; nothing to score")
    em: dict[str, float] = {}
    f1s: dict[str, float] = {}
    for qid, answers in references.items():
        if isinstance(answers, str):
            raise TypeError(
                f"squad_scores: references[{qid!r}] must be a list of answer texts, got a str"
            )
        em[qid] = f1s[qid] = 0.0
        if qid not in predictions:
            continue
        prediction = predictions[qid]
        refs = reference_answers(answers)
        em[qid] = max(exact_match(prediction, r) for r in refs)
        f1s[qid] = max(f1(prediction, r) for r in refs)
    n = len(references)
    scores = {"exact_match": sum(em.values()) / n, "f1": sum(f1s.values()) / n}
    # the official v2.0 script: has_ans = bool(qa["answers"]), the raw reference list
    no_ans = [qid for qid, answers in references.items() if len(answers) == 0]
    if no_ans:
        has_ans = [qid for qid, answers in references.items() if len(answers) > 0]
        for prefix, qids in (("HasAns", has_ans), ("NoAns", no_ans)):
            if qids:
                scores[f"{prefix}_exact"] = sum(em[q] for q in qids) / len(qids)
                scores[f"{prefix}_f1"] = sum(f1s[q] for q in qids) / len(qids)
    return scores


__all__ = ["exact_match", "f1", "normalize_answer", "reference_answers", "squad_scores"]
