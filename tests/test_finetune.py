"""Fine-tuning: memory options vs the fp32 gradient, lr groups, freeze schedules, the worked path."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import yaml

from harmonia.callbacks import FinetuningSchedule
from harmonia.data import DecoyDigitsDataModule, Sample
from harmonia.models import build_model, checkpoint_segments, find_blocks
from harmonia.models.checkpointing import chunk_batchnorms
from harmonia.losses import Harmonization
from harmonia.module import AlignedClassifier
from harmonia.optim import WarmupMultiStepLR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def _batch(n: int, size: int) -> Sample:
    g = torch.Generator().manual_seed(0)
    return Sample(torch.rand(n, 3, size, size, generator=g), torch.rand(n, 1, size, size, generator=g),
                  torch.ones(n, dtype=torch.bool), torch.randint(0, 10, (n,), generator=g))


def _gradient(module: AlignedClassifier, batch: Sample, bf16: bool = False, frozen_bn: bool = False) -> torch.Tensor:
    """Parameter gradient of the full training loss (objective + λ · harmonization), as float64."""
    module.train()
    if frozen_bn:
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks for every variant
    # What Lightning's precision="bf16-mixed" does around training_step.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = module._step(batch, "train")
    loss.backward()
    return torch.cat([p.grad.flatten().double() for p in module.parameters()])


def _twin(reference: AlignedClassifier, **arch_args: object) -> AlignedClassifier:
    """The same weights and settings as ``reference`` with other model options."""
    hp = reference.hparams
    module = AlignedClassifier(arch=hp.arch, arch_args={**(hp.arch_args or {}), **arch_args}, num_classes=hp.num_classes,
                               penalties=[Harmonization(reference.penalties[0].weight)])
    module.load_state_dict(reference.state_dict())
    return module


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- memory options: the harmonization gradient is unchanged -------------------------------------


def test_checkpointing_gives_the_same_harmonization_gradient_and_batchnorm_statistics() -> None:
    """A ResNet (BatchNorm in training mode; float64, |Δg| / |g| ≤ 1e-10) and a ViT with dropout (≤ 1e-5).

    A tiny timm ResNet with two residual blocks in its first two stages stands in for
    ResNet-18 (same blocks, ~100× fewer weights: the test stays fast on CPU).
    """
    assert find_blocks(build_model("resnet18").net) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    torch.manual_seed(0)
    resnet = AlignedClassifier(arch="timm/test_resnet", arch_args={"layers": [2, 2, 1, 1]}, num_classes=10,
                               penalties=[Harmonization(10.0)])
    checkpointed = _twin(resnet, checkpointing=True)
    assert find_blocks(checkpointed.model.net) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    # float64: the stem's BatchNorms run channel-chunked (other fp32 rounding, ~4e-5 relative),
    # so the exactness of the method is checked where rounding cannot hide an error.
    resnet.double(), checkpointed.double()
    batch = _batch(4, 32)
    batch = Sample(batch.image.double(), batch.human_map.double(), batch.has_map, batch.label)
    reference = _gradient(resnet, batch)
    assert _relative(_gradient(checkpointed, batch), reference) < 1e-10
    for key, value in resnet.state_dict().items():  # running statistics updated once, not per recomputation
        torch.testing.assert_close(checkpointed.state_dict()[key], value, atol=1e-12, rtol=1e-10, msg=key)
    # The test can fail: the harmonization term moves the gradient a lot at λ = 10.
    plain = _twin(resnet).double()
    plain.penalties[0].weight = 0.0
    assert _relative(_gradient(plain, batch), reference) > 0.5

    vit_args = {"input_size": 32, "drop_rate": 0.1, "proj_drop_rate": 0.1, "attn_drop_rate": 0.1}
    vit = AlignedClassifier(arch="timm/test_vit", arch_args=vit_args, num_classes=10, penalties=[Harmonization(10.0)])
    batch = _batch(4, 32)
    assert _relative(_gradient(_twin(vit, checkpointing=True), batch), _gradient(vit, batch)) < 1e-5


@pytest.mark.parametrize("momentum", [0.1, None])
def test_channel_chunked_batchnorm_matches_one_call_to_second_order(momentum: float | None) -> None:
    """A BatchNorm outside the segments runs per channel chunk: output, second-order gradients and
    running statistics equal one call's (float64, to rounding); the stem of a ResNet is chunked."""
    net = build_model("resnet18").net
    assert chunk_batchnorms(net, find_blocks(net)) == ["bn1"]  # the stem; block BatchNorms are in segments
    torch.manual_seed(0)
    one = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 3), torch.nn.BatchNorm2d(10, momentum=momentum),
                              torch.nn.ReLU(), torch.nn.Conv2d(10, 2, 3)).double()
    chunked = copy.deepcopy(one)
    assert chunk_batchnorms(chunked, []) == ["1"]
    x = torch.rand(4, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    results = []
    for model in (one, chunked):
        out = [model(x) for _ in range(2)][-1]  # two updates of the running statistics
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        results.append([out, *torch.autograd.grad(g.square().sum(), list(model.parameters())),
                        *model[1].buffers()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
    chunked.eval()  # eval: the layer's own forward, running statistics
    torch.testing.assert_close(chunked(x), one.eval()(x), atol=1e-10, rtol=1e-10)


def test_channels_last_gives_the_same_harmonization_gradient() -> None:
    """fp32 NHWC vs NCHW, |Δg| / |g| ≤ 1e-5 (frozen BatchNorm statistics, see the next test)."""
    torch.manual_seed(0)
    resnet = AlignedClassifier(arch="timm/test_resnet", num_classes=10, penalties=[Harmonization(10.0)])
    nhwc = _twin(resnet, channels_last=True)
    assert nhwc.model.net.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = _batch(4, 32)
    assert _relative(_gradient(nhwc, batch, frozen_bn=True), _gradient(resnet, batch, frozen_bn=True)) < 1e-5


def test_bf16_autocast_harmonization_gradient_is_close_to_fp32() -> None:
    """bf16-mixed vs fp32, the parameter gradient of the full loss (λ = 10).

    Stated tolerances (measured values in brackets, CPU bf16): a ViT: cosine ≥ 0.995 and
    |Δg| / |g| ≤ 0.1 [0.9991, 0.042]; a ResNet with frozen BatchNorm statistics: cosine ≥ 0.85
    and ≤ 0.55 [0.965, 0.26 with emulated bf16 on an AMD EPYC; 0.905, 0.43 with oneDNN's native
    bf16 kernels on an Intel Xeon with AMX: the rounding depends on the CPU's kernels]. bf16 costs the plain gradient 0.8% / 1.6% here; the
    harmonization term is more sensitive because standardize-cut thresholds the saliency
    map, so rounding flips pixels in or out. (With BatchNorm in training mode at tiny batches,
    even the plain bf16 gradient errs by ~40% against float64: the batch-statistics backward
    cancels heavily.) A broken inner gradient, e.g. fp16 underflow, gives cosine ≈ 0.
    Also: bf16 + checkpointing is as close to fp32 as bf16 alone, and all three options
    together stay within the bf16 tolerance.
    """
    cases = [("timm/test_resnet", {}, _batch(8, 64), 0.85, 0.55),
             ("timm/test_vit", {"input_size": 32}, _batch(4, 32), 0.995, 0.1)]
    for arch, args, batch, min_cosine, max_error in cases:
        torch.manual_seed(0)
        module = AlignedClassifier(arch=arch, arch_args=args, num_classes=10, penalties=[Harmonization(10.0)])
        exact = _gradient(module, batch, frozen_bn=True)
        bf16 = _gradient(_twin(module), batch, bf16=True, frozen_bn=True)
        cosine = float(torch.nn.functional.cosine_similarity(bf16, exact, dim=0))
        assert cosine >= min_cosine and _relative(bf16, exact) <= max_error, (arch, cosine, _relative(bf16, exact))
    vit = module  # the last case
    every = _gradient(_twin(vit, checkpointing=True, channels_last=True), batch, bf16=True)
    assert float(torch.nn.functional.cosine_similarity(every, exact, dim=0)) >= min_cosine
    assert _relative(every, exact) <= max_error
    # bf16 + checkpointing: as close to fp32 as bf16 alone. Not equal to bf16 alone: a segment
    # sums a weight's gradient contributions in fp32, the plain graph in bf16 (measured: 0.4%
    # apart, each 4.2% from fp32).
    checkpointed = _gradient(_twin(vit, checkpointing=True), batch, bf16=True)
    assert _relative(checkpointed, exact) <= 1.05 * _relative(bf16, exact)
    assert _relative(checkpointed, bf16) <= 0.25 * _relative(bf16, exact)


def test_checkpointing_names_and_errors() -> None:
    model = build_model("resnet18", num_classes=3, checkpointing=["layer1", "layer4.1"])
    assert type(model.net.layer1).forward is not model.net.layer1.forward  # segmented instance
    assert [k for k in model.state_dict() if "layer1.0.conv1" in k] == ["net.layer1.0.conv1.weight"]  # names unchanged
    with pytest.raises(ValueError, match="'layer9' is not a submodule"):
        checkpoint_segments(model.net, ["layer9"])
    with pytest.raises(ValueError, match="no repeated blocks found"):
        build_model("timm/test_resnet", checkpointing=True)  # one block per stage
    import copy
    import pickle

    clone = pickle.loads(pickle.dumps(model))  # ddp_spawn pickles the module
    assert clone.net.layer1.forward.block is clone.net.layer1
    assert copy.deepcopy(model).net.layer4[1].forward.block is not model.net.layer4[1]


# --- parameter groups and schedules -------------------------------------------------------------


def test_lr_scales_make_groups_that_keep_the_decay_rule() -> None:
    module = AlignedClassifier(arch="resnet18", num_classes=10, lr_scales={"backbone": 0.1, "net.layer4": 0.5},
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=1e-4))
    optimizer = module.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"backbone", "backbone/no_decay", "net.layer4", "net.layer4/no_decay", "default"}
    assert groups["backbone"]["lr"] == pytest.approx(0.02) and groups["net.layer4"]["lr"] == pytest.approx(0.1)
    assert groups["default"]["lr"] == pytest.approx(0.2)  # the head: no scale given
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 1e-4
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(module.parameters()))
    head = {id(p) for p in module.model.net.fc.parameters()}
    assert all(id(p) in head for p in groups["default"]["params"])
    bn = {id(p) for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert all(id(p) not in bn for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"])
    with pytest.raises(ValueError, match="'net.layer9' is not a part"):
        AlignedClassifier(arch="resnet18", lr_scales={"net.layer9": 0.1})


def test_warmup_multistep_schedule() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupMultiStepLR(optimizer, milestones=[4, 6], gamma=0.1, warmup_epochs=2, warmup_start_factor=0.1)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


class _Snapshots(pl.Callback):
    """Weights and requires_grad flags at the end of every training epoch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.trainable: list[set[str]] = []

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.weights.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.weights.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})
        self.trainable.append({n for n, p in module.model.named_parameters() if p.requires_grad})


def test_finetuning_schedule_freezes_then_unfreezes_parts() -> None:
    """{0: [head], 1: [net.layer4], 2: [all]}, BatchNorm frozen too (train_bn false), SGD with decay."""
    torch.manual_seed(0)
    module = AlignedClassifier(arch="timm/test_resnet", num_classes=10, penalties=[Harmonization(1.0)],
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3))
    snaps = _Snapshots()
    schedule = FinetuningSchedule({0: ["head"], 1: ["net.layer4"], 2: ["all"]}, train_bn=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[schedule, snaps])
    trainer.fit(module, datamodule=DecoyDigitsDataModule(batch_size=16, channels=3))

    def changed(epoch: int) -> set[str]:
        before, after = snaps.weights[epoch], snaps.weights[epoch + 1]
        return {k for k in before if not torch.equal(before[k], after[k])}

    def under(keys: set[str], prefix: str) -> set[str]:
        return {k for k in keys if k.startswith(prefix)}

    every = set(snaps.weights[0])
    assert changed(0) == under(every, "net.fc.")  # weights, no BN statistics either (train_bn false)
    assert changed(1) == under(every, "net.fc.") | under(every, "net.layer4.")
    assert under(changed(2), "net.conv1.") and under(changed(2), "net.layer1.")  # everything trains now
    assert snaps.trainable[0] == {"net.fc.weight", "net.fc.bias"}
    assert all(p.requires_grad for p in module.parameters())  # fully trainable after fit


def test_finetuning_schedule_is_a_function_of_the_epoch_and_refuses_bad_input() -> None:
    schedule = FinetuningSchedule({0: ["head"], 3: ["backbone"]})
    assert schedule.parts_at(2) == ["head"] and schedule.parts_at(5) == ["head", "backbone"]
    assert schedule.state_dict() == {}  # a resumed run recomputes the freeze from current_epoch
    with pytest.raises(ValueError, match="epoch 0"):
        FinetuningSchedule({1: ["all"]})
    module = AlignedClassifier(arch="resnet18", num_classes=3)
    with pytest.raises(ValueError, match="'net.nope' is not a part"):
        FinetuningSchedule({0: ["net.nope"]}).freeze_before_training(module)


def test_finetuning_schedule_refuses_ddp_without_find_unused_parameters(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = AlignedClassifier(arch="cnn", arch_args={"widths": [4], "hidden": 8})
        for find_unused, fails in ((False, True), (True, False)):
            trainer = SimpleNamespace(strategy=SimpleNamespace(model=DistributedDataParallel(module, find_unused_parameters=find_unused)))
            if fails:
                with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
                    FinetuningSchedule().on_fit_start(trainer, module)
            else:
                FinetuningSchedule().on_fit_start(trainer, module)
        FinetuningSchedule({0: ["all"]}).on_fit_start(  # nothing ever frozen: plain DDP is fine
            SimpleNamespace(strategy=SimpleNamespace(model=DistributedDataParallel(module))), module)
    finally:
        dist.destroy_process_group()


# --- the worked path: train, save, load as a pretrained backbone, fine-tune with harmonization -----


def test_worked_path_pretrain_save_load_and_finetune_with_the_shipped_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real CLI: a small ResNet trained without maps is saved, then loaded from its
    Lightning checkpoint by ``configs/clickme_resnet50_finetune.yaml`` (model, trainer,
    optimizer and schedule as shipped; data → decoy digits, resnet50 → a tiny timm ResNet with
    two blocks in its first stages, one CPU) and
    fine-tuned for one epoch with the harmonization loss, bf16-mixed, channels_last,
    checkpointing and a freeze schedule.
    """
    from harmonia.train import cli_main

    monkeypatch.chdir(tmp_path)
    small = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1,
             "enable_progress_bar": False, "accelerator": "cpu", "devices": 1}
    data = {"class_path": "harmonia.data.DecoyDigitsDataModule", "init_args": {"batch_size": 16, "channels": 3}}

    pretrain = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    pretrain["trainer"].update(small, logger=False, callbacks=[
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"dirpath": "pre", "save_last": True}}])
    tiny = {"arch": "timm/test_resnet", "arch_args": {"layers": [2, 2, 1, 1]}}
    pretrain["model"].update(tiny, penalties=[])
    pretrain["data"] = data
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    cli_main(["fit", "--config", "pretrain.yaml", "--test_after_fit", "false"])
    pretrained = {k[len("model."):]: v for k, v in torch.load("pre/last.ckpt")["state_dict"].items() if k.startswith("model.")}

    config = yaml.safe_load((ROOT / "configs" / "clickme_resnet50_finetune.yaml").read_text())
    config["trainer"].update(small, strategy="auto", num_nodes=1, logger={
        "class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "logs"}})
    config["trainer"]["callbacks"] += [
        {"class_path": "harmonia.callbacks.FinetuningSchedule", "init_args": {"unfreeze": {0: ["head", "net.layer4"], 1: ["all"]}}},
        {"class_path": "test_finetune._Snapshots"}]
    config["model"]["arch"] = tiny["arch"]
    config["model"]["arch_args"].update(tiny["arch_args"], weights="pre/last.ckpt", checkpointing=True)
    config["model"]["num_classes"] = 10
    config["data"] = data
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", "finetune.yaml"])

    snaps = next(c for c in cli.trainer.callbacks if isinstance(c, _Snapshots))
    for key, value in pretrained.items():  # started from the file's weights
        torch.testing.assert_close(snaps.weights[0][key], value, atol=0, rtol=0, msg=key)
    moved = {k for k in pretrained if not torch.equal(snaps.weights[1][k], pretrained[k])}
    assert "net.fc.weight" in moved and "net.layer4.0.conv2.weight" in moved
    assert not {"net.conv1.0.weight", "net.layer1.0.conv1.weight"} & moved  # frozen in epoch 0
    assert "net.layer1.0.bn1.weight" in moved  # train_bn (default true): BatchNorm of frozen parts trains
    trainer = cli.trainer
    assert str(trainer.precision) == "bf16-mixed"
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    assert type(trainer.lr_scheduler_configs[0].scheduler).__name__ == "WarmupMultiStepLR"
    assert cli.model.model.net.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (cli.run_dir / "checkpoints" / "best.ckpt").exists()  # the run directory the CLI made
    logged = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text()
    assert "train/harmonization" in logged and "test/acc" in logged


@pytest.mark.slow  # two processes, ~30 s on the 2-core machine
def test_ddp_finetuning_schedule_keeps_ranks_identical(tmp_path: Path) -> None:
    """2 processes (gloo), checkpointed ViT, head first then all: unfrozen parameters stay synchronized."""
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    config["trainer"].update(
        max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
        strategy="ddp_find_unused_parameters_true", devices=2, accelerator="cpu",
        callbacks=[{"class_path": "harmonia.callbacks.FinetuningSchedule", "init_args": {"unfreeze": {0: ["head"], 1: ["all"]}}},
                   {"class_path": "helpers.RecordRun", "init_args": {"out_dir": str(tmp_path / "out")}}])
    config["model"].update(arch="timm/test_vit", arch_args={"input_size": 32, "checkpointing": True})
    config["data"] = {"class_path": "harmonia.data.DecoyDigitsDataModule", "init_args": {"batch_size": 16, "channels": 3}}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "harmonia.train", "fit", "--config", str(path), "--test_after_fit", "false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [json.loads((tmp_path / "out" / f"run_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["global_step"] == 6 for r in runs)
    w0, w1 = (torch.load(tmp_path / "out" / f"weights_rank{r}.pt") for r in (0, 1))
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], atol=0, rtol=0, msg=key)
    torch.manual_seed(0)  # seed_everything: 0 in the config: the initial weights
    fresh = AlignedClassifier(arch="timm/test_vit", arch_args={"input_size": 32}).state_dict()
    assert not torch.equal(w0["model.net.blocks.0.attn.qkv.weight"], fresh["model.net.blocks.0.attn.qkv.weight"])
