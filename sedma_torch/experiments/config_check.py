"""Validation of the composed Hydra config of ``train.py`` / ``eval.py`` before anything runs.

Hydra rejects ``train.foo=1`` (no such key) but accepts ``+train.foo=1`` and ``+bogus=1``,
which the apps would then silently ignore, and it takes ``train.lr=fast`` as the string
``"fast"``, which fails deep inside training without naming the key. :func:`check_app_config`
compares the composed config with the YAML files it was composed from (``configs/``):

* every key must exist in the file that defines its section (``config.yaml`` for the
  top level, ``train`` and ``eval``; ``configs/<group>/<choice>.yaml`` for a group, and any
  file of the ``model`` and ``dataset`` groups, whose builders read optional keys of every
  option, e.g. ``+model.preprocess``); unknown keys fail with the known ones listed;
* a value must have the type of its default: a number where the default is a number (not a
  bool, not NaN/inf), an int where it is an int, a bool, a string, a list, a mapping; keys
  whose default is ``null`` take what the code behind them validates, except the few typed in
  ``_NULLABLE``; ``_ALSO`` lists the keys that take more than their default's type
  (``train.resume: auto | false | <path>``).

The ``rram`` group is a mapping of :class:`~sedma_torch.rram.RRAMConfig` fields, validated
by :func:`~sedma_torch.experiments.settings.rram_config_from_mapping` (unknown fields and
types, with the field named); list entries (``deploy.cluster.nodes``, ``eval.rram_settings``)
are validated by the code that reads them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The repository's ``configs/`` folder (what ``train.py``/``eval.py`` compose from)."""

GROUPS = ("dataset", "model", "rram", "memory", "logger", "deploy", "distributed")
_SKIP_SECTIONS = {"rram", "hydra"}
# groups whose options share one reader (the model and dataset builders read optional keys
# such as ``model.preprocess`` of any option): keys of all their files are known
_OPEN_GROUPS = {"model", "dataset"}

# keys whose default is null but whose type is known: dotted key -> allowed types
_NULLABLE: dict[str, tuple[type, ...]] = {
    "threads": (int,),
    "train.checkpoint_dir": (str,),
    "eval.limit": (int,),
    "eval.rram_settings": (list,),
    "eval.corrections": (list,),
    "memory.url": (str,),
    "model.weights": (str,),
    "dataset.root": (str,),
    "dataset.limit_train": (int,),
    "deploy.description": (str,),
    "deploy.kubeconfig": (str,),
    "deploy.out_dir": (str,),
    "distributed.k": (int,),
}
# keys that take more than their default's type
_ALSO: dict[str, tuple[type, ...]] = {
    "train.resume": (bool,),  # auto | false | <path>
    "train.amp": (bool,),  # auto | true | false
    "deploy.dry_run": (type(None),),
}


class ConfigError(ValueError):
    """The composed config has an unknown key or a value of the wrong type."""


def check_app_config(
    cfg: Mapping[str, Any],
    choices: Mapping[str, Any] | None = None,
    config_dir: str | Path = CONFIG_DIR,
) -> None:
    """Raise :class:`ConfigError` naming the first unknown key or mistyped value of ``cfg``
    (the resolved, composed config), judged against the YAML files under ``config_dir``;
    ``choices`` maps each group to its selected option (``HydraConfig.get().runtime.choices``;
    without it a group's keys are those of all of its files)."""
    config_dir = Path(config_dir)
    reference = _load(config_dir / "config.yaml")
    reference.pop("defaults", None)
    reference.pop("hydra", None)
    for group in GROUPS:
        reference[group] = _group_reference(config_dir, group, (choices or {}).get(group))
    for key, value in cfg.items():
        if key in _SKIP_SECTIONS:
            continue
        _check(str(key), value, reference, key)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping")
    return data


def _group_reference(config_dir: Path, group: str, choice: Any) -> dict[str, Any]:
    folder = config_dir / group
    chosen = folder / f"{choice}.yaml"
    if group not in _OPEN_GROUPS and isinstance(choice, str) and chosen.is_file():
        return _load(chosen)
    # all options: a key's default type only where every file that has it agrees
    merged: dict[str, Any] = {}
    for path in sorted(folder.glob("*.yaml")):
        for key, value in _load(path).items():
            if key not in merged:
                merged[key] = value
            elif merged[key] is not None and _kind(merged[key]) != _kind(value):
                merged[key] = None
    return merged


def _check(dotted: str, value: Any, parent: Mapping[str, Any], key: str) -> None:
    if key not in parent:
        section = dotted.rpartition(".")[0]
        known = ", ".join(sorted(map(str, parent))) or "(none)"
        where = f"in {section!r}" if section else "at the top level"
        raise ConfigError(
            f"unknown config key {dotted!r} (nothing reads it; a typo, or a '+' override?); "
            f"known keys {where}: {known}"
        )
    default = parent[key]
    _check_type(dotted, value, default)
    if isinstance(default, Mapping) and isinstance(value, Mapping):
        for sub, sub_value in value.items():
            _check(f"{dotted}.{sub}", sub_value, default, str(sub))


def _kind(default: Any) -> tuple[tuple[type, ...], str]:
    if isinstance(default, bool):
        return (bool,), "true or false"
    if isinstance(default, int):
        return (int,), "an integer"
    if isinstance(default, float):
        return (int, float), "a number"
    if isinstance(default, str):
        return (str,), "a string"
    if isinstance(default, list):
        return (list,), "a list"
    if isinstance(default, Mapping):
        return (Mapping,), "a mapping"
    return (object,), "anything"


def _check_type(dotted: str, value: Any, default: Any) -> None:
    if default == "???":  # OmegaConf's mandatory value: required, checked by its reader
        return
    if default is None:
        if dotted not in _NULLABLE or value is None:
            return
        allowed, what = _NULLABLE[dotted], " or ".join(t.__name__ for t in _NULLABLE[dotted])
        what += " or null"
    else:
        allowed, what = _kind(default)
    allowed = allowed + _ALSO.get(dotted, ())
    if dotted in _ALSO:
        what += " or " + " or ".join(
            "null" if t is type(None) else t.__name__ for t in _ALSO[dotted]
        )
    is_bool = isinstance(value, bool)
    ok = any(isinstance(value, t) and (not is_bool or t in (bool, object)) for t in allowed)
    if not ok:
        raise ConfigError(
            f"config key {dotted!r} must be {what} (default {default!r}), got {value!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {dotted!r} must be finite, got {value!r}")
