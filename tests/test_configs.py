"""The shipped digits configs differ only where their header says (the decoy benchmark's fairness)."""

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _load(name: str) -> dict:
    config = yaml.safe_load((CONFIGS / name).read_text())
    for key in ("logger", "callbacks"):  # run names and output folders differ by design
        config["trainer"].pop(key)
    return config


def _harmonization(config: dict) -> dict:
    (penalty,) = [p for p in config["model"]["penalties"] if p["class_path"].endswith("Harmonization")]
    return penalty["init_args"]


def _set_weight(weight: float):
    def edit(config: dict) -> None:
        _harmonization(config)["weight"] = weight
    return edit


def _add_rrr(weight: float, first_level: int | None = None):
    def edit(config: dict) -> None:
        if first_level is not None:
            _harmonization(config)["first_level"] = first_level
        config["model"]["penalties"].append({"class_path": "harmonia.losses.RightReasons", "init_args": {"weight": weight}})
    return edit


def _both(*edits):
    def edit(config: dict) -> None:
        for e in edits:
            e(config)
    return edit


@pytest.mark.parametrize(
    ("config", "reference", "edit"),
    [
        ("digits_baseline.yaml", "digits.yaml", _set_weight(0.0)),
        ("digits_cnn_baseline.yaml", "digits_cnn_harmonized.yaml", _set_weight(0.0)),
        ("digits_cnn_harmonized_rrr.yaml", "digits_cnn_harmonized.yaml", _add_rrr(0.01)),
        ("digits_rrr.yaml", "digits.yaml", _add_rrr(0.3, first_level=2)),
        ("digits_cnn_rrr.yaml", "digits_cnn_harmonized.yaml", _both(_set_weight(0.0), _add_rrr(0.01))),
    ],
)
def test_paired_configs_differ_only_in_the_penalties(config: str, reference: str, edit) -> None:
    ours, theirs = _load(config), _load(reference)
    assert ours != theirs
    edit(theirs)
    assert ours == theirs


def test_every_digits_config_shares_the_budget() -> None:
    configs = {p.name: _load(p.name) for p in sorted(CONFIGS.glob("digits*.yaml"))}
    budgets = {
        name: (c["trainer"]["max_epochs"], c["model"]["optimizer"], c["model"].get("lr_scheduler"), c["data"])
        for name, c in configs.items()
    }
    assert len({repr(b) for b in budgets.values()}) == 1, budgets
    for name, config in configs.items():
        # the cosine schedule must reach its end exactly at the last epoch
        assert config["model"]["lr_scheduler"]["init_args"]["T_max"] == config["trainer"]["max_epochs"], name


# ----------------------------------------------------------------------------- every config × every logger
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))
LOGGER_ARGS = {
    "wandb": ["--trainer.logger", "WandbLogger", "--trainer.logger.offline", "true"],
    "tensorboard": ["--trainer.logger", "TensorBoardLogger"],
    "csv": ["--trainer.logger", "CSVLogger"],
    "none": ["--trainer.logger", "false"],
}
# The fast suite: each logger once on a config without monitors (seconds), and the ResNet-50
# config without a logger (its LearningRateMonitor once crashed there). The other combinations
# (configs with monitors take a minute on 2 busy cores) are marked slow.
FAST = {("digits_cnn_harmonized.yaml", "csv"), ("digits_cnn_rrr.yaml", "wandb"),
        ("digits_cnn_harmonized_rrr.yaml", "tensorboard"), ("clickme_resnet50.yaml", "none")}


def _one_step_args(name: str, tmp: Path) -> list[str]:
    """Overrides that make a shipped config run one training step on CPU, on tiny data."""
    args = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.limit_test_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if name.startswith("clickme"):
        from harmonia.data.synthetic import write_synthetic_clickme

        records = write_synthetic_clickme(tmp / "clickme.tfrecords", count=4, size=64)
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.num_nodes", "1", "--trainer.precision", "32-true",
                 "--data.init_args.train", str(records), "--data.init_args.val", str(records),
                 "--data.init_args.image_size", "64", "--data.init_args.batch_size", "2",
                 "--data.init_args.num_workers", "0", "--data.init_args.index_dir", str(tmp / "index")]
        if "finetune" in name:  # no local ImageNet weights in the test environment: random init
            args += ["--model.arch_args", '{"channels_last": true, "checkpointing": false}']
    return args


@pytest.mark.parametrize(
    ("name", "logger"),
    [pytest.param(n, lg, marks=() if (n, lg) in FAST else pytest.mark.slow, id=f"{n}-{lg}")
     for n in SHIPPED for lg in LOGGER_ARGS],
)
def test_every_shipped_config_runs_one_step_with_each_logger(name: str, logger: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse the shipped config, train one step, validate and test, with W&B, TensorBoard, CSV or no logger."""
    from harmonia.train import cli_main

    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(CONFIGS / name), *_one_step_args(name, tmp_path), *LOGGER_ARGS[logger]])
    assert cli.trainer.global_step == 1
    run = cli.run_dir
    assert run.resolve().parent == (tmp_path / "runs" / Path(name).stem).resolve()
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    if logger == "none":
        assert cli.trainer.logger is None
    elif logger == "wandb":  # the tests run W&B disabled (no files): check where it would write
        assert Path(cli.trainer.logger.save_dir) == run
    else:
        files = [p for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts and p.name != "config.yaml"]
        assert files, f"{logger} wrote nothing into the run directory {run}"
