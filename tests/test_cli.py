"""The `harmonia` command: fit/validate/test/print_config, loggers, DDP and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
HARMONIA = [sys.executable, "-m", "harmonia.train"]
SMALL_MODEL = ["--model.arch_args", '{"widths": [8, 16], "hidden": 32}']


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "disabled"
    return env


def _run(args: list[str], cwd: Path, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(HARMONIA + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"harmonia {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _config(tmp: Path, callbacks: list[dict], **trainer) -> Path:
    """A copy of configs/digits.yaml with the given callbacks and trainer overrides."""
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    config["trainer"].update({"logger": False, "enable_progress_bar": False, **trainer})
    config["trainer"]["callbacks"] = callbacks
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _checkpoint(dirpath: str, every: int | None = None) -> dict:
    args = {"dirpath": dirpath, "save_last": True, "enable_version_counter": False}
    args.update({"every_n_train_steps": every, "save_top_k": 0} if every else {"filename": "best", "monitor": "val/acc", "mode": "max"})
    return {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": args}


def test_models_subcommand_lists_the_registry() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys; sys.argv=['harmonia','models']; from harmonia.train import main; main()"],
                         capture_output=True, text=True, env=_env(), check=True).stdout
    assert "lipschitz_cnn" in out and "cnn" in out


def test_print_config_of_every_shipped_config() -> None:
    from harmonia.train import cli_main

    for path in sorted((ROOT / "configs").glob("digits*.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", str(path), "--print_config"])
        assert exit_info.value.code == 0, path


def test_fit_validate_test_predict_smoke(tmp_path: Path) -> None:
    config = _config(tmp_path, [_checkpoint("ckpt")], max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2)
    out = _run(["fit", "--config", str(config), *SMALL_MODEL], tmp_path).stdout
    assert "Harmonia run summary" in out and "test accuracy (decoy-free)" in out
    assert (tmp_path / "ckpt" / "best.ckpt").exists() and (tmp_path / "ckpt" / "last.ckpt").exists()
    for sub in ("validate", "test"):
        _run([sub, "--config", str(config), *SMALL_MODEL, "--ckpt_path", "ckpt/best.ckpt"], tmp_path)
    _run(["predict", "--config", str(config), *SMALL_MODEL, "--ckpt_path", "ckpt/best.ckpt", "--trainer.limit_predict_batches", "1"], tmp_path)


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "CSVLogger", "WandbLogger"])
def test_logger_switch(tmp_path: Path, logger: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia.train import cli_main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(_config(tmp_path, [], max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)),
            *SMALL_MODEL, "--trainer.logger", logger, "--trainer.logger.save_dir", "logs"]
    if logger == "WandbLogger":
        args += ["--trainer.logger.offline", "true"]
    cli_main(args)
    files = [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]
    assert files, f"{logger} wrote nothing under logs/"


def test_wandb_default_is_offline_and_needs_no_account(tmp_path: Path) -> None:
    """The shipped default logger: W&B offline, run folder under runs/."""
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    assert config["trainer"]["logger"]["init_args"]["offline"] is True
    env = _env()
    env.pop("WANDB_MODE")
    env.pop("WANDB_API_KEY", None)
    env["WANDB_DIR"] = str(tmp_path)
    cfg = dict(config)
    cfg["trainer"].update({"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1, "enable_progress_bar": False, "callbacks": []})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(HARMONIA + ["fit", "--config", str(path), *SMALL_MODEL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "runs" / "digits" / "wandb").glob("offline-run-*"))


def test_ddp_two_processes_end_with_identical_weights(tmp_path: Path) -> None:
    """strategy=ddp on CPU (gloo), 2 processes, via the real CLI in a subprocess."""
    record = {"class_path": "helpers.RecordRun", "init_args": {"out_dir": str(tmp_path / "out")}}
    config = _config(tmp_path, [record], max_epochs=1, limit_train_batches=6, limit_val_batches=2, limit_test_batches=2,
                     strategy="ddp", devices=2, accelerator="cpu")
    _run(["fit", "--config", str(config), *SMALL_MODEL, "--test_after_fit", "false"], tmp_path)
    runs = [json.loads((tmp_path / "out" / f"run_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["global_step"] == 6 for r in runs)
    w0, w1 = (torch.load(tmp_path / "out" / f"weights_rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], atol=0, rtol=0, msg=key)
    # and training moved the weights (the check above is not trivially about init)
    fresh = __import__("harmonia.module", fromlist=["AlignedClassifier"]).AlignedClassifier(arch_args={"widths": [8, 16], "hidden": 32})
    assert any(not torch.equal(w0[k], v) for k, v in fresh.state_dict().items() if k in w0 and v.is_floating_point())


def test_resume_after_sigkill_finishes_with_the_same_step_count(tmp_path: Path) -> None:
    """A fit SIGKILLed mid-epoch resumes from last.ckpt with --ckpt_path last."""
    def config(name: str, extra: list[dict]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        record = {"class_path": "helpers.RecordRun", "init_args": {"out_dir": str(folder / "out")}}
        return _config(folder, [_checkpoint("ckpt", every=5), record, *extra], max_epochs=2, limit_val_batches=2)

    full = config("full", [])
    _run(["fit", "--config", str(full), *SMALL_MODEL, "--test_after_fit", "false"], full.parent)
    expected = json.loads((full.parent / "out" / "run_rank0.json").read_text())["global_step"]
    assert expected == 40  # 2 epochs × 20 batches of 64 (1,257 training images)

    crash = config("crash", [{"class_path": "helpers.KillAtStep", "init_args": {"step": 27}}])
    proc = _run(["fit", "--config", str(crash), *SMALL_MODEL, "--test_after_fit", "false"], crash.parent, check=False)
    assert proc.returncode == -9, "the run should have been killed"
    assert not (crash.parent / "out").exists()
    assert torch.load(crash.parent / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 25

    resume = yaml.safe_load(crash.read_text())
    resume["trainer"]["callbacks"] = resume["trainer"]["callbacks"][:2]  # no more killing
    crash.write_text(yaml.safe_dump(resume))
    _run(["fit", "--config", str(crash), *SMALL_MODEL, "--test_after_fit", "false", "--ckpt_path", "last"], crash.parent)
    resumed = json.loads((crash.parent / "out" / "run_rank0.json").read_text())
    assert resumed["global_step"] == expected
