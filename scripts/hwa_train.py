"""Hardware-aware training (noise injection) vs digital weights, train.py's digits CNN.

The same recipe as ``python train.py`` (configs/config.yaml): the small CNN trained
digitally (8 epochs, Adam 3e-3, batch 64, seed 0), then, per material of the ``open_loop``
system settings (one write, no verify, 8-bit DAC/ADC, 256x256 tiles), fine-tuned for 2
epochs (Adam 1e-3) with ``train.hwa=noise`` (a freshly sampled chip every read; nothing
programmed during training). Each model is then programmed once onto chips with seeds
0..N-1 and evaluated on the test split (correction ``none``), the digital weights on the
same chips. Control: the digital model fine-tuned digitally for the same 2 epochs (so the
HWA gain is not just more training). Also one step time per mode at batch 64: digital,
noise, reprogram with the preset's one write and with 20 write-verify iterations. Results
to results/hwa_train.json.

    python scripts/hwa_train.py [--seeds 3] [--materials epiram ag_asi alox_hfo2 taox_hfox]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from benchmark_utils import cpu_model, git_revision
from tqdm.auto import tqdm

import sedma_torch as st
from sedma_torch.data.digits import load_digits_split
from sedma_torch.experiments.classification import evaluate_classification
from sedma_torch.experiments.training import epoch_generator, train_epoch
from sedma_torch.models.small_cnn import small_cnn
from sedma_torch.rram import PRESETS
from sedma_torch.rram.hwa import clip_weights_, hwa_noise

MATERIALS = ["epiram", "ag_asi", "alox_hfo2", "taox_hfox"]


def fine_tune(
    model, train_set, epochs: int, lr: float, seed: int, phase: str, clip=None, per_channel=False
):
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def on_step(*_: float) -> None:
        if clip is not None:
            clip_weights_(model, clip, per_channel=per_channel)

    for epoch in range(epochs):
        train_epoch(
            model,
            train_set,
            opt,
            generator=epoch_generator(seed, phase, epoch),
            batch_size=64,
            device=torch.device("cpu"),
            progress=False,
            on_step=on_step,
        )
    return model


def chip_top1(weights: torch.nn.Module, cfg: st.RRAMConfig, test_set) -> float:
    chip = st.convert_(copy.deepcopy(weights), cfg, progress=False)
    return evaluate_classification(chip, test_set, batch_size=512, progress=False).metrics["top1"]


def step_ms(model, x, y, steps: int = 20) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


def mean_spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--materials", nargs="+", default=MATERIALS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--hwa-epochs", type=int, default=2)
    parser.add_argument(
        "--weight-clip", type=float, default=None, help="train.hwa_weight_clip (std per layer)"
    )
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    train_set, test_set = load_digits_split(397, seed=0)
    torch.manual_seed(0)
    digital = fine_tune(small_cnn(), train_set, args.epochs, 3e-3, 0, "digital")
    control = fine_tune(copy.deepcopy(digital), train_set, args.hwa_epochs, 1e-3, 0, "hwa")
    rows = []
    for name in tqdm(args.materials, desc="materials"):
        base = PRESETS["open_loop"].replace(material=name)
        torch.manual_seed(0)
        hwa = st.convert_(copy.deepcopy(digital), base, program=False, progress=False)
        start = time.perf_counter()
        with hwa_noise(hwa):
            fine_tune(hwa, train_set, args.hwa_epochs, 1e-3, 0, "hwa", args.weight_clip)
        seconds = time.perf_counter() - start
        events = sum(
            m.rram_stats.programming_events for m in hwa.modules() if hasattr(m, "rram_stats")
        )
        hwa_weights = st.to_digital(hwa)
        acc = {"digital": [], "digital_more_epochs": [], "hwa": []}
        for seed in range(args.seeds):
            cfg = base.replace(seed=seed)
            acc["digital"].append(chip_top1(digital, cfg, test_set))
            acc["digital_more_epochs"].append(chip_top1(control, cfg, test_set))
            acc["hwa"].append(chip_top1(hwa_weights, cfg, test_set))
        row = {
            "material": name,
            "hwa_train_seconds": seconds,
            "programming_events_during_hwa": events,
            "chip_top1": {k: {"values": v, **mean_spread(v)} for k, v in acc.items()},
        }
        rows.append(row)
        print(
            f"{name:10s} digital {row['chip_top1']['digital']['mean']:.4f} "
            f"digital+{args.hwa_epochs}ep {row['chip_top1']['digital_more_epochs']['mean']:.4f} "
            f"hwa {row['chip_top1']['hwa']['mean']:.4f}"
        )
    x, y = next(iter(torch.utils.data.DataLoader(train_set, batch_size=64)))
    base = PRESETS["open_loop"]
    times = {"digital": step_ms(copy.deepcopy(digital), x, y)}
    noisy = st.convert_(copy.deepcopy(digital), base, program=False, progress=False)
    with hwa_noise(noisy):
        times["noise"] = step_ms(noisy, x, y)
    times["reprogram"] = step_ms(st.convert_(copy.deepcopy(digital), base, progress=False), x, y)
    verified = base.replace(write_verify_iters=20)  # the material presets' write-and-verify
    times["reprogram_20_iters"] = step_ms(
        st.convert_(copy.deepcopy(digital), verified, progress=False), x, y
    )
    payload = {
        "command": "python scripts/hwa_train.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out" and v is not None
        ),
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "revision": git_revision(),
        "digital_top1": evaluate_classification(digital, test_set, progress=False).metrics["top1"],
        "step_ms_batch64": times,
        "rows": rows,
    }
    print(f"step time at batch 64 (ms): {times}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hwa_train.json").write_text(json.dumps(payload, indent=2))
    print(f"results: {args.out / 'hwa_train.json'}")


if __name__ == "__main__":
    main()
