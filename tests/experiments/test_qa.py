"""Extractive QA: sliding windows, span decoding, EM/F1 end to end, fine-tuning, RRAM.

Decoding is checked with an "oracle" model that puts high logits on the answer's tokens
wherever they appear in a window: any error in windowing, offset mapping or span
selection then shows as EM < 1.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sedma_torch.data.squad import SquadExample, load_squad
from sedma_torch.experiments.qa import evaluate_qa, featurize, predict_qa, train_qa
from sedma_torch.experiments.results import mean_output_error
from sedma_torch.models.qa import build_qa
from sedma_torch.rram import RRAMConfig, convert_
from tests.data.test_squad_data import squad_json

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
WORDS = [
    "river",
    "stone",
    "cloud",
    "paper",
    "garden",
    "window",
    "silver",
    "market",
    "forest",
    "engine",
    "yellow",
    "candle",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_qa(config=TINY)


def long_examples(
    seed: int, n: int = 6, impossible: int = 0, n_words: int = 150
) -> list[SquadExample]:
    """Contexts of ``n_words`` common words with a unique answer phrase at a random place."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(n_words)]
        answer = f"zebra{i} quokka{i} number {i + 11}"
        at = rng.randrange(0, len(words))
        context = " ".join([*words[:at], answer, *words[at:]])
        is_imp = i < impossible
        out.append(
            SquadExample(
                id=f"q{i}",
                title="t",
                context=context,
                question=f"what is item {i} called ?",
                answers=[] if is_imp else [answer],
                answer_starts=[] if is_imp else [context.index(answer)],
                is_impossible=is_imp,
            )
        )
    return out


class OracleQA(nn.Module):
    """Start/end logit 10 on the first/last token of the question's answer, else 0.

    Unanswerable questions (answer None) get 10 on [CLS] instead.
    """

    def __init__(self, tokenizer, examples: list[SquadExample]):
        super().__init__()
        self.answers = {}
        for ex in examples:
            q = tuple(tokenizer(ex.question, add_special_tokens=False)["input_ids"])
            a = None if ex.is_impossible else tokenizer(ex.answers[0], add_special_tokens=False)
            self.answers[q] = None if a is None else a["input_ids"]

    def forward(self, input_ids, token_type_ids, attention_mask):
        start = torch.zeros(input_ids.shape)
        end = torch.zeros(input_ids.shape)
        for row, (ids, types) in enumerate(
            zip(input_ids.tolist(), token_type_ids.tolist(), strict=True)
        ):
            q_end = types.index(1) - 1  # [SEP] after the question
            answer = self.answers[tuple(ids[1:q_end])]
            if answer is None:
                start[row, 0] = end[row, 0] = 10
                continue
            for s in range(q_end + 1, len(ids) - len(answer) + 1):
                if ids[s : s + len(answer)] == answer and types[s] == 1:
                    start[row, s] = end[row, s + len(answer) - 1] = 10
        return SimpleNamespace(start_logits=start, end_logits=end)


def test_featurize_labels_decode_to_the_answer_in_windows_that_contain_it(tiny):
    _, tok = tiny
    examples = long_examples(seed=1)
    feats = featurize(tok, examples, max_length=64, stride=16)
    assert len(feats.encodings) > 2 * len(examples)  # long contexts -> several windows each
    found = set()
    for f, ex_idx in enumerate(feats.example_index):
        ex, offsets = examples[ex_idx], feats.context_offsets[f]
        s, e = feats.start_positions[f], feats.end_positions[f]
        ctx = [off for off in offsets if off is not None]
        covered = ctx[0][0] <= ex.answer_starts[0] and ctx[-1][1] >= ex.answer_starts[0] + len(
            ex.answers[0]
        )
        if covered:
            assert ex.context[offsets[s][0] : offsets[e][1]] == ex.answers[0]
            found.add(ex_idx)
        else:
            assert s == e == 0
        assert len(feats.encodings[f]["input_ids"]) <= 64
    assert found == set(range(len(examples)))


@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_logits_decode_to_exact_answers_across_windows(tiny, seed):
    _, tok = tiny
    examples = long_examples(seed=seed)
    res = evaluate_qa(
        OracleQA(tok, examples),
        tok,
        examples,
        max_length=64,
        stride=16,
        batch_size=5,
        progress=False,
    )
    assert res.metrics == {"exact_match": 1.0, "f1": 1.0}
    assert res.n_samples == len(examples)
    assert all(o.ndim == 3 and o.shape[1] == 2 for o in res.outputs)
    assert sum(o.shape[0] for o in res.outputs) > len(examples)


def test_unanswerable_questions_predict_empty_only_with_null_answers(tiny):
    _, tok = tiny
    examples = long_examples(seed=2, n=4, impossible=2)
    oracle = OracleQA(tok, examples)
    preds, _ = predict_qa(oracle, tok, examples, max_length=64, stride=16, progress=False)
    assert preds["q0"] == preds["q1"] == "" and preds["q2"] == examples[2].answers[0]
    res = evaluate_qa(oracle, tok, examples, max_length=64, stride=16, progress=False)
    assert res.metrics == {
        "exact_match": 1.0,
        "f1": 1.0,
        "HasAns_exact": 1.0,
        "HasAns_f1": 1.0,
        "NoAns_exact": 1.0,
        "NoAns_f1": 1.0,
    }
    forced = evaluate_qa(
        oracle, tok, examples, max_length=64, stride=16, progress=False, null_answers=False
    )
    assert forced.metrics["exact_match"] == pytest.approx(0.5)  # spans forced on q0, q1
    # the answerable questions keep their answers, the unanswerable ones all fail
    assert forced.metrics["HasAns_exact"] == 1.0 and forced.metrics["NoAns_exact"] == 0.0


def test_max_answer_length_excludes_longer_spans(tiny):
    _, tok = tiny
    examples = long_examples(seed=3, n=3)
    n_tokens = len(tok(examples[0].answers[0], add_special_tokens=False)["input_ids"])
    kw = {"max_length": 64, "stride": 16, "progress": False}
    assert (
        evaluate_qa(
            OracleQA(tok, examples), tok, examples, max_answer_length=n_tokens, **kw
        ).metrics["exact_match"]
        == 1.0
    )
    short = evaluate_qa(
        OracleQA(tok, examples), tok, examples, max_answer_length=n_tokens - 1, **kw
    )
    assert short.metrics["exact_match"] == 0.0


def test_tiny_random_model_evaluates_a_squad_json_with_limit(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad_json("2.0")))
    examples = load_squad(path)
    res = evaluate_qa(
        model, tok, examples, limit=3, batch_size=2, max_length=48, stride=8, progress=False
    )
    assert res.n_samples == 3
    assert 0.0 <= res.metrics["exact_match"] <= res.metrics["f1"] <= 1.0
    assert [o.shape[0] for o in res.outputs] == [2, 1]
    assert all(torch.isfinite(o).all() for o in res.outputs)


def test_rram_conversion_of_tiny_qa_model_exact_when_ideal_noisy_otherwise(tiny):
    import copy

    model, tok = tiny
    examples = long_examples(seed=4, n=3)
    kw = {"max_length": 64, "stride": 16, "progress": False}
    digital = evaluate_qa(model, tok, examples, **kw)
    exact = convert_(
        copy.deepcopy(model),
        RRAMConfig(material="ideal", dac_bits=None, adc_bits=None),
        progress=False,
    )
    res_exact = evaluate_qa(exact, tok, examples, **kw)
    assert mean_output_error(digital.outputs, res_exact.outputs) < 1e-5
    assert res_exact.metrics == digital.metrics
    noisy = convert_(copy.deepcopy(model), RRAMConfig(material="taox_hfox"), progress=False)
    assert sum(type(m).__name__ == "RRAMLinear" for m in noisy.modules()) == 2 * 6 + 1
    res_noisy = evaluate_qa(noisy, tok, examples, **kw)
    err = mean_output_error(digital.outputs, res_noisy.outputs)
    assert 1e-4 < err < 1.0


def test_fine_tuning_fits_training_questions(tiny):
    import copy

    model, tok = tiny
    model = copy.deepcopy(model)
    examples = long_examples(seed=5, n=4, n_words=30)
    kw = {"max_length": 64, "stride": 16}
    before = evaluate_qa(model, tok, examples, progress=False, **kw).metrics["f1"]
    info = train_qa(
        model, tok, examples, epochs=40, lr=5e-3, batch_size=8, seed=0, progress=False, **kw
    )
    after = evaluate_qa(model, tok, examples, progress=False, **kw).metrics["f1"]
    assert info["steps"] == 40 * -(-info["windows"] // 8)
    assert info["epoch_losses"][-1] < 0.5 * info["epoch_losses"][0]
    assert after > before + 0.3


def test_fine_tuning_is_reproducible_with_a_seed(tiny):
    import copy

    model, tok = tiny
    examples = long_examples(seed=6, n=2, n_words=30)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        runs.append(
            train_qa(
                m,
                tok,
                examples,
                epochs=2,
                lr=1e-3,
                batch_size=4,
                max_length=64,
                stride=16,
                seed=3,
                progress=False,
            )["epoch_losses"]
        )
    assert runs[0] == runs[1]


def test_bad_arguments_are_rejected(tiny):
    model, tok = tiny
    examples = long_examples(seed=7, n=1)
    with pytest.raises(ValueError, match="stride"):
        featurize(tok, examples, max_length=64, stride=40)
    with pytest.raises(ValueError, match="limit must be"):
        evaluate_qa(model, tok, examples, limit=0)
    with pytest.raises(ValueError, match="no examples"):
        evaluate_qa(model, tok, [])
    with pytest.raises(ValueError, match="lr must be"):
        train_qa(model, tok, examples, lr=float("nan"))


def test_build_qa_round_trips_a_saved_checkpoint_and_names_missing_paths(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    loaded, tok2 = build_qa(tmp_path / "ckpt")
    batch = tok("who?", "someone did it", return_tensors="pt")
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(a.start_logits, b.start_logits)
    assert tok2("who?")["input_ids"] == tok("who?")["input_ids"]
    assert model.config.vocab_size == len(tok)
    with pytest.raises(
        FileNotFoundError, match=r"No transformers checkpoint at .*missing.*finetune_squad"
    ):
        build_qa(tmp_path / "missing")
    with pytest.raises(TypeError, match="BertConfig fields"):
        build_qa(config=[1])  # type: ignore[arg-type]
