"""`convert_`: swap a model's matrix-product layers for RRAM ones, in place, and report.

Follows torchao's ``quantize_``: one verb, in place, a config object, and an optional
``filter_fn(module, fqn) -> bool`` that picks the modules to convert. Each converted
layer gets its own seed derived from ``config.seed`` and its fully qualified name, so
conversion is reproducible and layers do not share noise patterns.

Converted: ``nn.Linear`` (and subclasses), ``nn.Conv2d``, ``nn.Conv1d``,
``nn.MultiheadAttention`` (all its projections, :mod:`.attention`) and transformers'
``Conv1D``, also when parametrized (``torch.nn.utils.parametrize``: the parametrizations
move to the RRAM layer, which reads the computed weight). Every other module with
weights stays digital, and the :class:`ConversionReport` (returned by
:func:`conversion_report`, shown by :func:`summary`, logged at INFO) says why.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..progress import progress as _progress
from .config import RRAMConfig
from .conv import RRAMConv1d, RRAMConv2d
from .crossbar import derive_seed
from .lambda_control import CalibrationProgress
from .linear import RRAMLinear
from .partition import tile_sizes_of
from .state import _CrossbarMixin

FilterFn = Callable[[nn.Module, str], bool]
log = logging.getLogger(__name__)


def _transformers_conv1d() -> type | None:
    """transformers' ``Conv1D`` class, when transformers is already imported.

    A model holding a ``Conv1D`` has imported transformers, so there is no need to pay
    for importing it (seconds) when it is not loaded yet."""
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers broken: nothing to convert
        return None
    return Conv1D


def _mha_children(model: nn.Module) -> set[int]:
    """ids of the modules inside ``nn.MultiheadAttention`` blocks: its fused kernel uses
    their weights directly, not their forward pass, so they stay digital."""
    return {
        id(sub)
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
        for sub in m.modules()
        if sub is not m
    }


class RRAMConv1D(RRAMLinear):
    """transformers' ``Conv1D`` (GPT-2: weight stored as (in, out)) on crossbars."""

    _transposed_weight = True

    def __init__(
        self,
        nf: int,
        nx: int,
        *,
        config: RRAMConfig | None = None,
        seed: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(nx, nf, bias=True, device=device, dtype=dtype, config=config, seed=seed)
        self.nf, self.nx = nf, nx
        with torch.no_grad():
            self.weight = nn.Parameter(self.weight.detach().t().contiguous())

    def _digital_module(self) -> nn.Module:
        conv1d = _transformers_conv1d()
        if conv1d is None:
            raise RuntimeError("to_digital of an RRAMConv1D needs transformers installed")
        return conv1d(self.nf, self.nx).to(device=self.weight.device, dtype=self.weight.dtype)


def _swap_modules(
    model: nn.Module, swap: Callable[[nn.Module, str], nn.Module | None], prefix: str = ""
) -> None:
    """Replace children by ``swap(child, fqn)`` (None: keep it and recurse), everywhere a
    module occurs: a module used twice (``nn.Sequential(shared, act, shared)``) is swapped
    once and its replacement put in every place (``named_children`` would show it once)."""
    done: dict[int, nn.Module | None] = {}

    def visit(parent: nn.Module, pre: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            fqn = f"{pre}.{name}" if pre else name
            if id(child) in done:
                new = done[id(child)]
            else:
                new = swap(child, fqn)
                done[id(child)] = new
                if new is None:
                    visit(child, fqn)
            if new is not None:
                setattr(parent, name, new)

    visit(model, prefix)


def _is_parametrized(module: nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(module)


def _base_type(module: nn.Module) -> type:
    from torch.nn.utils import parametrize

    return parametrize.type_before_parametrizations(module)


def _convertible(module: nn.Module) -> bool:
    """A layer ``convert_`` turns into an RRAM one (or re-configures: an RRAM layer)."""
    if isinstance(module, _CrossbarMixin):
        return True
    conv1d = _transformers_conv1d()
    kind = _base_type(module)
    return issubclass(kind, nn.Linear | nn.Conv2d | nn.Conv1d) or (
        conv1d is not None and issubclass(kind, conv1d)
    )


def _uninitialised_lazy(module: nn.Module) -> bool:
    from torch.nn.modules.lazy import LazyModuleMixin

    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _digital_reason(module: nn.Module) -> str | None:
    """Why a module with its own weights stays digital (None: it has none)."""
    own = list(module.parameters(recurse=False)) + [
        b for b in module.buffers(recurse=False) if b.is_floating_point()
    ]
    if not own:
        return None
    if _uninitialised_lazy(module):
        return "uninitialised lazy module: run one forward pass before convert_"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "lookup table (rows are copied, not multiplied): digital by design"
    norms = (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.RMSNorm,
        nn.LocalResponseNorm,
    )
    if isinstance(module, norms):
        return "normalisation (elementwise scale and shift): digital by design"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"{type(module).__name__} has no crossbar mapping yet"
    if isinstance(module, nn.Conv3d):
        return "Conv3d has no crossbar mapping yet"
    if isinstance(module, nn.RNNBase):
        return f"{type(module).__name__}: its fused kernel reads the weights directly (no crossbar mapping yet)"
    if isinstance(module, nn.Bilinear):
        return "Bilinear (x1^T A x2) has no crossbar mapping yet"
    if isinstance(module, nn.PReLU):
        return "PReLU (an elementwise slope): digital by design"
    return f"{type(module).__name__} has no crossbar mapping"


def _old_style_reparametrisation(module: nn.Module) -> str | None:
    """The forward pre-hook of ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (the
    deprecated, hook-based ones), which sets ``weight`` as a plain tensor each call."""
    for hook in module._forward_pre_hooks.values():
        name = type(hook).__name__
        if name in ("WeightNorm", "SpectralNorm"):
            fix = "parametrizations." + ("weight_norm" if name == "WeightNorm" else "spectral_norm")
            return (
                f"uses the hook-based torch.nn.utils.{name[:-4].lower()}_norm: apply "
                f"torch.nn.utils.{fix} instead (converted with its parametrization) or remove it"
            )
    return None


@dataclass
class ConversionReport:
    """What :func:`convert_` did: one entry per module it converted or re-configured, and
    one per module with weights that it left digital, with the reason.

    Each entry is ``(fully qualified name, type name, detail)``; a module used at several
    places is listed once, under its first name."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    reconfigured: list[tuple[str, str, str]] = field(default_factory=list)
    digital: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"convert_: {len(self.converted)} converted, {len(self.reconfigured)} "
            f"re-configured, {len(self.digital)} with weights left digital"
        ]
        for title, rows in (
            ("converted", self.converted),
            ("re-configured", self.reconfigured),
            ("left digital", self.digital),
        ):
            for fqn, kind, detail in rows:
                lines.append(f"  {title:13s} {fqn or '<model>':40s} {kind:22s} {detail}")
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> ConversionReport | None:
    """The report of the last :func:`convert_` of ``model`` (None if never converted)."""
    return model.__dict__.get("_rram_conversion_report")


def _move_parametrizations(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the parametrizations of ``src`` (the same ParametrizationList objects,
    so the original tensors and an optimiser's references to them are kept)."""
    from torch.nn.utils import parametrize

    for name, plist in src.parametrizations.items():
        first = plist[0]
        parametrize.register_parametrization(dst, name, first, unsafe=True)
        dst.parametrizations[name] = plist


def convert_(
    model: nn.Module,
    config: RRAMConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    program: bool = True,
    progress: bool = True,
    partition: Any = None,
    memory: Any = None,
    short_term: Any = None,
) -> nn.Module:
    """Replace the model's matrix-product layers by RRAM layers, in place.

    Args:
        model: any ``nn.Module``; modified in place and returned.
        config: the crossbar configuration (default ``RRAMConfig()``).
        filter_fn: ``filter_fn(module, fqn) -> bool``; only modules it accepts are converted.
        program: program the crossbars now (otherwise on each layer's first forward pass).
        progress: show a progress bar while programming.
        partition: per-layer crossbar sizes, a :class:`~sedma_torch.rram.partition.PartitionPlan`
            (from ``plan_partition``) or ``{layer name: size}``; the named layers use
            ``size x size`` tiles instead of ``config.tile_rows x config.tile_cols``.
        memory: long-term memory for the adaptive lambda (``RRAMLinear.attach_memory``).
        short_term: short-term memory shared by the converted layers (see ``attach_memory``).

    Converts ``nn.Linear``, ``nn.Conv2d``, ``nn.Conv1d``, ``nn.MultiheadAttention`` and
    transformers' ``Conv1D`` (parametrized ones too). A module used at several places is
    converted once and the RRAM layer put at each. Converting an already converted model
    again **re-configures** its RRAM layers with the new ``config`` (``reconfigure_``: a
    new chip, programmed from scratch); the same config leaves them as they are. The
    report of what was converted, re-configured and left digital (with reasons) is logged
    at INFO and kept: :func:`conversion_report`, :func:`summary`.
    """
    from .attention import RRAMMultiheadAttention

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_ expects an nn.Module, got {type(model).__name__}")
    config = RRAMConfig() if config is None else config
    if not isinstance(config, RRAMConfig):
        raise TypeError(f"config must be an RRAMConfig, got {type(config).__name__}")
    conv1d = _transformers_conv1d()
    mha_children = _mha_children(model)
    converted: list[nn.Module] = []
    report = ConversionReport()
    sizes = {} if partition is None else tile_sizes_of(partition)
    base_config = config

    def config_of(fqn: str) -> RRAMConfig:
        size = sizes.get(fqn)
        if size is None:
            return base_config
        return dataclasses.replace(base_config, tile_rows=size, tile_cols=size)

    def new_layer(module: nn.Module, fqn: str, cfg: RRAMConfig) -> nn.Module:
        seed = derive_seed(fqn)  # mixed with config.seed by the layer
        kind = _base_type(module)
        if conv1d is not None and issubclass(kind, conv1d):
            new: nn.Module = RRAMConv1D(
                module.nf,
                module.weight.shape[0],
                config=cfg,
                seed=seed,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
        elif issubclass(kind, nn.Conv2d):
            new = RRAMConv2d.from_conv(module, cfg, seed=seed, program=False)  # type: ignore[arg-type]
        elif issubclass(kind, nn.Conv1d):
            new = RRAMConv1d.from_conv1d(module, cfg, seed=seed, program=False)  # type: ignore[arg-type]
        else:
            new = RRAMLinear.from_linear(module, cfg, seed=seed, program=False)  # type: ignore[arg-type]
        if _is_parametrized(module):
            _move_parametrizations(module, new)
        for name in ("weight", "bias"):
            if name not in getattr(module, "parametrizations", {}):
                setattr(new, name, getattr(module, name))  # the same Parameters
        return new

    def swap(module: nn.Module, fqn: str) -> nn.Module | None:
        kind = type(module).__name__
        if id(module) in mha_children:
            return None  # the attention module reads them
        accepted = filter_fn is None or filter_fn(module, fqn)
        if isinstance(module, RRAMMultiheadAttention | _CrossbarMixin):
            layers = (
                module.crossbar_layers().values()
                if isinstance(module, RRAMMultiheadAttention)
                else [module]
            )
            if accepted and any(m.rram_config != config_of(fqn) for m in layers):
                module.reconfigure_(config_of(fqn))
                report.reconfigured.append((fqn, kind, config_of(fqn).device.name))
                converted.append(module)
            return module
        if isinstance(module, nn.MultiheadAttention):
            if not accepted:
                report.digital.append((fqn, kind, "excluded by filter_fn"))
                return None
            new = RRAMMultiheadAttention.from_mha(
                module, config_of(fqn), seed=derive_seed(fqn), program=False
            )
            new.train(module.training)
            if memory is not None or short_term is not None:
                for layer in new.crossbar_layers().values():
                    layer.attach_memory(memory, short_term)
            report.converted.append((fqn, kind, "RRAMMultiheadAttention"))
            converted.append(new)
            return new
        if not _convertible(module) or _uninitialised_lazy(module):
            reason = _digital_reason(module)
            if reason is not None:
                report.digital.append((fqn, kind, reason))
            return None
        if not accepted:
            report.digital.append((fqn, kind, "excluded by filter_fn"))
            return None
        hook_reason = _old_style_reparametrisation(module)
        if hook_reason is not None:
            report.digital.append((fqn, kind, hook_reason))
            return None
        new = new_layer(module, fqn, config_of(fqn))
        new.train(module.training)
        if memory is not None or short_term is not None:
            new.attach_memory(memory, short_term)  # type: ignore[operator]
        report.converted.append((fqn, kind, type(new).__name__))
        converted.append(new)
        return new

    if _convertible(model) and (filter_fn is None or filter_fn(model, "")):
        if isinstance(model, _CrossbarMixin):
            raise ValueError(
                "convert_ works on a model's children; re-configure a single RRAM layer with "
                "layer.reconfigure_(config)"
            )
        raise ValueError(
            "convert_ works on a model's children; wrap a single layer with "
            "RRAMLinear.from_linear / RRAMConv2d.from_conv / RRAMConv1d.from_conv1d instead"
        )
    unknown = set(sizes) - {fqn for fqn, m in model.named_modules() if _convertible(m)}
    if unknown:
        raise ValueError(
            f"convert_: partition names layers that are not convertible layers of the model: "
            f"{sorted(unknown)[:5]}"
        )
    _swap_modules(model, swap)
    own_reason = _digital_reason(model)
    if own_reason is not None and not isinstance(model, RRAMMultiheadAttention):
        report.digital.insert(0, ("", type(model).__name__, own_reason))
    model.__dict__["_rram_conversion_report"] = report
    log.info("%s", report)
    unsupported = [r for r in report.digital if "digital by design" not in r[2]]
    unsupported = [r for r in unsupported if r[2] != "excluded by filter_fn"]
    if unsupported:
        log.warning(
            "convert_: %d module(s) with weights stay digital: %s (st.summary(model) lists why)",
            len(unsupported),
            ", ".join(f"{fqn} ({kind})" for fqn, kind, _ in unsupported[:5])
            + (" ..." if len(unsupported) > 5 else ""),
        )
    # one progress bar for the layers' first lambda calibrations (the first forward pass)
    crossbars = list(
        {
            id(layer): layer
            for module in converted
            for layer in (
                module.crossbar_layers().values()
                if isinstance(module, RRAMMultiheadAttention)
                else [module]
            )
        }.values()
    )  # a module shared by several places counts once
    calibration_progress = CalibrationProgress(crossbars)
    for layer in crossbars:
        layer.__dict__["_calibration_progress"] = calibration_progress
    if program and converted:
        for layer in _progress(
            converted, desc="programming crossbars", disable=not progress, leave=False
        ):
            layer.program_()  # type: ignore[operator]
    return model


@dataclass
class RRAMSummary:
    """What ``summary`` reports: one row per RRAM layer and model totals."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    used_cells: int = 0
    allocated_cells: int = 0
    report: ConversionReport | None = None
    """What the last ``convert_`` converted and left digital (None: not converted)."""

    @property
    def utilisation(self) -> float:
        """Model crossbar utilisation: used / allocated cells over all layers."""
        return self.used_cells / self.allocated_cells if self.allocated_cells else 0.0

    @property
    def crossbars(self) -> int:
        return sum(r["crossbars"] for r in self.rows)

    def __str__(self) -> str:
        head = f"{'layer':40s} {'type':22s} {'shape':>16s} {'material':10s} {'tiles':>7s} {'xbars':>6s} {'util':>6s}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r['name'][:40]:40s} {r['type'][:22]:22s} {r['shape']:>16s} {r['material']:10s} "
                f"{r['input_tiles']:>3d}x{r['column_tiles']:<3d} {r['crossbars']:>6d} {r['utilisation']:6.1%}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{len(self.rows)} RRAM layers, {self.crossbars} crossbars, "
            f"utilisation {self.utilisation:.1%}"
        )
        if self.report is not None:
            lines.append(str(self.report))
        return "\n".join(lines)


def summary(model: nn.Module) -> RRAMSummary:
    """List the RRAM layers of ``model`` with their tiles and crossbar utilisation, and
    the report of its last ``convert_`` (what it converted and left digital, and why)."""
    out = RRAMSummary(report=conversion_report(model))
    for name, module in model.named_modules():
        if not isinstance(module, _CrossbarMixin):
            continue
        info = module.crossbar_summary()
        cfg = module.rram_config
        per_tile = cfg.tile_rows * cfg.tile_cols
        tiles = info["input_tiles"] * info["column_tiles"]
        out.rows.append(
            {
                "name": name or "<model>",
                "type": type(module).__name__,
                "shape": "x".join(str(s) for s in module.weight.shape),
                "material": cfg.device.name,
                **info,
            }
        )
        out.used_cells += module._used_cells()
        out.allocated_cells += tiles * per_tile
    return out


__all__ = [
    "ConversionReport",
    "RRAMConv1D",
    "RRAMSummary",
    "conversion_report",
    "convert_",
    "summary",
]
