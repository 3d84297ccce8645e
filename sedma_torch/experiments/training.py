"""Training loops: digital training, then hardware-aware fine-tuning through RRAM layers.

``train_epoch`` is one pass over a dataset. ``run_train`` is what ``train.py`` runs:

1. train the model digitally for ``train.epochs`` epochs;
2. convert a copy to the ``rram`` config and fine-tune it through the RRAM layers for
   ``train.hwa_epochs`` epochs (hardware-aware training, ``train.hwa``):

   * ``noise`` (default): every read runs on a freshly sampled chip
     (:mod:`sedma_torch.rram.hwa`: the programming error of the configured material and
     write-verify iterations, drawn from the programming model's own error distribution,
     stuck cells, drift, read noise, DAC/ADC) with straight-through gradients to the
     digital weights; nothing is programmed during training, as aihwkit(-lightning)
     trains. ``train.hwa_weight_clip``: clip the weights to that many standard
     deviations per layer after each step (aihwkit-lightning's layer-Gaussian clipping;
     per output channel with ``train.hwa_weight_clip_per_channel``);
     ``train.hwa_weight_noise``: Gaussian weight noise (std in column-|max| units) added
     before each sampled chip (aihwkit-lightning's ``ADD_NORMAL_PER_CHANNEL``);
   * ``reprogram``: the forward pass reads the programmed conductances and every
     optimiser step re-programs them with write-and-verify (the earlier mode: one
     programming event per layer and step, the main cost of the phase, and the model
     fits one chip's noise draw instead of the distribution of chips);
   * ``none``: no hardware-aware phase;
3. program the trained models once onto each RRAM setting and evaluate them against
   digital (same chip seeds for the digital and the hardware-aware weights).

A checkpoint is written atomically after every epoch (``<checkpoint_dir>/last.pt``); a
run started again with the same checkpoint folder continues from the epoch after the
last one saved, with the same result as a run that was never interrupted.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..progress import progress as _progress
from ..rram import to_digital
from ..rram.hwa import HWA_MODES, clip_weights_, hwa_noise_
from .builders import apply_threads, build_model, check_task, resolve_device, seed_everything
from .checkpoint import load_checkpoint, save_checkpoint
from .classification import evaluate_classification
from .compare import compare_settings, format_table, plot_metric, sample_text, write_json
from .logger import NullLogger, RunLogger, make_logger
from .memory_setup import ExperimentMemory, open_memory
from .settings import CORRECTION_MODES, material_sweep, rram_config_from_mapping, with_corrections

CHECKPOINT_VERSION = 1
PHASES = ("digital", "hwa")
StepCallback = Callable[[int, int, float, float], None]


def epoch_generator(seed: int, phase: str, epoch: int) -> torch.Generator:
    """The generator that shuffles epoch ``epoch`` of ``phase``: a function of its
    arguments only, so a resumed run shuffles exactly as an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + PHASES.index(phase) * 10_007 + epoch)


def use_amp(setting: Any, device: torch.device) -> bool:
    """Mixed precision on: ``auto`` means on CUDA only."""
    if setting in ("auto", None):
        return device.type == "cuda"
    if isinstance(setting, bool):
        if setting and device.type != "cuda":
            raise ValueError("train.amp=true needs a CUDA device; use train.amp=auto or false")
        return setting
    raise ValueError(f"train.amp must be auto, true or false, got {setting!r}")


def train_epoch(
    model: nn.Module,
    dataset: Dataset,
    optimizer: torch.optim.Optimizer,
    *,
    generator: torch.Generator,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    progress: bool = True,
    desc: str = "train",
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """One shuffled pass of cross-entropy training; returns mean loss, samples, seconds.

    ``on_step(step_in_epoch, samples, seconds, loss)`` is called after each optimiser step.
    With ``amp`` the forward pass runs under CUDA autocast (bfloat16).
    """
    model.train()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    total_loss, samples, start = 0.0, 0, time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    for step, (inputs, target) in enumerate(
        _progress(loader, desc=desc, disable=not progress, leave=False)
    ):
        step_start = time.perf_counter()
        inputs, target = inputs.to(device), target.to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = nn.functional.cross_entropy(model(inputs), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {float(loss.detach())} at step {step}")
        loss.backward()
        optimizer.step()
        n = int(target.shape[0])
        total_loss += float(loss.detach()) * n
        samples += n
        if on_step is not None:
            on_step(step, n, time.perf_counter() - step_start, float(loss.detach()))
    return {
        "loss": total_loss / max(samples, 1),
        "samples": samples,
        "seconds": time.perf_counter() - start,
    }


def _train_data(dataset_cfg: Mapping[str, Any]) -> tuple[Dataset, Dataset]:
    name = dataset_cfg.get("name")
    if name != "digits":
        raise ValueError(
            f"train.py trains on dataset=digits (the embedded default); dataset={name} is for "
            "eval.py (pretrained models)"
        )
    from ..data.digits import load_digits_split

    return load_digits_split(
        int(dataset_cfg.get("test_size", 397)),
        seed=int(dataset_cfg.get("split_seed", 0)),
        limit_train=dataset_cfg.get("limit_train"),
    )


def _hwa_model(
    digital: nn.Module, rram_cfg, *, program: bool, memory: ExperimentMemory
) -> nn.Module:
    return memory.convert(copy.deepcopy(digital), rram_cfg, program=program, progress=False)


class _DeployHook:
    """``sedma_torch.deploy.DeploymentHook`` when ``deploy.enabled``, else nothing."""

    def __init__(
        self,
        deploy_cfg: Mapping[str, Any] | None,
        model: nn.Module,
        memory: Any = None,
        run_dir: Path | None = None,
    ) -> None:
        self.hook = None
        if deploy_cfg and deploy_cfg.get("enabled"):
            from ..deploy import DeploymentHook

            deploy_cfg = dict(deploy_cfg)
            if not deploy_cfg.get("out_dir") and run_dir is not None:
                deploy_cfg["out_dir"] = str(Path(run_dir) / "deploy")  # this run's own folder
            self.hook = DeploymentHook.from_config(deploy_cfg, model, memory=memory)

    def summary(self) -> str | None:
        """The lines the run prints about deployment (None when disabled)."""
        return None if self.hook is None else self.hook.summary()

    def watch(self, model: nn.Module) -> None:
        """Learn the workflow from ``model`` when no forward pass was recorded yet (a run
        resumed straight into the hardware-aware phase)."""
        if self.hook is not None and self.hook.workflow is None:
            self.hook.watch(model)

    def on_step(self, step: int, samples: int, seconds: float) -> None:
        if self.hook is not None:
            self.hook.on_step(step=step, samples=samples, seconds=seconds)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()

    def events(self) -> list[dict[str, Any]]:
        """(Re)deployments so far: step, reason, seconds (empty when disabled)."""
        if self.hook is None:
            return []
        return [
            {"step": e.step, "reason": e.reason, "seconds": e.seconds} for e in self.hook.events
        ]


def _checkpoint_path(train_cfg: Mapping[str, Any], run_dir: Path) -> Path:
    folder = train_cfg.get("checkpoint_dir")
    return (Path(folder) if folder else run_dir / "checkpoints") / "last.pt"


def _resume_state(train_cfg: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    resume = train_cfg.get("resume", "auto")
    if resume in (False, "false", "never", None):
        return None
    if resume == "auto":
        return load_checkpoint(path) if path.is_file() else None
    explicit = Path(str(resume))
    if not explicit.is_file():
        raise FileNotFoundError(
            f"train.resume={str(resume)!r}: no such checkpoint file (use auto, false or a path "
            "to a last.pt written by train.py)"
        )
    return load_checkpoint(explicit)


def _phase_loop(
    *,
    phase: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    epochs: int,
    train_set: Dataset,
    test_set: Dataset,
    cfg: Mapping[str, Any],
    device: torch.device,
    amp: bool,
    logger: RunLogger,
    hook: _DeployHook,
    ckpt_path: Path,
    progress: bool,
    distributed: Any | None = None,
) -> None:
    tcfg = cfg["train"]
    main = distributed is None or distributed.is_main
    trainer = model if distributed is None else distributed.wrap(model, phase=phase)
    seed = int(cfg.get("seed", 0))
    start = state["epoch"] if state["phase"] == phase else 0
    if start >= epochs:
        print(
            f"{phase} training already finished in {ckpt_path} ({start} epoch(s) done, "
            f"{epochs} configured): not training it again"
        )
    elif start:
        print(f"resuming {phase} training at epoch {start + 1}/{epochs} from {ckpt_path}")

    clip = tcfg.get("hwa_weight_clip") if phase == "hwa" else None
    per_channel = bool(tcfg.get("hwa_weight_clip_per_channel", False))

    def on_step(step: int, samples: int, seconds: float, loss: float) -> None:
        if clip is not None:
            clip_weights_(model, float(clip), per_channel=per_channel)
        state["step"] += 1
        hook.on_step(state["step"], samples, seconds)
        logger.log(
            {f"{phase}/loss": loss, f"{phase}/samples_per_s": samples / seconds}, step=state["step"]
        )

    for epoch in _progress(range(start, epochs), desc=f"{phase} epochs", disable=not progress):
        stats = train_epoch(
            trainer,
            train_set,
            optimizer,
            generator=epoch_generator(seed, phase, epoch),
            batch_size=int(tcfg["batch_size"]),
            device=device,
            amp=amp,
            progress=progress,
            desc=f"{phase} epoch {epoch + 1}",
            on_step=on_step,
        )
        state.update(phase=phase, epoch=epoch + 1)
        if not main:  # rank > 0 of a distributed run: rank 0 evaluates and checkpoints
            continue
        test = evaluate_classification(
            model,
            test_set,
            device=device,
            batch_size=int(tcfg.get("eval_batch_size", 512)),
            progress=False,
        )
        record = {
            "phase": phase,
            "epoch": epoch + 1,
            "train_loss": stats["loss"],
            "test_top1": test.metrics["top1"],
            "train_samples_per_s": stats["samples"] / stats["seconds"],
        }
        state["history"].append(record)
        logger.log(
            {f"{phase}/{k}": v for k, v in record.items() if k != "phase"}, step=state["step"]
        )
        print(
            f"{phase} epoch {epoch + 1}/{epochs}: loss {stats['loss']:.4f}, "
            f"test top1 {test.metrics['top1']:.4f}, {record['train_samples_per_s']:.0f} samples/s"
        )
        state.update(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            torch_rng=torch.get_rng_state(),
        )
        save_checkpoint(ckpt_path, state)


def run_train(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    *,
    rram_label: str = "rram",
    distributed: Any | None = None,
) -> dict:
    """Digital training, hardware-aware fine-tuning on ``cfg.rram``, then the comparison.

    ``cfg`` is the composed Hydra config as plain data. Writes ``<run_dir>/results.json``,
    ``results.png``, ``model_digital.pt`` and ``model_hwa.pt`` (digital state dicts of the
    two trained models) and prints the comparison table; returns the JSON payload.
    ``distributed``: a :class:`~sedma_torch.experiments.distributed_train.DistributedContext`
    on every rank of a data-parallel run (see that module); ranks > 0 return ``{}``.
    """
    run_dir = Path(run_dir)
    tcfg = cfg["train"]
    check_task(cfg["dataset"], cfg["model"])
    for key in ("epochs", "hwa_epochs", "batch_size"):
        value = tcfg.get(key)
        low = 1 if key == "batch_size" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"train.{key} must be an int >= {low}, got {value!r}")
    rram_cfg = rram_config_from_mapping(cfg["rram"], where="rram")
    hwa_mode = hwa_mode_of(tcfg)
    apply_threads(cfg.get("threads"))
    device = resolve_device(cfg.get("device", "auto"))
    amp = use_amp(tcfg.get("amp", "auto"), device)
    progress = bool(tcfg.get("progress", True))
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    wall = time.perf_counter()

    train_set, test_set = _train_data(cfg["dataset"])
    main = distributed is None or distributed.is_main
    if distributed is not None:
        train_set = distributed.shard(train_set)
    digital = build_model(cfg["model"], for_training=True).to(device)
    optimizer = torch.optim.Adam(digital.parameters(), lr=float(tcfg["lr"]))
    ckpt_path = _checkpoint_path(tcfg, run_dir)
    state = _resume_state(tcfg, ckpt_path)
    if state is None:
        state = {
            "version": CHECKPOINT_VERSION,
            "phase": "digital",
            "epoch": 0,
            "step": 0,
            "history": [],
            "digital_model": None,
        }
    elif state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{ckpt_path}: checkpoint version {state.get('version')!r} unsupported")
    else:
        torch.set_rng_state(state["torch_rng"])
    logger = make_logger(cfg["logger"], run_dir, dict(cfg)) if main else NullLogger()
    memory = open_memory(cfg.get("memory") if main else None)
    hook = _DeployHook(cfg.get("deploy") if main else None, digital, memory.long_term, run_dir)
    common = {
        "state": state,
        "train_set": train_set,
        "test_set": test_set,
        "cfg": cfg,
        "device": device,
        "amp": amp,
        "logger": logger,
        "hook": hook,
        "ckpt_path": ckpt_path,
        "progress": progress and main,
        "distributed": distributed,
    }
    try:
        if state["phase"] == "digital":
            if state["epoch"]:
                _load(digital, optimizer, state, ckpt_path)
            _phase_loop(
                phase="digital",
                model=digital,
                optimizer=optimizer,
                epochs=int(tcfg["epochs"]),
                **common,
            )
            state["digital_model"] = digital.state_dict()
        else:
            digital.load_state_dict(state["digital_model"])
        hwa = None
        if hwa_mode != "none":
            # hardware-aware phase: never mixed precision (the simulator reads in float32)
            program = hwa_mode == "reprogram" and state["phase"] != "hwa"
            hwa = _hwa_model(digital, rram_cfg, program=program, memory=memory)
            hwa_opt = torch.optim.Adam(hwa.parameters(), lr=float(tcfg["hwa_lr"]))
            if state["phase"] == "hwa":
                _load(hwa, hwa_opt, state, ckpt_path)
            hook.watch(hwa)
            common["amp"] = False
            hwa_noise_(
                hwa, hwa_mode == "noise", weight_noise=float(tcfg.get("hwa_weight_noise") or 0.0)
            )
            try:
                _phase_loop(
                    phase="hwa",
                    model=hwa,
                    optimizer=hwa_opt,
                    epochs=int(tcfg["hwa_epochs"]),
                    **common,
                )
            finally:
                hwa_noise_(hwa, False)
    finally:
        hook.close()
    train_seconds = time.perf_counter() - wall

    hwa_digital = None if hwa is None else to_digital(copy.deepcopy(hwa))
    if distributed is not None:
        models = {"digital": digital}
        if hwa_digital is not None:
            models["hwa"] = hwa_digital
        distributed.finish(run_dir, models)
        if not main:
            memory.close()
            return {}
    torch.save(digital.state_dict(), run_dir / "model_digital.pt")
    if hwa_digital is not None:
        torch.save(hwa_digital.state_dict(), run_dir / "model_hwa.pt")
    try:
        payload = compare_trained(
            cfg,
            digital,
            hwa_digital,
            test_set,
            device=device,
            rram_cfg=rram_cfg,
            rram_label=rram_label,
            progress=progress,
            memory=memory,
        )
    finally:
        memory.close()
    payload.update(
        hwa_mode=hwa_mode,
        train_seconds=train_seconds,
        seconds_total=time.perf_counter() - wall,
        history=state["history"],
        deploy_events=hook.events(),
        deploy_dir=str(hook.hook.out_dir) if hook.hook is not None else None,
        command=" ".join(sys.argv),
    )
    if distributed is not None:
        payload["distributed"] = distributed.summary()
    write_json(run_dir / "results.json", payload)
    plot_metric(
        payload["rows"],
        "top1",
        run_dir / "results.png",
        title=f"{cfg['model'].get('name')} on {cfg['dataset'].get('name')}: test accuracy",
        samples=sample_text(payload.get("n_samples"), noun="test images"),
    )
    if hook.summary():
        print(hook.summary())
    print(f"results: {run_dir / 'results.json'}\nplot: {run_dir / 'results.png'}")
    for r in payload["rows"]:
        logger.summary({f"{r['label']}/top1": r["top1"]})
    logger.finish()
    return payload


def hwa_mode_of(train_cfg: Mapping[str, Any]) -> str:
    """``train.hwa`` (default ``noise``), checked against :data:`HWA_MODES`."""
    mode = train_cfg.get("hwa", "noise")
    if mode is False:  # YAML "none"/"false" spelled as a boolean
        mode = "none"
    if mode not in HWA_MODES:
        raise ValueError(f"train.hwa must be one of {', '.join(HWA_MODES)}, got {mode!r}")
    clip = train_cfg.get("hwa_weight_clip")
    number = isinstance(clip, (int, float)) and not isinstance(clip, bool)
    if clip is not None and (not number or clip <= 0):
        raise ValueError(f"train.hwa_weight_clip must be null or a number > 0, got {clip!r}")
    noise = train_cfg.get("hwa_weight_noise", 0.0)
    numeric = isinstance(noise, (int, float)) and not isinstance(noise, bool)
    if noise is not None and (not numeric or noise < 0):
        raise ValueError(f"train.hwa_weight_noise must be a number >= 0, got {noise!r}")
    per_channel = train_cfg.get("hwa_weight_clip_per_channel", False)
    if not isinstance(per_channel, bool):
        raise ValueError(
            f"train.hwa_weight_clip_per_channel must be true or false, got {per_channel!r}"
        )
    return str(mode)


def _load(model: nn.Module, optimizer, state: Mapping[str, Any], path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"checkpoint {path} does not fit this model/config ({exc}); start a fresh run "
            "(train.resume=false or another hydra.run.dir)"
        ) from exc


def compare_trained(
    cfg: Mapping[str, Any],
    digital: nn.Module,
    hwa_digital: nn.Module | None,
    test_set: Dataset,
    *,
    device: torch.device,
    rram_cfg,
    rram_label: str,
    progress: bool,
    memory: ExperimentMemory | None = None,
) -> dict[str, Any]:
    """Rows: the digital model digitally and programmed onto each material of
    ``train.compare_materials`` (same system settings as ``rram``) under each correction
    mode of ``train.compare_corrections``; the hardware-aware model ("hwa:") digitally and
    programmed onto the training chip (``rram``) under each correction mode."""
    tcfg = cfg["train"]
    corrections = list(tcfg.get("compare_corrections") or CORRECTION_MODES)
    batch = int(tcfg.get("eval_batch_size", 512))

    def evaluate(model: nn.Module):
        return evaluate_classification(
            model, test_set, device=device, batch_size=batch, progress=False
        )

    sweep = with_corrections(
        material_sweep(rram_cfg, tcfg.get("compare_materials") or []), corrections
    )
    rows, reference = compare_settings(digital, sweep, evaluate, progress=progress, memory=memory)
    if hwa_digital is not None:
        hwa_settings = with_corrections(
            material_sweep(rram_cfg, [rram_cfg.device.name]), corrections
        )
        hwa_reference = evaluate(hwa_digital)
        hwa_rows, _ = compare_settings(
            hwa_digital,
            hwa_settings,
            evaluate,
            digital=hwa_reference,
            label_prefix="hwa:",
            progress=progress,
            memory=memory,
        )
        hwa_rows[0]["mean_output_error"] = None
        rows += hwa_rows
    print(
        f"\nclassification: model={cfg['model'].get('name')} dataset={cfg['dataset'].get('name')}"
        f" ({reference.n_samples} test samples), device={device}; hardware-aware training on "
        f"{rram_label} ({rram_cfg.device.name}); 'hwa:' rows: the hardware-aware model"
    )
    print(format_table(rows, list(reference.metrics)))
    if memory is not None:
        print(memory.describe())
    return {
        "memory": memory.info() if memory is not None else None,
        "task": "classification",
        "dataset": cfg["dataset"].get("name"),
        "model": cfg["model"].get("name"),
        "n_samples": reference.n_samples,
        "device": str(device),
        "hwa_rram_config": rram_cfg.to_dict(),
        "rows": rows,
    }


__all__ = [
    "compare_trained",
    "epoch_generator",
    "hwa_mode_of",
    "run_train",
    "train_epoch",
    "use_amp",
]
