"""Fine-tune the MiniLM-L6 encoder for extractive QA on SQuAD articles; evaluate digital and RRAM.

Trains on some articles of a SQuAD v1.1/v2.0 file and evaluates on the others (default: the
12-article subset in shared/data, 9 articles for training and 3 for evaluation), first with
the untrained QA head (the baseline), then after fine-tuning, then with the fine-tuned model
converted to simulated RRAM crossbars (``sedma_torch.convert_``) for each requested setting.
Prints a markdown table (EM / F1 in %, relative L2 error of the start/end logits against the
digital model), writes results/finetune_squad.json and a bar chart results/finetune_squad.png.

    python scripts/finetune_squad.py                      # train, save, evaluate all
    python scripts/finetune_squad.py --skip-train         # reuse checkpoints/minilm_squad
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from sedma_torch.data.squad import load_squad
from sedma_torch.experiments.qa import evaluate_qa, train_qa
from sedma_torch.experiments.results import mean_output_error
from sedma_torch.models.qa import build_qa
from sedma_torch.rram import PRESETS, RRAMConfig, convert_, preset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1-subset.json"


def parse_indices(text: str) -> list[int]:
    """'0-8' or '0,2,5-7' -> sorted list of ints."""
    out: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.update(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.add(int(part))
    return sorted(out)


def rram_config(name: str, seed: int) -> RRAMConfig:
    """A preset by name, else a material name with the default system settings."""
    if name in PRESETS:
        return preset(name, seed=seed)
    return RRAMConfig(material=name, seed=seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="SQuAD v1.1/v2.0 JSON file")
    p.add_argument("--train-articles", default="0-8", help="article indices, e.g. 0-8")
    p.add_argument("--eval-articles", default="9-11", help="article indices, e.g. 9-11")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default=str(REPO / "checkpoints" / "minilm_squad"))
    p.add_argument("--skip-train", action="store_true", help="load --output instead of training")
    p.add_argument("--init", default=None, help="start from this QA checkpoint (default: MiniLM)")
    p.add_argument(
        "--rram",
        default="ideal_8bit,taox_hfox,corrected",
        help="comma-separated RRAM presets or material names ('' for none)",
    )
    p.add_argument("--results", default=str(REPO / "results" / "finetune_squad.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_idx, eval_idx = parse_indices(args.train_articles), parse_indices(args.eval_articles)
    if set(train_idx) & set(eval_idx):
        p.error(f"train and eval articles overlap: {sorted(set(train_idx) & set(eval_idx))}")
    train_ex = load_squad(args.data, articles=train_idx)
    eval_ex = load_squad(args.data, articles=eval_idx)
    print(
        f"{len(train_ex)} training questions (articles {train_idx}), "
        f"{len(eval_ex)} evaluation questions (articles {eval_idx})",
        flush=True,
    )
    windows = {"max_length": args.max_length, "stride": args.stride}
    results_path = Path(args.results)
    rows: dict[str, dict] = {}
    if results_path.is_file():
        rows = json.loads(results_path.read_text()).get("rows", {})

    def evaluate(name: str, model: torch.nn.Module) -> list[torch.Tensor]:
        res = evaluate_qa(
            model, tokenizer, eval_ex, device=args.device, batch_size=args.batch_size, **windows
        )
        rows[name] = {
            "exact_match": res.metrics["exact_match"],
            "f1": res.metrics["f1"],
            "n_samples": res.n_samples,
            "eval_seconds": res.seconds,
        }
        print(f"{name}: {rows[name]}", flush=True)
        return res.outputs

    training: dict = {}
    if args.skip_train:
        model, tokenizer = build_qa(args.output)
    else:
        torch.manual_seed(args.seed)
        model, tokenizer = build_qa(args.init)
        evaluate(
            "untrained head (MiniLM encoder)" if args.init is None else "start checkpoint", model
        )
        training = train_qa(
            model,
            tokenizer,
            train_ex,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            device=args.device,
            seed=args.seed,
            **windows,
        )
        print(f"training: {training}", flush=True)
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        print(f"saved the fine-tuned model to {args.output}", flush=True)
    model.to(args.device)
    digital_outputs = evaluate("fine-tuned, digital", model)
    rows["fine-tuned, digital"]["logit_rel_error"] = 0.0
    for name in [n for n in args.rram.split(",") if n]:
        rram_model = copy.deepcopy(model)
        t0 = time.perf_counter()
        convert_(rram_model, rram_config(name, args.seed))
        program_s = time.perf_counter() - t0
        outputs = evaluate(f"fine-tuned, RRAM {name}", rram_model)
        rows[f"fine-tuned, RRAM {name}"].update(
            logit_rel_error=mean_output_error(digital_outputs, outputs), program_seconds=program_s
        )
        del rram_model
    results_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "training": training, "rows": rows}
    results_path.write_text(json.dumps(record, indent=2))
    print("\n| model | EM % | F1 % | rel. logit error | eval s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        err = r.get("logit_rel_error")
        err_s = "" if err is None else f"{err:.3f}"
        print(
            f"| {name} | {100 * r['exact_match']:.1f} | {100 * r['f1']:.1f} | {err_s} | "
            f"{r['eval_seconds']:.0f} |"
        )
    print(f"({len(eval_ex)} questions; results in {results_path})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [100 * rows[n]["exact_match"] for n in names], 0.4, label="EM")
    ax.bar([x + 0.2 for x in xs], [100 * rows[n]["f1"] for n in names], 0.4, label="F1")
    ax.set_xticks(list(xs), [n.replace(", ", "\n") for n in names], fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(f"MiniLM-L6 extractive QA, SQuAD articles {eval_idx} ({len(eval_ex)} questions)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(results_path.with_suffix(".png"), dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
