"""Hardware-aware training side by side with IBM aihwkit-lightning (issue 14, item 3).

aihwkit-lightning pins its own torch, so it lives in a separate venv that also sees this
project (``--system-site-packages`` plus the editable install)::

    python -m venv /work/ahl-venv --system-site-packages
    /work/ahl-venv/bin/pip install aihwkit-lightning
    /work/ahl-venv/bin/python scripts/bench_aihwkit_lightning.py [--seeds 3] [--threads 2]

Both sides run in that one process (same torch, threads, data and batches).

**(a) Training step time**, as a ratio to the digital step of the same model, batch and
threads, all sides timed alternately (medians after warm-up):

* train.py's digits CNN at batch 64;
* EfficientNet-Lite0 (random init, 224x224 random images) at batch 8. aihwkit-lightning's
  ``AnalogConv2d`` has no grouped convolutions, so its model keeps the 13 depthwise
  convolutions digital (``exclude_modules``); ours converts every layer.

Ours is ``train.hwa=noise`` on the ``open_loop`` chip (a freshly sampled chip per read:
programming error of the material's write-and-verify model, read noise, DAC/ADC with
calibrated ranges). aihwkit-lightning's is the HWA recipe of its user guide: 8-bit input
and output quantisation (``inp_res = out_res = 254``, ``out_bound = 12``), per-channel output
noise 0.01, ``LAYER_GAUSSIAN_PER_CHANNEL`` weight clipping at 2.5 sigma, learned input
ranges, 256-row tiles, and ``ADD_NORMAL_PER_CHANNEL`` weight noise injection whose std (relative to
each channel's |max|) is set to the std of the material's programming error in our device
model (``ProgrammingErrorModel``, in fractions of the conductance window, which our
mapping gives each column's |max|): the same error magnitude, injected its way.

**(b) Chip accuracy of the trained weights**: the digits CNN trained digitally with
train.py's recipe (8 epochs, Adam 3e-3, batch 64, seed 0), then fine-tuned for 2 epochs
(Adam 1e-3, same batches) by each recipe, per material; each set of weights is programmed
onto *our* simulated chips (``open_loop`` with that material, seeds 0..N-1, correction
none) and evaluated on the test split, beside the digital weights on the same chips.
A third set is ours with aihwkit-lightning's weight clipping added (per channel at 2.5
std after every step, ``train.hwa_weight_clip=2.5 train.hwa_weight_clip_per_channel=true``),
to separate its clipping from its noise, and a fourth with its Gaussian weight noise as well
(``train.hwa_weight_noise``, the same std, added to each weight in units of its column's
|max| before every chip is sampled). aihwkit-lightning's learned input ranges do not transfer (our DAC ranges each input tile by
its |max|); its weights do, through ``convert_to_digital``.

Writes ``results/bench_aihwkit_lightning.json``.
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
from hwa_train import MATERIALS, chip_top1, fine_tune, mean_spread
from tqdm.auto import tqdm

import sedma_torch as st
from sedma_torch.data.digits import load_digits_split
from sedma_torch.models.efficientnet_lite import efficientnet_lite0
from sedma_torch.models.small_cnn import small_cnn
from sedma_torch.rram import PRESETS
from sedma_torch.rram.hwa import ProgrammingErrorModel, hwa_noise_

try:
    import aihwkit_lightning
    from aihwkit_lightning.nn.conversion import convert_to_analog, convert_to_digital
    from aihwkit_lightning.optim import AnalogOptimizer
    from aihwkit_lightning.simulator.configs import (
        TorchInferenceRPUConfig,
        WeightClipType,
        WeightNoiseInjectionType,
    )
except ImportError as exc:  # pragma: no cover - depends on the venv
    raise SystemExit(
        f"aihwkit-lightning is not importable ({exc}); run this script with the Python of a "
        "venv that has it (see the module docstring)"
    ) from exc


def programming_error_std(cfg: st.RRAMConfig) -> float:
    """Std of the programming error of programmed (non-idle) cells, in window fractions."""
    samples = ProgrammingErrorModel.fit(cfg).samples
    return float(samples[1:].double().std())


def lightning_config(weight_noise: float) -> TorchInferenceRPUConfig:
    """aihwkit-lightning's user-guide HWA recipe with ``weight_noise`` per-channel std."""
    cfg = TorchInferenceRPUConfig()
    cfg.forward.inp_res = 2**8 - 2
    cfg.forward.out_res = 2**8 - 2
    cfg.forward.out_bound = 12.0
    cfg.forward.out_noise = 0.01
    cfg.forward.out_noise_per_channel = True
    cfg.clip.type = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL
    cfg.clip.sigma = 2.5
    cfg.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL
    cfg.modifier.std_dev = weight_noise
    cfg.mapping.max_input_size = 256
    cfg.pre_post.input_range.enable = True
    cfg.pre_post.input_range.learn_input_range = True
    cfg.pre_post.input_range.init_from_data = 10
    return cfg


def lightning_model(digital: torch.nn.Module, cfg, exclude=None) -> torch.nn.Module:
    model = convert_to_analog(copy.deepcopy(digital), cfg, exclude_modules=exclude)
    return model.train()


def lightning_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return AnalogOptimizer(torch.optim.Adam, model.analog_layers, model.parameters(), lr=lr)


def lightning_fine_tune(digital, train_set, cfg, epochs: int, lr: float) -> torch.nn.Module:
    """The same batches as :func:`hwa_train.fine_tune`, with aihwkit-lightning's layers and
    optimizer (weight clipping after every step); returns the digital weights."""
    from sedma_torch.experiments.training import epoch_generator, train_epoch

    model = lightning_model(digital, cfg)
    opt = lightning_optimizer(model, lr)
    for epoch in range(epochs):
        train_epoch(
            model,
            train_set,
            opt,
            generator=epoch_generator(0, "hwa", epoch),
            batch_size=64,
            device=torch.device("cpu"),
            progress=False,
        )
    return convert_to_digital(model.eval())


def interleaved_step_ms(sides: dict, x, y, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of one Adam training step per side, the sides called in turn."""
    steps = {}
    for name, (model, opt) in sides.items():

        def step(model=model, opt=opt) -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            begin = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(1e3 * (time.perf_counter() - begin))
    return {name: statistics.median(t) for name, t in times.items()}


def step_rows(digital, x, y, weight_noise: float, warmup: int, repeats: int, exclude=None):
    ours = st.convert_(copy.deepcopy(digital), PRESETS["open_loop"], program=False, progress=False)
    hwa_noise_(ours, True)
    theirs = lightning_model(digital, lightning_config(weight_noise), exclude)
    digital = copy.deepcopy(digital).train()
    sides = {
        "digital": (digital, torch.optim.Adam(digital.parameters(), lr=1e-4)),
        "sedma_hwa_noise": (ours.train(), torch.optim.Adam(ours.parameters(), lr=1e-4)),
        "aihwkit_lightning_hwa": (theirs, lightning_optimizer(theirs, 1e-4)),
    }
    ms = interleaved_step_ms(sides, x, y, warmup, repeats)
    hwa_noise_(ours, False)
    return {
        "step_ms": ms,
        "ratio_to_digital": {k: v / ms["digital"] for k, v in ms.items()},
        "sedma_over_aihwkit_lightning": ms["sedma_hwa_noise"] / ms["aihwkit_lightning_hwa"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--materials", nargs="+", default=MATERIALS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-efficientnet", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set, test_set = load_digits_split(397, seed=0)
    torch.manual_seed(0)
    digital = fine_tune(small_cnn(), train_set, 8, 3e-3, 0, "digital")
    noise = {m: programming_error_std(PRESETS["open_loop"].replace(material=m)) for m in MATERIALS}
    print("programming-error std (window fractions):", {k: round(v, 4) for k, v in noise.items()})

    x, y = next(iter(torch.utils.data.DataLoader(train_set, batch_size=64)))
    timing = {"digits_cnn_batch64": step_rows(digital, x, y, noise["taox_hfox"], 3, args.repeats)}
    print("digits CNN step (ms):", timing["digits_cnn_batch64"]["step_ms"])
    if not args.skip_efficientnet:
        torch.manual_seed(0)
        net = efficientnet_lite0(pretrained=False)
        depthwise = [
            name
            for name, m in net.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.groups > 1
        ]
        xe = torch.randn(8, 3, 224, 224)
        ye = torch.randint(0, 1000, (8,))
        timing["efficientnet_lite0_batch8"] = step_rows(
            net, xe, ye, noise["taox_hfox"], 2, max(5, args.repeats // 4), exclude=depthwise
        )
        timing["efficientnet_lite0_batch8"]["aihwkit_lightning_digital_depthwise"] = len(depthwise)
        print("EfficientNet-Lite0 step (ms):", timing["efficientnet_lite0_batch8"]["step_ms"])

    rows = []
    if not args.skip_accuracy:
        for name in tqdm(args.materials, desc="materials"):
            base = PRESETS["open_loop"].replace(material=name)
            torch.manual_seed(0)
            ours = st.convert_(copy.deepcopy(digital), base, program=False, progress=False)
            hwa_noise_(ours, True)
            fine_tune(ours, train_set, 2, 1e-3, 0, "hwa")
            hwa_noise_(ours, False)
            ours_w = st.to_digital(ours)
            # ours again with aihwkit-lightning's weight clipping (per channel, 2.5 std)
            torch.manual_seed(0)
            clipped = st.convert_(copy.deepcopy(digital), base, program=False, progress=False)
            hwa_noise_(clipped, True)
            fine_tune(clipped, train_set, 2, 1e-3, 0, "hwa", 2.5, per_channel=True)
            hwa_noise_(clipped, False)
            clipped_w = st.to_digital(clipped)
            # ... and with its Gaussian weight noise too (the same std), on top of the chip's
            torch.manual_seed(0)
            both = st.convert_(copy.deepcopy(digital), base, program=False, progress=False)
            hwa_noise_(both, True, weight_noise=noise[name])
            fine_tune(both, train_set, 2, 1e-3, 0, "hwa", 2.5, per_channel=True)
            hwa_noise_(both, False)
            both_w = st.to_digital(both)
            torch.manual_seed(0)
            theirs_w = lightning_fine_tune(
                digital, train_set, lightning_config(noise[name]), 2, 1e-3
            )
            acc: dict[str, list[float]] = {
                "digital": [],
                "sedma_hwa": [],
                "sedma_hwa_clip_per_channel_2.5": [],
                "sedma_hwa_clip_and_weight_noise": [],
                "aihwkit_lightning": [],
            }
            for seed in range(args.seeds):
                cfg = base.replace(seed=seed)
                acc["digital"].append(chip_top1(digital, cfg, test_set))
                acc["sedma_hwa"].append(chip_top1(ours_w, cfg, test_set))
                acc["sedma_hwa_clip_per_channel_2.5"].append(chip_top1(clipped_w, cfg, test_set))
                acc["sedma_hwa_clip_and_weight_noise"].append(chip_top1(both_w, cfg, test_set))
                acc["aihwkit_lightning"].append(chip_top1(theirs_w, cfg, test_set))
            row = {
                "material": name,
                "weight_noise_std": noise[name],
                "chip_top1": {k: {"values": v, **mean_spread(v)} for k, v in acc.items()},
            }
            rows.append(row)
            print(
                f"{name:10s} chip top-1: digital {row['chip_top1']['digital']['mean']:.4f} "
                f"sedma HWA {row['chip_top1']['sedma_hwa']['mean']:.4f} "
                f"(clipped {row['chip_top1']['sedma_hwa_clip_per_channel_2.5']['mean']:.4f}, "
                f"+ weight noise {row['chip_top1']['sedma_hwa_clip_and_weight_noise']['mean']:.4f}) "
                f"aihwkit-lightning HWA {row['chip_top1']['aihwkit_lightning']['mean']:.4f}"
            )
    payload = {
        "command": "python scripts/bench_aihwkit_lightning.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "aihwkit_lightning": getattr(aihwkit_lightning, "__version__", "unknown"),
        "revision": git_revision(),
        "timing": timing,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_aihwkit_lightning.json").write_text(json.dumps(payload, indent=2))
    print(f"results: {args.out / 'bench_aihwkit_lightning.json'}")


if __name__ == "__main__":
    main()
