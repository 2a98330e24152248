"""torchvision/timm backbones in the registry: names, normalization, local weights only, clear errors."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from harmonia.models import build_model, list_models, read_state_dict
from harmonia.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, HardsigmoidTwice


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt or hub download fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a network access was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _equal_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        if not key.startswith(skip):
            torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0, msg=key)


def test_registry_lists_torchvision_names_and_the_timm_family(capsys: pytest.CaptureFixture) -> None:
    names = list_models()
    assert {"resnet18", "resnet50", "vit_b_16", "convnext_tiny", "efficientnet_b0", "timm/<name>"} <= set(names)
    assert "timm/test_resnet" in list_models("timm/test_*") and "resnet50" in list_models("resnet*")
    from harmonia import train

    sys_argv = sys.argv
    try:
        sys.argv = ["harmonia", "models", "timm/test_vi*"]
        train.main()
    finally:
        sys.argv = sys_argv
    assert "timm/test_vit " in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_model("timm/no_such_net")


def test_backbone_normalizes_inside_and_carries_registry_attributes() -> None:
    model = build_model("resnet18", num_classes=5)
    assert isinstance(model, Backbone) and model.input_shape == (3, 224, 224) and model.certificate is None
    assert model.head_names == ("net.fc",) and model.net.fc.out_features == 5
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model.eval()
    torch.testing.assert_close(model(x), model.net((x - mean) / std))
    with pytest.raises(ValueError, match=r"expected images \(N, 3, H, W\)"):
        model(torch.rand(2, 1, 32, 32))
    timm_model = build_model("timm/test_resnet", num_classes=3)
    assert timm_model.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # the weights' own pretrained_cfg
    assert timm_model.input_shape == (3, 160, 160) and timm_model.head_names == ("net.fc",)
    custom = build_model("resnet18", num_classes=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert custom.std.flatten().tolist() == [0.25] * 3


def test_torchvision_file_loads_and_a_head_of_another_size_is_dropped(tmp_path: Path, no_network: None) -> None:
    source = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    same = build_model("resnet18", num_classes=10, weights=str(path))
    _equal_weights(source, same.net)
    with pytest.warns(UserWarning, match=r"head weights of another size dropped \(fc.weight \(10, 512\) -> \(7, 512\)"):
        other = build_model("resnet18", num_classes=7, weights=str(path))
    _equal_weights(source, other.net, skip=("fc.",))
    assert other.net.fc.weight.shape == (7, 512)


def test_timm_checkpoint_formats(tmp_path: Path, no_network: None) -> None:
    from safetensors.torch import save_file

    source = build_model("timm/test_resnet", num_classes=4).net
    state = source.state_dict()
    files = {
        "train.pth.tar": {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},  # DDP-wrapped
        "ema.pth": {"state_dict": {k: torch.zeros_like(v) for k, v in state.items()}, "state_dict_ema": state},
        "model.pth": {"model": state},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    for name in [*files, "model.safetensors"]:
        loaded = build_model("timm/test_resnet", num_classes=4, weights=str(tmp_path / name))
        _equal_weights(source, loaded.net)


def test_harmonia_checkpoint_keeps_its_normalization(tmp_path: Path) -> None:
    trained = build_model("timm/test_resnet", num_classes=4, mean=(0.4, 0.4, 0.4))
    path = tmp_path / "harmonia.ckpt"
    # The layout of an AlignedClassifier checkpoint (the CLI round trip is in test_finetune.py).
    torch.save({"pytorch-lightning_version": "2.6.6",
                "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, path)
    assert read_state_dict(path)[1] == "Harmonia/Lightning checkpoint"
    loaded = build_model("timm/test_resnet", num_classes=4, mean=(0.4, 0.4, 0.4), weights=str(path))
    _equal_weights(trained, loaded)
    with pytest.raises(ValueError, match=r"trained with input mean \(0.4, 0.4, 0.4\).*set mean"):
        build_model("timm/test_resnet", num_classes=4, weights=str(path))


def test_mismatching_files_raise_with_the_keys(tmp_path: Path) -> None:
    resnet18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet18)
    with pytest.raises(ValueError, match=r"(?s)does not match torchvision resnet34.*missing keys.*layer1\.2\.conv1\.weight"):
        build_model("resnet34", weights=str(resnet18))
    with pytest.raises(ValueError, match=r"(?s)does not match timm test_resnet.*unexpected keys.*layer1\.0\.conv1\.weight"):
        build_model("timm/test_resnet", weights=str(resnet18))
    wrapped = tmp_path / "wrapped.pth"
    torch.save({f"backbone.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}, wrapped)
    with pytest.raises(ValueError, match="every key in the file starts with 'backbone.'"):
        build_model("resnet18", weights=str(wrapped))
    grey = tmp_path / "grey.pth"
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = state["conv1.weight"][:, :1]
    torch.save(state, grey)
    with pytest.raises(ValueError, match=r"shape mismatches.*conv1.weight \(64, 1, 7, 7\) -> \(64, 3, 7, 7\)"):
        build_model("resnet18", weights=str(grey))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_model("resnet18", weights="IMAGENET1K_V1")


def test_mobilenet_v3_gets_a_twice_differentiable_hardsigmoid() -> None:
    """torch has no double backward for hardsigmoid; the swapped layer computes the same values."""
    model = build_model("mobilenet_v3_small", num_classes=3).eval()
    reference = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    reference.load_state_dict(model.net.state_dict())
    assert any(isinstance(m, HardsigmoidTwice) for m in model.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference((x - model.mean) / model.std))
    # The double backward through a squeeze-excitation block (the whole net's depthwise
    # convolutions have a very slow double backward on CPU).
    se = model.net.features[1].block[1].train()
    h = torch.rand(2, se.fc1.in_channels, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(se(h).sum(), h, create_graph=True)
    grad.square().sum().backward()  # raised "derivative for aten::hardsigmoid_backward" before
    assert se.fc1.weight.grad.abs().sum() > 0
