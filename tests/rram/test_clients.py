"""The drop-in promise with the clients people train with: HF ``Trainer``, PyTorch Lightning,
and torch's fused / foreach optimizers.

After any of them has trained (or reloaded) a converted model, the model must compute what
its own digital weights compute: the reference is a deep copy swapped back with
``st.to_digital``, which reads only ``.weight`` / ``.bias`` and none of the RRAM layers'
programmed state. At ``material="ideal"`` without DAC/ADC the two agree to float rounding
(relative error < 1e-5); with a noisy material the outputs must at least be finite.
"""

from __future__ import annotations

import copy
import functools
import logging
import math

import pytest
import torch
from torch import nn

import sedma_torch as st

IDEAL = st.RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
NOISY = st.RRAMConfig(material="epiram", seed=0)
CONFIGS = {"ideal": IDEAL, "noisy": NOISY}
TOL = 1e-5

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*pin_memory.*"),
    pytest.mark.filterwarnings("ignore:.*have no `val_dataloader`.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


# ----- helpers ------------------------------------------------------------------------
def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def _n_rram(model: nn.Module) -> int:
    return sum(isinstance(m, st.RRAMLinear | st.RRAMConv2d) for m in model.modules())


def _digital_copy(model: nn.Module) -> nn.Module:
    """The model as its digital weights define it: a deep copy with every RRAM layer swapped
    back (to_digital uses only .weight / .bias, not the crossbar state)."""
    digital = st.to_digital(copy.deepcopy(model))
    assert _n_rram(digital) == 0
    return digital.eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _assert_trained(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The client really changed the weights of the RRAM layers (else the test proves nothing)."""
    after = dict(model.named_parameters())
    moved = [
        name
        for name, m in model.named_modules()
        if isinstance(m, st.RRAMLinear | st.RRAMConv2d)
        and not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])
    ]
    assert moved, "training did not change any RRAM layer's weight"


@pytest.fixture
def quiet_frameworks():
    """Keep transformers / Lightning from printing their banners and advice."""
    names = ["transformers", "pytorch_lightning", "lightning_fabric", "lightning", "accelerate"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
    except ImportError:
        transformers, verbosity = None, None
    yield
    if transformers is not None:
        transformers.logging.set_verbosity(verbosity)
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


# ----- HuggingFace Trainer --------------------------------------------------------------
SEQ, VOCAB = 16, 100


def _tiny_bert(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def _bert_dataset(n: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": labels[i],
        }
        for i in range(n)
    ]


def _bert_logits(model: nn.Module, seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=gen)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _hf_train(model: nn.Module, tmp_path, **kw):
    """Two steps of Trainer with its default optimizer (``optim`` deliberately not set)."""
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=0,
        **kw,
    )
    data = _bert_dataset()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    return trainer


def _assert_default_optimizer_is_fused_adamw(trainer) -> None:
    """Documents which optimizer ran: transformers >= 5 on torch >= 2.8 defaults to
    ``adamw_torch_fused``, i.e. ``torch.optim.AdamW(fused=True)`` (inside accelerate's
    ``AcceleratedOptimizer`` wrapper)."""
    assert str(trainer.args.optim) in {"adamw_torch_fused", "OptimizerNames.ADAMW_TORCH_FUSED"}
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults.get("fused") is True


def test_hf_trainer_default_fused_adamw_keeps_crossbar_in_sync(tmp_path, quiet_frameworks):
    model = st.convert_(_tiny_bert(), IDEAL, progress=False)
    assert _n_rram(model) > 0
    before = _snapshot(model)
    trainer = _hf_train(model, tmp_path)
    _assert_default_optimizer_is_fused_adamw(trainer)
    _assert_trained(model, before)
    rel = _rel(_bert_logits(model), _bert_logits(_digital_copy(model)))
    assert rel < TOL, (
        f"converted BERT after Trainer (fused AdamW) differs from its weights: {rel:.3g}"
    )


def test_hf_trainer_noisy_material_trains_and_evaluates(tmp_path, quiet_frameworks):
    model = st.convert_(_tiny_bert(), NOISY, progress=False)
    trainer = _hf_train(model, tmp_path)
    _assert_default_optimizer_is_fused_adamw(trainer)
    assert torch.isfinite(_bert_logits(model)).all()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_hf_trainer_save_model_reloads_into_fresh_converted_model(tmp_path, quiet_frameworks):
    from safetensors.torch import load_file

    model = st.convert_(_tiny_bert(), IDEAL, progress=False)
    trainer = _hf_train(model, tmp_path)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    state = load_file(str(out / "model.safetensors"))
    fresh = st.convert_(_tiny_bert(seed=1), IDEAL, progress=False)  # other initial weights
    fresh.load_state_dict(state)
    for k, v in model.state_dict().items():  # the weights themselves came back
        if k.endswith((".weight", ".bias")):
            assert torch.equal(fresh.state_dict()[k], v), k
    y_fresh = _bert_logits(fresh)
    rel_dig = _rel(y_fresh, _bert_logits(_digital_copy(model)))
    assert rel_dig < TOL, f"reloaded model differs from the trained weights: {rel_dig:.3g}"
    rel_trained = _rel(y_fresh, _bert_logits(model))
    assert rel_trained < TOL, f"reloaded model differs from the trained model: {rel_trained:.3g}"


# ----- PyTorch Lightning ------------------------------------------------------------------
@functools.cache
def _cnn_module_cls():
    pl = pytest.importorskip("pytorch_lightning")

    class CNNModule(pl.LightningModule):
        """Conv2d-ReLU-Conv2d-flatten-Linear on 1x8x8 images, converted in ``__init__`` so that
        ``load_from_checkpoint`` rebuilds the converted model."""

        def __init__(self, material: str = "ideal", lr: float = 0.05, init_seed: int = 0):
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(init_seed)
            self.net = nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1),
                nn.Flatten(),
                nn.Linear(4 * 8 * 8, 3),
            )
            st.convert_(self.net, CONFIGS[material], progress=False)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("val_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    return CNNModule


def _image_loader(seed: int, n: int = 32):
    gen = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(
        torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    )
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _images(seed: int = 123) -> torch.Tensor:
    return torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _outputs(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(_images())


def _pl_fit(material: str, tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.callbacks import ModelCheckpoint

    module = _cnn_module_cls()(material=material)
    assert _n_rram(module) == 3
    before = _snapshot(module)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))],
    )
    trainer.fit(module, train_dataloaders=_image_loader(seed=0))
    _assert_trained(module, before)
    return trainer, module


@pytest.mark.parametrize("material", ["ideal", "noisy"])
def test_lightning_fit_then_validate(material, tmp_path, quiet_frameworks):
    # Lightning validates under torch.inference_mode(): the layers must cope with it
    trainer, module = _pl_fit(material, tmp_path)
    results = trainer.validate(module, dataloaders=_image_loader(seed=1), verbose=False)
    assert math.isfinite(results[0]["val_loss"])
    y = _outputs(module)
    assert torch.isfinite(y).all()
    if material == "ideal":
        rel = _rel(y, _outputs(_digital_copy(module)))
        assert rel < TOL, f"converted CNN after fit + validate differs from its weights: {rel:.3g}"


def test_lightning_checkpoint_reload_matches_digital(tmp_path, quiet_frameworks):
    trainer, module = _pl_fit("ideal", tmp_path)
    path = trainer.checkpoint_callback.best_model_path
    assert path, "ModelCheckpoint wrote no checkpoint"
    y_trained = _outputs(module)
    y_digital = _outputs(_digital_copy(module))
    reloaded = _cnn_module_cls().load_from_checkpoint(path, init_seed=1)  # other initial weights
    assert _n_rram(reloaded) == 3
    for k, v in module.named_parameters():
        assert torch.equal(dict(reloaded.named_parameters())[k], v), k
    y_reloaded = _outputs(reloaded)
    rel_dig = _rel(y_reloaded, y_digital)
    assert rel_dig < TOL, f"reloaded CNN differs from the trained weights: {rel_dig:.3g}"
    rel_trained = _rel(y_reloaded, y_trained)
    assert rel_trained < TOL, f"reloaded CNN differs from the trained model: {rel_trained:.3g}"


# ----- torch optimizers, no framework -----------------------------------------------------
def _mlp(config: st.RRAMConfig) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    return st.convert_(model, config, progress=False)


def _mlp_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _mlp_outputs(model: nn.Module, seed: int = 123) -> torch.Tensor:
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("mode", ["default", "foreach", "fused"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_optimizer_steps_reprogram_crossbar(opt_cls, mode):
    model = _mlp(IDEAL)
    kw = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[mode]
    if opt_cls is torch.optim.SGD:
        kw["momentum"] = 0.9
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    before = _snapshot(model)
    _mlp_steps(model, opt, steps=3)
    _assert_trained(model, before)
    rel = _rel(_mlp_outputs(model), _mlp_outputs(_digital_copy(model)))
    assert rel < TOL, f"{opt_cls.__name__}({mode}) left the crossbar stale: rel {rel:.3g}"


@pytest.mark.parametrize("material", ["ideal", "noisy"])
def test_inference_mode_forward_after_step_then_training(material):
    model = _mlp(CONFIGS[material])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _mlp_steps(model, opt, steps=1)  # weights changed: the next forward must re-program
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(123))
    model.eval()
    with torch.inference_mode():
        y = model(x)
    assert torch.isfinite(y).all()
    if material == "ideal":
        rel = _rel(y, _mlp_outputs(_digital_copy(model)))
        assert rel < TOL, f"inference-mode forward differs from the weights: {rel:.3g}"
    # and ordinary training goes on afterwards
    model.train()
    opt.zero_grad()
    model(torch.randn(8, 16)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    y2 = _mlp_outputs(model)
    assert torch.isfinite(y2).all()
    if material == "ideal":
        rel = _rel(y2, _mlp_outputs(_digital_copy(model)))
        assert rel < TOL, f"training after an inference-mode forward went stale: {rel:.3g}"


def test_load_digital_state_dict_into_converted_model_reprograms():
    # the usual "convert, then load pretrained digital weights" order; the digital state dict
    # has no crossbar keys, so strict=False
    digital = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    torch.manual_seed(7)
    for p in digital.parameters():
        nn.init.normal_(p, std=0.3)
    model = _mlp(IDEAL)  # programmed with other weights
    result = model.load_state_dict(digital.state_dict(), strict=False)
    assert not result.unexpected_keys
    rel = _rel(_mlp_outputs(model), _mlp_outputs(digital))
    assert rel < TOL, f"converted model after load_state_dict of digital weights: {rel:.3g}"
