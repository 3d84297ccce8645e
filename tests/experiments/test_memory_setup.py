"""The ``memory`` config group: long-term store, adaptive lambda and partition in experiments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sedma_torch as st
from sedma_torch.experiments.memory_setup import open_memory


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def test_memory_guided_conversion_stores_and_reuses_the_partition(tmp_path):
    cfg = {"enabled": True, "url": str(tmp_path / "m.db"), "partition": "memory_guided"}
    cfg_rram = st.RRAMConfig(material="epiram", denoise="adaptive", calibration_interval=1)
    mem = open_memory(cfg)
    try:
        model = mem.convert(_model(), cfg_rram, progress=False)
        sizes = {
            n: m.rram_config.tile_rows
            for n, m in model.named_modules()
            if hasattr(m, "rram_config")
        }
        assert set(sizes) == {"0", "3"} and all(s in (64, 128, 256) for s in sizes.values())
        model(torch.randn(4, 1, 8, 8))  # one calibration per layer writes lambda back
        lin = model[3]
        assert mem.long_term.best_lambda("epiram", lin.workload_type) is not None
        assert lin.long_term_memory is mem.long_term
    finally:
        mem.close()
    again = open_memory(cfg)
    try:
        from sedma_torch.rram.partition import plan_partition

        plan = plan_partition(_model(), cfg_rram, memory=again.long_term)
        assert plan.memory_hits == 2 and plan.tile_sizes == sizes
    finally:
        again.close()


def test_disabled_memory_converts_with_the_configured_tiles():
    mem = open_memory({"enabled": False, "partition": "fixed"})
    assert mem.long_term is None
    cfg_rram = st.RRAMConfig(
        material="ideal", dac_bits=None, adc_bits=None, tile_rows=32, tile_cols=32
    )
    model = mem.convert(_model(), cfg_rram, progress=False)
    assert model[3].rram_config.tile_rows == 32


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"partition": "magic"}, "memory.partition"),
        ({"stm_window": 0}, "stm_window"),
        ({"colour": 1}, "unknown key"),
    ],
)
def test_bad_memory_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        open_memory(bad)


def test_default_store_is_in_the_user_data_folder_and_env_overrides_it(tmp_path, monkeypatch):
    from sedma_torch.experiments.memory_setup import default_memory_path

    monkeypatch.delenv("SEDMA_MEMORY_URL", raising=False)
    monkeypatch.delenv("SEDMA_MEMORY_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "sedma_torch" / "sedma_memory.db"
    assert default_memory_path() == expected
    mem = open_memory({"enabled": True})
    try:
        assert mem.store == str(expected) and expected.is_file()
        assert mem.records_at_start == 0
        assert f"memory: SQLite file {expected}, 0 record(s) at start" in mem.describe()
        mem.long_term.put("note", "k", {"v": 1})
    finally:
        mem.close()
    assert not list(tmp_path.glob("*.db"))  # nothing in the working directory
    again = open_memory({"enabled": True})
    assert again.records_at_start == 1 and "1 record(s) at start" in again.describe()
    again.close()
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_memory_path() == tmp_path / "home" / ".local/share/sedma_torch/sedma_memory.db"
    monkeypatch.setenv("SEDMA_MEMORY_PATH", str(tmp_path / "p.db"))
    from_path = open_memory({"enabled": True})
    assert from_path.store == str(tmp_path / "p.db")
    from_path.close()
    monkeypatch.setenv("SEDMA_MEMORY_URL", f"sqlite:///{tmp_path / 'u.db'}")
    from_url = open_memory({"enabled": True})
    assert from_url.store == str(tmp_path / "u.db")
    from_url.close()
    none = open_memory({"enabled": False})
    assert none.store is None and none.describe().startswith("memory: none (memory=none)")
