"""RRAM settings from configuration data: the ``rram`` Hydra group and ``eval.rram_settings``.

A setting is an :class:`RRAMConfig` with a label for tables. Configuration keys map 1:1 to
``RRAMConfig`` fields; an unknown key or a bad value raises a ``ValueError`` that names the
key (and the config section it came from) and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..rram import PRESETS, RRAMConfig

RRAM_FIELDS = tuple(f.name for f in dataclasses.fields(RRAMConfig))

CORRECTION_MODES: dict[str, dict[str, str]] = {
    "none": {"correction": "none", "denoise": "none"},
    "first_order": {"correction": "first_order", "denoise": "none"},
    "first_order_denoise": {"correction": "first_order", "denoise": "adaptive"},
}
"""Named error-correction modes: no correction; MELISO+ first-order correction; first-order
correction followed by the adaptive-lambda denoiser."""


@dataclass(frozen=True)
class RRAMSetting:
    """One RRAM configuration to evaluate, with its table label."""

    label: str
    config: RRAMConfig

    @property
    def material(self) -> str:
        return self.config.device.name

    @property
    def correction_mode(self) -> str:
        cfg = self.config
        for name, fields in CORRECTION_MODES.items():
            if cfg.correction == fields["correction"] and cfg.denoise == fields["denoise"]:
                return name
        return f"{cfg.correction}+{cfg.denoise}"


def _plain(node: Any) -> Any:
    """OmegaConf nodes -> plain Python containers (other values unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return node
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def rram_config_from_mapping(values: Mapping[str, Any], *, where: str = "rram") -> RRAMConfig:
    """An :class:`RRAMConfig` from a mapping whose keys are its field names.

    ``where`` names the config section in error messages (``rram``, ``eval.rram_settings[2]``).
    A ``preset`` key starts from that preset (``sedma_torch.rram.PRESETS``) and the other keys
    override it.
    """
    values = dict(_plain(values))
    base_name = values.pop("preset", None)
    unknown = sorted(set(values) - set(RRAM_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: unknown RRAMConfig key(s) {unknown}; allowed keys: "
            f"{', '.join(RRAM_FIELDS)} (and 'preset')"
        )
    if base_name is not None and base_name not in PRESETS:
        raise ValueError(
            f"{where}.preset: unknown preset {base_name!r}; known: {', '.join(sorted(PRESETS))}"
        )
    try:
        if base_name is not None:
            return PRESETS[base_name].replace(**values)
        return RRAMConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def resolve_setting(entry: Any, *, where: str) -> RRAMSetting:
    """One ``eval.rram_settings`` entry: a preset/material name (``"epiram"``), optionally
    with a correction mode (``"taox_hfox/first_order"``, the table label of that row), or a
    mapping of RRAMConfig fields, optionally with ``preset`` (start from it) and ``label``."""
    entry = _plain(entry)
    if isinstance(entry, str):
        name, _, mode = entry.partition("/")
        if name not in PRESETS:
            raise ValueError(
                f"{where}: unknown RRAM preset {name!r}; known presets (materials included): "
                f"{', '.join(sorted(PRESETS))}, each optionally /<correction> "
                f"({', '.join(CORRECTION_MODES)}); or give a mapping of RRAMConfig fields"
            )
        if not mode:
            return RRAMSetting(entry, PRESETS[entry])
        if mode not in CORRECTION_MODES:
            raise ValueError(
                f"{where}: unknown correction mode {mode!r} in {entry!r}; allowed after the "
                f"'/': {', '.join(CORRECTION_MODES)}"
            )
        return RRAMSetting(entry, PRESETS[name].replace(**CORRECTION_MODES[mode]))
    if isinstance(entry, Mapping):
        values = dict(entry)
        label = values.pop("label", None)
        config = rram_config_from_mapping(values, where=where)
        if label is None:
            label = values.get("preset") or config.device.name
        return RRAMSetting(str(label), config)
    raise ValueError(
        f"{where}: expected a preset name or a mapping of RRAMConfig fields, got {entry!r}"
    )


def with_corrections(
    settings: Iterable[RRAMSetting], corrections: Sequence[str] | None
) -> list[RRAMSetting]:
    """Each setting under each named correction mode (``CORRECTION_MODES``); ``None`` keeps
    the settings as they are. Labels become ``<label>/<mode>``."""
    settings = list(settings)
    if corrections is None:
        return settings
    corrections = list(_plain(corrections))
    bad = [c for c in corrections if c not in CORRECTION_MODES]
    if bad or not corrections:
        raise ValueError(
            f"eval.corrections: unknown mode(s) {bad or corrections}; allowed: "
            f"{', '.join(CORRECTION_MODES)} (or null to keep each setting's own)"
        )
    return [
        RRAMSetting(f"{s.label}/{mode}", s.config.replace(**CORRECTION_MODES[mode]))
        for s in settings
        for mode in corrections
    ]


def resolve_settings(
    entries: Sequence[Any] | None,
    base: Mapping[str, Any],
    *,
    base_label: str = "rram",
    corrections: Sequence[str] | None = None,
) -> list[RRAMSetting]:
    """The settings an evaluation compares with digital.

    Args:
        entries: ``eval.rram_settings``: preset names / mappings; ``None`` or empty uses the
            ``rram`` group config alone.
        base: the ``rram`` group config (mapping of RRAMConfig fields).
        base_label: its label (the group choice, e.g. ``epiram``).
        corrections: ``eval.corrections`` (see :func:`with_corrections`).
    """
    entries = _plain(entries)
    if entries is None or len(entries) == 0:
        settings = [RRAMSetting(base_label, rram_config_from_mapping(base, where="rram"))]
    elif isinstance(entries, str | Mapping):
        settings = [resolve_setting(entries, where="eval.rram_settings")]
    else:
        settings = [
            resolve_setting(e, where=f"eval.rram_settings[{i}]") for i, e in enumerate(entries)
        ]
    return with_corrections(settings, corrections)


def material_sweep(
    base: RRAMConfig, materials: Sequence[str], label: str = ""
) -> list[RRAMSetting]:
    """``base`` with only its material changed, once per material (same tiles, converters,
    programming and correction)."""
    out = []
    for i, name in enumerate(_plain(materials)):
        try:
            out.append(RRAMSetting(f"{label}{name}", base.replace(material=name)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"train.compare_materials[{i}]: {exc}") from exc
    return out


__all__ = [
    "CORRECTION_MODES",
    "RRAM_FIELDS",
    "RRAMSetting",
    "material_sweep",
    "resolve_setting",
    "resolve_settings",
    "rram_config_from_mapping",
    "with_corrections",
]
