"""AlignedClassifier: one forward per sample, gradients only where maps exist, composable penalties."""

import pytest
import pytorch_lightning as pl
import torch

from harmonia.data import DecoyDigitsDataModule, Sample
from harmonia.explain import Saliency
from harmonia.losses import Cosine, Harmonization, RightReasons
from harmonia.module import AlignedClassifier

SMALL = {"widths": [8, 8], "hidden": 16}
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


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
    module = AlignedClassifier(arch=arch, arch_args=SMALL).eval()
    penalty = module.penalties[0]
    image, _, has_map, label = _batch(8, mapped=[1, 4, 5])
    logits, gradients, mapped = module.forward_with_gradients(image, label, has_map, [penalty], create_graph=False)
    with torch.no_grad():
        torch.testing.assert_close(logits, module.model(image), atol=1e-6, rtol=1e-6)
    assert mapped.tolist() == [1, 4, 5]
    full = penalty.saliency.attribute(module.model, image, label)
    torch.testing.assert_close(penalty.saliency.reduce(gradients[penalty.gradient_key]), full[mapped], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score,reduction", [("logit", "mean"), ("log_prob", "mean_abs")])
def test_the_penalty_trains_exactly_its_saliency_attribute(score: str, reduction: str) -> None:
    """The map a monitor gets from ``penalty.saliency.attribute`` is the map the loss trains."""
    saliency = Saliency(score=score, reduction=reduction)
    module = AlignedClassifier(arch="cnn", arch_args=SMALL, penalties=[Harmonization(saliency=saliency)]).eval()
    image, _, has_map, label = _batch(6)
    _, gradients, _ = module.forward_with_gradients(image, label, has_map, list(module.penalties), create_graph=True)
    trained = saliency.reduce(gradients[module.penalties[0].gradient_key])
    torch.testing.assert_close(trained.detach(), saliency.attribute(module.model, image, label), atol=1e-6, rtol=1e-5)


def test_batch_without_maps_skips_the_input_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    module = AlignedClassifier(arch="cnn", penalties=[Harmonization(), RightReasons()])
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    image, _, has_map, label = _batch(8, mapped=[])
    logits, gradients, _ = module.forward_with_gradients(image, label, has_map, list(module.penalties), create_graph=True)
    assert gradients == {} and logits.shape == (8, 10) and not calls


def test_loss_is_objective_plus_weighted_penalty() -> None:
    torch.manual_seed(0)
    module = AlignedClassifier(arch="cnn", penalties=[Harmonization(weight=3.0)])
    batch = _batch(8, mapped=[0, 2])
    loss = module._step(batch, "train")
    penalty = module.penalties[0]
    logits, gradients, mapped = module.forward_with_gradients(batch.image, batch.label, batch.has_map, [penalty], True)
    objective = module.objective(logits, batch.label)
    harm = penalty(gradients[penalty.gradient_key], batch.human_map[mapped], 8)
    torch.testing.assert_close(loss, objective + 3.0 * harm)
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.ndim > 1)


def _parameter_gradient(module: AlignedClassifier, batch: Sample) -> torch.Tensor:
    module.zero_grad(set_to_none=True)
    module._step(batch, "train").backward()
    return torch.cat([p.grad.flatten() for p in module.model.parameters()])


def test_penalties_compose_in_one_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Harmonization + RRR in one step equals the sum of each alone, with a single forward."""
    torch.manual_seed(0)
    both = AlignedClassifier(arch="cnn", arch_args=SMALL, penalties=[Harmonization(weight=2.0), RightReasons(weight=0.5)])
    harm_only = AlignedClassifier(arch="cnn", arch_args=SMALL, penalties=[Harmonization(weight=2.0)])
    rrr_only = AlignedClassifier(arch="cnn", arch_args=SMALL, penalties=[RightReasons(weight=0.5)])
    plain = AlignedClassifier(arch="cnn", arch_args=SMALL, penalties=[])
    for other in (harm_only, rrr_only, plain):
        other.load_state_dict(both.state_dict())
    batch = _batch(8, mapped=[0, 3, 5, 6])
    forwards = []
    handle = both.model.register_forward_hook(lambda *_: forwards.append(1))
    loss = both._step(batch, "train")
    handle.remove()
    assert len(forwards) == 2  # one mapped and one unmapped sub-batch: every sample forwarded once
    expected = harm_only._step(batch, "train") + rrr_only._step(batch, "train") - plain._step(batch, "train")
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    grads = [_parameter_gradient(m, batch) for m in (both, harm_only, rrr_only, plain)]
    torch.testing.assert_close(grads[0], grads[1] + grads[2] - grads[3], atol=1e-5, rtol=1e-4)


def test_penalties_sharing_a_gradient_take_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    module = AlignedClassifier(arch="cnn", arch_args=SMALL, penalties=[Harmonization(), Harmonization(first_level=2)])
    assert module.penalty_names == ["harmonization", "harmonization_1"]
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    module._step(_batch(4), "train")
    assert len(calls) == 1


def test_bad_penalties_are_refused() -> None:
    with pytest.raises(TypeError, match=r"penalties\[0\]"):
        AlignedClassifier(arch="cnn", penalties=[torch.nn.MSELoss()])
    with pytest.raises(ValueError, match="weight must be >= 0"):
        RightReasons(weight=-1.0)
    with pytest.raises(ValueError, match="lr_scheduler_interval"):
        AlignedClassifier(arch="cnn", lr_scheduler_interval="batch")


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_standalone_validate_under_inference_mode_measures_harmonization() -> None:
    """A stand-alone validate runs under torch.inference_mode; input gradients must still work."""
    module = AlignedClassifier(arch="lipschitz_cnn", arch_args=SMALL, penalties=[Harmonization(weight=0.0)])
    data = DecoyDigitsDataModule(batch_size=32)
    result = _trainer(inference_mode=True, limit_val_batches=2).validate(module, datamodule=data, verbose=False)[0]
    assert result["val/harmonization"] > 0 and torch.isfinite(torch.tensor(result["val/harmonization"]))
    result = _trainer(inference_mode=True, limit_test_batches=2).test(module, datamodule=data, verbose=False)[0]
    assert result["test/harmonization"] > 0


@pytest.mark.parametrize("penalties", [[Harmonization()], [RightReasons()], [Harmonization(0.0), RightReasons(0.1)]])
def test_fp16_mixed_precision_is_refused_for_any_double_backward(penalties: list) -> None:
    # On CPU Lightning turns "16-mixed" into bf16 by itself, so present a GPU trainer's setting.
    from types import SimpleNamespace

    module = AlignedClassifier(arch="cnn", penalties=penalties)
    module._trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(ValueError, match="bf16-mixed"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(precision="bf16-mixed")
    module.on_fit_start()
    untrained = AlignedClassifier(arch="cnn", penalties=[Harmonization(0.0)])
    untrained._trainer = SimpleNamespace(precision="16-mixed")
    untrained.on_fit_start()  # nothing is differentiated twice


def test_fit_learns_and_logs_every_term() -> None:
    module = AlignedClassifier(arch="cnn", optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    data = DecoyDigitsDataModule(batch_size=64)
    trainer = _trainer(max_epochs=2, limit_val_batches=2)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for key in ("train/loss_epoch", "train/objective", "train/harmonization", "train/acc", "val/acc", "val/acc_macro",
                "val/harmonization"):
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


def test_weight_schedule_decays_by_cosine_to_its_end_scale() -> None:
    from types import SimpleNamespace

    module = AlignedClassifier(arch="cnn", arch_args=SMALL, penalties=[Harmonization(2.0, schedule=Cosine(0.2))])
    penalty = module.penalties[0]
    assert module.progress() == 0.0 and penalty.weight_at(module.progress()) == 2.0  # outside a fit
    weights = []
    for step in range(5):
        module._trainer = SimpleNamespace(estimated_stepping_batches=5, global_step=step)
        weights.append(penalty.weight_at(module.progress()))
    # cosine from 2.0 at the first step to 0.2·2.0 at the last, through the midpoint 1.2
    assert weights == pytest.approx([2.0, 2.0 - 1.6 * (1 - 0.5 ** 0.5) / 2, 1.2, 0.4 + 1.6 * (1 - 0.5 ** 0.5) / 2, 0.4])
    assert Harmonization(0.0, schedule=Cosine(5.0)).weight_at(1.0) == 0.0  # weight 0 stays off
    with pytest.raises(ValueError, match="end_scale"):
        Cosine(-1.0)


def test_input_size_mismatch_fails_before_the_first_step(tmp_path) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from data_files import records

    from harmonia.data import ClickMeDataModule

    path, _ = records(tmp_path / "r.tfrecords", count=4, size=64)
    module = AlignedClassifier(arch="lipschitz_cnn", arch_args={**SMALL, "input_size": 32, "in_channels": 3})
    steps = []
    module.on_train_batch_start = lambda *args: steps.append(1)
    data = ClickMeDataModule(train=str(path), num_classes=10, image_size=48, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"data.image_size.*48.*input_size.*32") as raised:
        _trainer(max_epochs=1, limit_val_batches=0).fit(module, datamodule=data)
    assert steps == [] and isinstance(raised.value.__cause__, RuntimeError)


def test_the_dry_forward_keeps_the_mode_and_passes_matching_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    module = AlignedClassifier(arch="cnn", arch_args=SMALL)
    forwards = []
    original = module.model.forward
    monkeypatch.setattr(module.model, "forward", lambda x: forwards.append((x.shape, module.training)) or original(x))
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=DecoyDigitsDataModule(batch_size=8))
    assert forwards[0] == (torch.Size([1, 1, 32, 32]), False)  # the dry forward: one sample, eval mode
    assert forwards[1][1] is True  # the training step runs in training mode again
    module = AlignedClassifier(arch="cnn", arch_args=SMALL)  # no datamodule: nothing to probe, no error
    batch = _batch(8)
    loader = torch.utils.data.DataLoader(list(zip(*batch)), batch_size=4,
                                         collate_fn=lambda rows: Sample(*map(torch.stack, zip(*rows))))
    _trainer(max_steps=1).fit(module, train_dataloaders=loader)
