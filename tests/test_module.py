"""AlignedClassifier: one forward per sample, saliency only where maps exist, eval-mode grads."""

import pytest
import pytorch_lightning as pl
import torch

from harmonia.data import DecoyDigitsDataModule, Sample
from harmonia.explain import harmonization_saliency
from harmonia.module import AlignedClassifier


def _batch(n: int = 8, mapped: list[int] | None = None) -> Sample:
    g = torch.Generator().manual_seed(0)
    has_map = torch.zeros(n, dtype=torch.bool)
    has_map[mapped if mapped is not None else list(range(n))] = True
    return Sample(
        torch.rand(n, 1, 32, 32, generator=g),
        torch.rand(n, 1, 32, 32, generator=g),
        has_map,
        torch.randint(0, 10, (n,), generator=g),
    )


@pytest.mark.parametrize("arch", ["cnn", "lipschitz_cnn"])
def test_split_forward_matches_full_forward(arch: str) -> None:
    module = AlignedClassifier(arch=arch, arch_args={"widths": [8, 8], "hidden": 16}).eval()
    image, _, has_map, label = _batch(8, mapped=[1, 4, 5])
    logits, saliency, mapped = module.forward_with_saliency(image, label, has_map, create_graph=False)
    with torch.no_grad():
        torch.testing.assert_close(logits, module.model(image), atol=1e-6, rtol=1e-6)
    assert mapped.tolist() == [1, 4, 5]
    _, full = harmonization_saliency(module.model, image, label, create_graph=False)
    torch.testing.assert_close(saliency, full[mapped], atol=1e-6, rtol=1e-5)


def test_batch_without_maps_skips_the_input_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    module = AlignedClassifier(arch="cnn")
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    image, _, has_map, label = _batch(8, mapped=[])
    logits, saliency, _ = module.forward_with_saliency(image, label, has_map, create_graph=True)
    assert saliency is None and logits.shape == (8, 10) and not calls


def test_loss_is_objective_plus_lambda_harmonization() -> None:
    torch.manual_seed(0)
    module = AlignedClassifier(arch="cnn", lambda_harmonization=3.0)
    batch = _batch(8, mapped=[0, 2])
    loss = module._step(batch, "train")
    logits, saliency, mapped = module.forward_with_saliency(batch.image, batch.label, batch.has_map, True)
    objective = module.objective(logits, batch.label)
    harm = module.harmonization(saliency, batch.human_map[mapped], 8)
    torch.testing.assert_close(loss, objective + 3.0 * harm)
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.ndim > 1)


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_standalone_validate_under_inference_mode_measures_harmonization() -> None:
    """SPEC §10: a stand-alone validate runs under torch.inference_mode; grads must still work."""
    module = AlignedClassifier(arch="lipschitz_cnn", arch_args={"widths": [8, 8], "hidden": 16})
    data = DecoyDigitsDataModule(batch_size=32)
    result = _trainer(inference_mode=True, limit_val_batches=2).validate(module, datamodule=data, verbose=False)[0]
    assert result["val/harmonization"] > 0 and torch.isfinite(torch.tensor(result["val/harmonization"]))
    result = _trainer(inference_mode=True, limit_test_batches=2).test(module, datamodule=data, verbose=False)[0]
    assert result["test/harmonization"] > 0


def test_fp16_mixed_precision_is_refused() -> None:
    # On CPU Lightning turns "16-mixed" into bf16 by itself, so present a GPU trainer's setting.
    from types import SimpleNamespace

    module = AlignedClassifier(arch="cnn")
    module._trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(ValueError, match="bf16-mixed"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(precision="bf16-mixed")
    module.on_fit_start()


def test_fit_learns_and_logs_every_term() -> None:
    module = AlignedClassifier(arch="cnn", optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    data = DecoyDigitsDataModule(batch_size=64)
    trainer = _trainer(max_epochs=2, limit_val_batches=2)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for key in ("train/loss_epoch", "train/objective", "train/harmonization", "train/acc", "val/acc", "val/harmonization"):
        assert key in metrics, key
    assert metrics["train/acc"] > 0.5  # the decoyed training set is easy


def test_optimizer_and_scheduler_factories() -> None:
    module = AlignedClassifier(
        arch="cnn",
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-5),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[30, 60, 80], gamma=0.1),
    )
    config = module.configure_optimizers()
    opt = config["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and config["lr_scheduler"]["interval"] == "epoch"
    assert opt.param_groups[0]["weight_decay"] == 1e-5
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(module.model.parameters()))


def test_lambda_schedule_decays_by_cosine_to_its_end_scale() -> None:
    from types import SimpleNamespace

    module = AlignedClassifier(arch="cnn", arch_args={"widths": [8, 8], "hidden": 16},
                               lambda_harmonization=2.0, lambda_end_scale=0.2)
    assert module.current_lambda() == 2.0  # outside a fit: the configured λ
    lambdas = []
    for step in range(5):
        module._trainer = SimpleNamespace(estimated_stepping_batches=5, global_step=step)
        lambdas.append(module.current_lambda())
    # cosine from 2.0 at the first step to 0.2·2.0 at the last, through the midpoint 1.2
    assert lambdas == pytest.approx([2.0, 2.0 - 1.6 * (1 - 0.5 ** 0.5) / 2, 1.2, 0.4 + 1.6 * (1 - 0.5 ** 0.5) / 2, 0.4])
    off = AlignedClassifier(arch="cnn", arch_args={"widths": [8, 8], "hidden": 16}, lambda_harmonization=0.0,
                            lambda_end_scale=5.0)
    off._trainer = SimpleNamespace(estimated_stepping_batches=5, global_step=4)
    assert off.current_lambda() == 0.0  # λ = 0 (baselines) stays off whatever the scale
    with pytest.raises(ValueError, match="lambda_end_scale"):
        AlignedClassifier(arch="cnn", lambda_end_scale=-1.0)
