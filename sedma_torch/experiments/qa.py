"""Extractive question answering: sliding-window features, best-span decoding, fine-tuning.

The feature and post-processing scheme is the standard one of BERT on SQuAD (and of the
Hugging Face question-answering examples): question and context are tokenised together,
long contexts are split into overlapping windows of ``max_length`` tokens that overlap by
``stride`` tokens, and an answer is the span (start <= end, at most ``max_answer_length``
tokens, inside the context) with the highest start + end logit over all windows of a
question. For SQuAD v2.0 data, the empty answer wins when the [CLS] score (start + end
logit at position 0, minimum over windows) exceeds the best span score.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sedma_torch.data.squad import SquadExample, references
from sedma_torch.experiments.results import EvalResult
from sedma_torch.metrics.squad import squad_scores
from sedma_torch.progress import progress as _progress
from sedma_torch.progress import progress_bar


@dataclass
class QAFeatures:
    """Tokenised windows: ``encodings[i]`` is one window of example ``example_index[i]``.

    ``context_offsets[i][t]`` is the (start, end) character span of token ``t`` in the
    context, or ``None`` for question, special and padding tokens.
    """

    encodings: list[dict[str, list[int]]]
    example_index: list[int]
    context_offsets: list[list[tuple[int, int] | None]]
    start_positions: list[int]
    end_positions: list[int]


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_windows(tokenizer: Any, max_length: int, stride: int) -> None:
    _check_positive_int("max_length", max_length)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 0:
        raise ValueError(f"stride must be an int >= 0, got {stride!r}")
    if stride >= max_length // 2:
        raise ValueError(
            f"stride ({stride}) must be smaller than max_length // 2 ({max_length // 2}): "
            "windows overlap by stride tokens"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("extractive QA needs a fast tokenizer (character offsets)")


def _answer_span(example: SquadExample) -> tuple[int, int] | None:
    """Character span [start, end) of the first reference answer, located in the context."""
    if example.is_impossible or not example.answers:
        return None
    text, start = example.answers[0], example.answer_starts[0]
    if example.context[start : start + len(text)] != text:
        found = example.context.find(text)
        if found < 0:
            return None
        start = found
    return start, start + len(text)


def featurize(
    tokenizer: Any, examples: Sequence[SquadExample], *, max_length: int, stride: int
) -> QAFeatures:
    """Tokenise ``examples`` into overlapping windows with answer token labels.

    A window whose context does not contain the whole first answer (and every window of an
    unanswerable question) is labelled with the [CLS] position 0 at start and end.
    """
    _check_windows(tokenizer, max_length, stride)
    enc = tokenizer(
        [ex.question.lstrip() for ex in examples],
        [ex.context for ex in examples],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    mapping = enc["overflow_to_sample_mapping"]
    feats = QAFeatures([], [], [], [], [])
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    for i, ex_idx in enumerate(mapping):
        sequence_ids = enc.sequence_ids(i)
        offsets: list[tuple[int, int] | None] = [
            tuple(off) if sid == 1 else None  # type: ignore[misc]
            for off, sid in zip(enc["offset_mapping"][i], sequence_ids, strict=True)
        ]
        span = _answer_span(examples[ex_idx])
        start_tok = end_tok = 0
        if span is not None:
            ctx = [t for t, off in enumerate(offsets) if off is not None]
            if ctx and offsets[ctx[0]][0] <= span[0] and offsets[ctx[-1]][1] >= span[1]:  # type: ignore[index]
                start_tok = next(t for t in ctx if offsets[t][1] > span[0])  # type: ignore[index]
                end_tok = next(t for t in reversed(ctx) if offsets[t][0] < span[1])  # type: ignore[index]
        feats.encodings.append({k: enc[k][i] for k in keys})
        feats.example_index.append(ex_idx)
        feats.context_offsets.append(offsets)
        feats.start_positions.append(start_tok)
        feats.end_positions.append(end_tok)
    return feats


def _collate(tokenizer: Any, encodings: list[dict[str, list[int]]], device: torch.device) -> dict:
    batch = tokenizer.pad(encodings, padding="longest", return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def _logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**batch)
    if hasattr(out, "start_logits"):
        return out.start_logits, out.end_logits
    start, end = out[0], out[1]
    return start, end


def _best_answers(
    examples: Sequence[SquadExample],
    feats: QAFeatures,
    starts: list[torch.Tensor],
    ends: list[torch.Tensor],
    *,
    max_answer_length: int,
    n_best: int,
    null_answers: bool,
) -> dict[str, str]:
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for f, (start, end) in enumerate(zip(starts, ends, strict=True)):
        ex_idx = feats.example_index[f]
        offsets = feats.context_offsets[f]
        context = examples[ex_idx].context
        null[ex_idx] = min(null.get(ex_idx, math.inf), float(start[0] + end[0]))
        top_s = torch.topk(start, min(n_best, start.numel())).indices.tolist()
        top_e = torch.topk(end, min(n_best, end.numel())).indices.tolist()
        for s in top_s:
            if s >= len(offsets) or offsets[s] is None:
                continue
            for e in top_e:
                if (
                    e >= len(offsets)
                    or offsets[e] is None
                    or e < s
                    or e - s + 1 > max_answer_length
                ):
                    continue
                score = float(start[s] + end[e])
                if ex_idx not in best or score > best[ex_idx][0]:
                    best[ex_idx] = (score, context[offsets[s][0] : offsets[e][1]])  # type: ignore[index]
    predictions: dict[str, str] = {}
    for ex_idx, ex in enumerate(examples):
        score, text = best.get(ex_idx, (-math.inf, ""))
        if null_answers and null.get(ex_idx, -math.inf) > score:
            text = ""
        predictions[ex.id] = text
    return predictions


def predict_qa(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[SquadExample],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    max_length: int = 384,
    stride: int = 128,
    max_answer_length: int = 30,
    n_best: int = 20,
    null_answers: bool | None = None,
    progress: bool = True,
) -> tuple[dict[str, str], list[torch.Tensor]]:
    """Predicted answer text per question id, and the logits per batch.

    Returns ``(predictions, outputs)``: ``outputs[b]`` is a CPU float tensor
    ``(windows_in_batch, 2, padded_tokens)`` of start (``[:, 0]``) and end (``[:, 1]``)
    logits. ``null_answers`` (allow the empty answer) defaults to True when any example
    is an unanswerable v2.0 question.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_answer_length", max_answer_length)
    _check_positive_int("n_best", n_best)
    if null_answers is None:
        null_answers = any(ex.is_impossible for ex in examples)
    device = torch.device(device)
    feats = featurize(tokenizer, examples, max_length=max_length, stride=stride)
    model.eval()
    outputs: list[torch.Tensor] = []
    starts: list[torch.Tensor] = []
    ends: list[torch.Tensor] = []
    n = len(feats.encodings)
    with torch.no_grad():
        for lo in _progress(
            range(0, n, batch_size), desc="QA eval", disable=not progress, leave=False
        ):
            encodings = feats.encodings[lo : lo + batch_size]
            batch = _collate(tokenizer, encodings, device)
            start, end = _logits(model, batch)
            start, end = start.float().cpu(), end.float().cpu()
            outputs.append(torch.stack([start, end], dim=1))
            for i, e in enumerate(encodings):
                length = len(e["input_ids"])
                starts.append(start[i, :length])
                ends.append(end[i, :length])
    predictions = _best_answers(
        examples,
        feats,
        starts,
        ends,
        max_answer_length=max_answer_length,
        n_best=n_best,
        null_answers=null_answers,
    )
    return predictions, outputs


def evaluate_qa(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[SquadExample],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    max_length: int = 384,
    stride: int = 128,
    limit: int | None = None,
    progress: bool = True,
    max_answer_length: int = 30,
    n_best: int = 20,
    null_answers: bool | None = None,
) -> EvalResult:
    """Exact match and F1 (fractions in [0, 1]) of ``model`` on SQuAD ``examples``.

    ``limit`` evaluates the first ``limit`` questions; ``n_samples`` is the number of
    questions scored. ``outputs`` holds the start/end logits per batch (see
    :func:`predict_qa`), comparable between a digital and an RRAM run.
    """
    if limit is not None:
        _check_positive_int("limit", limit)
        examples = examples[:limit]
    if not examples:
        raise ValueError("evaluate_qa: no examples to evaluate")
    t0 = time.perf_counter()
    predictions, outputs = predict_qa(
        model,
        tokenizer,
        examples,
        device=device,
        batch_size=batch_size,
        max_length=max_length,
        stride=stride,
        max_answer_length=max_answer_length,
        n_best=n_best,
        null_answers=null_answers,
        progress=progress,
    )
    metrics = squad_scores(predictions, references(list(examples)))
    return EvalResult(
        metrics=metrics,
        n_samples=len(examples),
        seconds=time.perf_counter() - t0,
        outputs=outputs,
    )


def train_qa(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[SquadExample],
    *,
    epochs: int = 2,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 384,
    stride: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """Fine-tune ``model`` for extractive QA (cross-entropy on start and end positions).

    AdamW with a linear warm-up over ``warmup_fraction`` of the steps and a linear decay to
    zero; gradients clipped to ``max_grad_norm``. Windows are shuffled each epoch with a
    generator seeded by ``seed``. Returns ``{"epoch_losses", "steps", "windows",
    "seconds"}`` (mean loss per epoch, optimizer steps, training windows, wall time).
    """
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
    if not examples:
        raise ValueError("train_qa: no examples to train on")
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    feats = featurize(tokenizer, examples, max_length=max_length, stride=stride)
    n = len(feats.encodings)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    warmup = int(warmup_fraction * total)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
    )

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.to(device).train()
    loss_fn = nn.CrossEntropyLoss()
    epoch_losses: list[float] = []
    t0 = time.perf_counter()
    bar = progress_bar(total=total, desc="QA fine-tune", disable=not progress)
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        running = 0.0
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            batch = _collate(tokenizer, [feats.encodings[i] for i in idx], device)
            start, end = _logits(model, batch)
            start_t = torch.tensor([feats.start_positions[i] for i in idx], device=device)
            end_t = torch.tensor([feats.end_positions[i] for i in idx], device=device)
            loss = (loss_fn(start.float(), start_t) + loss_fn(end.float(), end_t)) / 2
            if not torch.isfinite(loss):
                raise FloatingPointError(f"train_qa: loss became {loss.item()} (lr={lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        epoch_losses.append(running / n)
    bar.close()
    model.eval()
    return {
        "epoch_losses": epoch_losses,
        "steps": total,
        "windows": n,
        "seconds": time.perf_counter() - t0,
    }


__all__ = ["QAFeatures", "evaluate_qa", "featurize", "predict_qa", "train_qa"]
