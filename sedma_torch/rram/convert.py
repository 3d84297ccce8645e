"""`convert_`: swap a model's Linear / Conv2d / transformers Conv1D layers for RRAM ones, in place.

Follows torchao's ``quantize_``: one verb, in place, a config object, and an optional
``filter_fn(module, fqn) -> bool`` that picks the modules to convert. Each converted
layer gets its own seed derived from ``config.seed`` and its fully qualified name, so
conversion is reproducible and layers do not share noise patterns.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import RRAMConfig
from .crossbar import derive_seed
from .layers import RRAMConv2d, RRAMLinear, _CrossbarMixin
from .partition import tile_sizes_of

FilterFn = Callable[[nn.Module, str], bool]


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
    for name, child in list(model.named_children()):
        fqn = f"{prefix}.{name}" if prefix else name
        new = swap(child, fqn)
        if new is not None:
            setattr(model, name, new)
        else:
            _swap_modules(child, swap, fqn)


def _convertible(module: nn.Module) -> bool:
    if isinstance(module, _CrossbarMixin):
        return False
    conv1d = _transformers_conv1d()
    return isinstance(module, nn.Linear | nn.Conv2d) or (
        conv1d is not None and isinstance(module, conv1d)
    )


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
    """Replace ``nn.Linear``, ``nn.Conv2d`` and transformers ``Conv1D`` layers by RRAM layers.

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

    Projections inside ``nn.MultiheadAttention`` are used by its fused kernel, not through
    their forward pass, so they are left digital.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_ expects an nn.Module, got {type(model).__name__}")
    config = RRAMConfig() if config is None else config
    if not isinstance(config, RRAMConfig):
        raise TypeError(f"config must be an RRAMConfig, got {type(config).__name__}")
    conv1d = _transformers_conv1d()
    mha_children = _mha_children(model)
    converted: list[nn.Module] = []
    sizes = {} if partition is None else tile_sizes_of(partition)
    base_config = config

    def swap(module: nn.Module, fqn: str) -> nn.Module | None:
        if id(module) in mha_children or not _convertible(module):
            return None
        if filter_fn is not None and not filter_fn(module, fqn):
            return None
        seed = derive_seed(fqn)  # mixed with config.seed by the layer
        size = sizes.get(fqn)
        config = (
            base_config
            if size is None
            else dataclasses.replace(base_config, tile_rows=size, tile_cols=size)
        )
        if conv1d is not None and isinstance(module, conv1d):
            new: nn.Module = RRAMConv1D(
                module.nf,
                module.weight.shape[0],
                config=config,
                seed=seed,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
            new.weight = module.weight
            new.bias = module.bias
        elif isinstance(module, nn.Conv2d):
            new = RRAMConv2d.from_conv(module, config, seed=seed, program=False)
            new.weight, new.bias = module.weight, module.bias
        else:
            new = RRAMLinear.from_linear(module, config, seed=seed, program=False)  # type: ignore[arg-type]
            new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        if memory is not None or short_term is not None:
            new.attach_memory(memory, short_term)  # type: ignore[operator]
        converted.append(new)
        return new

    if _convertible(model) and (filter_fn is None or filter_fn(model, "")):
        raise ValueError(
            "convert_ works on a model's children; wrap a single layer with "
            "RRAMLinear.from_linear / RRAMConv2d.from_conv instead"
        )
    unknown = set(sizes) - {fqn for fqn, m in model.named_modules() if _convertible(m)}
    if unknown:
        raise ValueError(
            f"convert_: partition names layers that are not convertible layers of the model: "
            f"{sorted(unknown)[:5]}"
        )
    _swap_modules(model, swap)
    if program and converted:
        for layer in tqdm(
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

    @property
    def utilisation(self) -> float:
        """Model crossbar utilisation: used / allocated cells over all layers."""
        return self.used_cells / self.allocated_cells if self.allocated_cells else 0.0

    @property
    def crossbars(self) -> int:
        return sum(r["crossbars"] for r in self.rows)

    def __str__(self) -> str:
        head = f"{'layer':40s} {'type':11s} {'shape':>16s} {'material':10s} {'tiles':>7s} {'xbars':>6s} {'util':>6s}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r['name'][:40]:40s} {r['type']:11s} {r['shape']:>16s} {r['material']:10s} "
                f"{r['input_tiles']:>3d}x{r['column_tiles']:<3d} {r['crossbars']:>6d} {r['utilisation']:6.1%}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{len(self.rows)} RRAM layers, {self.crossbars} crossbars, "
            f"utilisation {self.utilisation:.1%}"
        )
        return "\n".join(lines)


def summary(model: nn.Module) -> RRAMSummary:
    """List the RRAM layers of ``model`` with their tiles and crossbar utilisation."""
    out = RRAMSummary()
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


__all__ = ["RRAMConv1D", "RRAMSummary", "convert_", "summary"]
