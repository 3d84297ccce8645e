"""RRAM settings from config data: yaml keys are RRAMConfig fields, errors name the key."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

import sedma_torch as st
from sedma_torch.experiments.settings import (
    CORRECTION_MODES,
    resolve_settings,
    rram_config_from_mapping,
)

from ..conftest import REPO

RRAM_DIR = REPO / "configs" / "rram"


def test_every_rram_yaml_is_a_preset_by_the_same_name():
    # st.preset(<the Hydra rram choice>) works for every option of the group (issue 15)
    assert {p.stem for p in RRAM_DIR.glob("*.yaml")} == set(st.PRESETS)


@pytest.mark.parametrize("name", sorted(st.PRESETS))
def test_each_preset_has_a_yaml_with_every_field_and_the_same_values(name):
    node = OmegaConf.load(RRAM_DIR / f"{name}.yaml")
    assert set(node) == {f.name for f in dataclasses.fields(st.RRAMConfig)}
    assert rram_config_from_mapping(node) == st.PRESETS[name]


def test_open_loop_yaml_is_taox_hfox_with_one_write():
    cfg = rram_config_from_mapping(OmegaConf.load(RRAM_DIR / "open_loop.yaml"))
    assert cfg == st.RRAMConfig(material="taox_hfox", write_verify_iters=1)


def test_unknown_key_error_names_the_key_and_section():
    with pytest.raises(ValueError, match=r"rram: unknown RRAMConfig key\(s\) \['tile_row'\]"):
        rram_config_from_mapping({"material": "epiram", "tile_row": 64})


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("adc_bits", 40, "adc_bits"),
        ("material", "unobtainium", "unobtainium"),
        ("correction", "second_order", "correction"),
        ("tile_rows", 0, "tile_rows"),
    ],
)
def test_bad_value_error_names_the_field(key, value, match):
    with pytest.raises(ValueError, match=match) as err:
        rram_config_from_mapping({key: value}, where="eval.rram_settings[1]")
    assert str(err.value).startswith("eval.rram_settings[1]:")


def test_settings_from_names_mappings_and_corrections():
    settings = resolve_settings(
        ["epiram", {"preset": "ag_asi", "tile_rows": 64, "label": "agsi64"}],
        {"material": "ideal"},
        corrections=["none", "first_order_denoise"],
    )
    assert [s.label for s in settings] == [
        "epiram/none",
        "epiram/first_order_denoise",
        "agsi64/none",
        "agsi64/first_order_denoise",
    ]
    assert settings[0].config == st.PRESETS["epiram"]
    assert settings[1].config == st.PRESETS["epiram"].replace(
        correction="first_order", denoise="adaptive"
    )
    assert settings[3].config.tile_rows == 64 and settings[3].config.device.name == "ag_asi"
    assert settings[3].correction_mode == "first_order_denoise"
    assert set(CORRECTION_MODES) == {"none", "first_order", "first_order_denoise"}


def test_no_settings_means_the_rram_group_alone():
    (only,) = resolve_settings(None, {"material": "epiram", "adc_bits": 6}, base_label="mine")
    assert only.label == "mine" and only.config == st.RRAMConfig(material="epiram", adc_bits=6)


def test_unknown_preset_and_correction_mode_are_rejected_with_the_known_names():
    with pytest.raises(ValueError, match=r"eval.rram_settings\[0\].*'epiramm'.*epiram"):
        resolve_settings(["epiramm"], {})
    with pytest.raises(ValueError, match=r"eval\.corrections.*second"):
        resolve_settings(["epiram"], {}, corrections=["second"])
