"""The `harmonia` command: fit/validate/test/print_config, loggers, DDP and resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import re
import os
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
    out = _run(["predict", "--config", str(config), *SMALL_MODEL, "--ckpt_path", "ckpt/best.ckpt",
                "--trainer.limit_predict_batches", "1", "--predict_output", "preds.csv"], tmp_path).stdout
    assert "predictions of 64 samples written to preds.csv" in out
    rows = list(csv.DictReader((tmp_path / "preds.csv").open()))
    assert len(rows) == 64 and {"sample", "label", "predicted", "prob_0", "prob_9"} <= set(rows[0])
    assert all(abs(sum(float(r[f"prob_{k}"]) for k in range(10)) - 1) < 1e-4 for r in rows)
    assert all(int(r["predicted"]) == max(range(10), key=lambda k: float(r[f"prob_{k}"])) for r in rows)
    assert [r["sample"] for r in rows] == [str(i) for i in range(64)] and all(r["label"] != "" for r in rows)
    # an existing output is not overwritten without --overwrite
    proc = _run(["predict", "--config", str(config), *SMALL_MODEL, "--ckpt_path", "ckpt/best.ckpt",
                 "--trainer.limit_predict_batches", "1", "--predict_output", "preds.csv"], tmp_path, check=False)
    assert proc.returncode == 2 and "\nerror: --predict_output preds.csv already exists" in proc.stderr


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
    assert list((tmp_path / "runs" / "c" / "latest" / "wandb").glob("offline-run-*"))


def test_ddp_two_processes_end_with_identical_weights(tmp_path: Path) -> None:
    """strategy=ddp on CPU (gloo), 2 processes, via the real CLI in a subprocess."""
    record = {"class_path": "helpers.RecordRun", "init_args": {"out_dir": str(tmp_path / "out")}}
    config = _config(tmp_path, [record], max_epochs=1, limit_train_batches=6, limit_val_batches=2, limit_test_batches=2,
                     strategy="ddp", devices=2, accelerator="cpu")
    _run(["fit", "--config", str(config), *SMALL_MODEL, "--test_after_fit", "false"], tmp_path)
    # both processes used rank zero's run directory (the second one did not make its own)
    assert len([p for p in (tmp_path / "runs" / "config").iterdir() if p.name != "latest"]) == 1
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


# ----------------------------------------------------------------------------- run directories
def _default_checkpoints() -> list[dict]:
    """configs/digits.yaml's two ModelCheckpoints: no dirpath, so they write into the run directory."""
    return [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
             "init_args": {"filename": "best", "monitor": "val/acc", "mode": "max", "save_last": True,
                           "enable_version_counter": False}}]


def _summary_value(out: str, row: str) -> str:
    match = re.search(rf"^{re.escape(row)}\s*: (.*)$", out, re.MULTILINE)
    assert match, f"no row {row!r} in the summary:\n{out}"
    return match.group(1)


def test_summary_reports_validate_and_test_of_the_same_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """The summary's numbers are those `validate`/`test` give for the tested checkpoint, with its epoch;
    `validate`/`test` write beside the run and never over its config.yaml."""
    from harmonia.train import cli_main

    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, _default_checkpoints(), max_epochs=2, limit_train_batches=3, limit_val_batches=2,
                     limit_test_batches=2)
    base = ["--config", str(config), *SMALL_MODEL]
    run = cli_main(["fit", *base]).run_dir
    summary = capsys.readouterr().out
    saved_config = (run / "config.yaml").read_bytes()
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert f"saved in epoch {best['epoch'] + 1} of 2, step {best['global_step']})" in _summary_value(summary, "checkpoint evaluated")
    validate = cli_main(["validate", *base, "--ckpt_path", "best"])
    test = cli_main(["test", *base, "--ckpt_path", "best"])
    for row, cli, key in (("validation accuracy", validate, "val/acc"), ("test accuracy (decoy-free)", test, "test/acc"),
                          ("val / test objective", None, None)):
        if cli is not None:
            assert _summary_value(summary, row).split()[0] == f"{100 * float(cli.trainer.callback_metrics[key]):.2f}%"
    val_obj, test_obj = (float(x) for x in _summary_value(summary, "val / test objective").split(" / "))
    assert val_obj == pytest.approx(float(validate.trainer.callback_metrics["val/objective"]), abs=1e-5)
    assert test_obj == pytest.approx(float(test.trainer.callback_metrics["test/objective"]), abs=1e-5)
    for cli, sub in ((validate, "validate"), (test, "test")):
        assert cli.run_dir.parent.resolve() == run.resolve() and cli.run_dir.name.startswith(f"{sub}-")
        assert (cli.run_dir / "config.yaml").is_file()
    assert (run / "config.yaml").read_bytes() == saved_config


def test_two_fits_keep_two_runs_and_last_resumes_the_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia.train import cli_main

    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, _default_checkpoints(), max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    base = ["--config", str(config), *SMALL_MODEL, "--test_after_fit", "false"]
    runs = tmp_path / "runs" / "config"
    first = cli_main(["fit", *base]).run_dir
    assert first.parent.resolve() == runs.resolve() and (runs / "latest").resolve() == first.resolve()
    files = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert {"config.yaml", "best.ckpt", "last.ckpt"} <= {p.name for p in files}

    second = cli_main(["fit", *base]).run_dir
    assert second.resolve() != first.resolve() and (runs / "latest").resolve() == second.resolve()
    assert all(p.read_bytes() == data for p, data in files.items()), "the second fit changed the first run's files"

    resumed = cli_main(["fit", *base, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert resumed.run_dir.resolve() == second.resolve() and resumed.trainer.global_step == 4
    assert sorted(p.name for p in runs.iterdir()) == sorted(["latest", first.name, second.name])
    assert list(second.glob("config.resumed-*.yaml")), "the resumed fit's configuration was not kept"
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    # the saved configuration reproduces the run in a new directory (no paths of the old run inside)
    again = cli_main(["fit", "--config", str(second / "config.yaml"), "--test_after_fit", "false"]).run_dir
    assert again.parent.name == "config" and again.resolve() not in (first.resolve(), second.resolve())


def test_explicit_paths_are_not_overwritten_without_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia.train import cli_main

    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, [_checkpoint("ckpt")], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "best.ckpt").write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), *SMALL_MODEL, "--test_after_fit", "false"])
    assert exit_info.value.code == 2
    assert (tmp_path / "ckpt" / "best.ckpt").read_bytes() == b"an earlier run's checkpoint"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), *SMALL_MODEL, "--run_dir", "mine", "--test_after_fit", "false"])
    cli = cli_main(["fit", "--config", str(config), *SMALL_MODEL, "--test_after_fit", "false", "--overwrite", "true"])
    assert cli.trainer.global_step == 1 and (tmp_path / "ckpt" / "best.ckpt").read_bytes() != b"an earlier run's checkpoint"


def test_unwritable_checkpoint_directory_fails_before_the_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia.checkpoint_io import CheckpointDirectoryError
    from harmonia.module import AlignedClassifier
    from harmonia.train import cli_main

    def no_step(*args, **kwargs):
        raise AssertionError("a step ran before the checkpoint directory was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AlignedClassifier, "training_step", no_step)
    monkeypatch.setattr(AlignedClassifier, "validation_step", no_step)
    (tmp_path / "a_file").write_text("a file where the checkpoint folder should be (root ignores chmod)")
    config = _config(tmp_path, [_checkpoint("a_file/checkpoints")], max_epochs=1)
    with pytest.raises(CheckpointDirectoryError, match="a_file/checkpoints"):
        cli_main(["fit", "--config", str(config), *SMALL_MODEL])


def test_limit_batches_integer_counts_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia.train import cli_main

    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, [], max_epochs=1)
    cli = cli_main(["fit", "--config", str(config), *SMALL_MODEL, "--trainer.limit_train_batches", "1",
                    "--trainer.limit_val_batches", "0.0", "--test_after_fit", "false"])
    assert cli.trainer.global_step == 1 and cli.trainer.limit_train_batches == 1


# ----------------------------------------------------------------------------- error messages
def _exit_code(fn, *args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        fn(*args)
    code = exit_info.value.code
    return code if isinstance(code, int) else 1  # SystemExit("message") exits with status 1


@pytest.mark.parametrize(("old", "new", "headline"), [
    ("every_n_epochs: 6\n", "every_n_epoch: 6\n",
     "error: trainer.callbacks: harmonia.callbacks.SaliencyMonitor: Option 'every_n_epoch' is not accepted"),
    ("{method: training}", "{method: trainng}", "error: unknown attribution method 'trainng'; registered: saliency,"),
])
def test_config_error_says_what_is_wrong_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, old: str,
                                               new: str, headline: str) -> None:
    from harmonia.train import cli_main

    monkeypatch.chdir(tmp_path)
    text = (ROOT / "configs" / "digits.yaml").read_text()
    assert old in text
    (tmp_path / "typo.yaml").write_text(text.replace(old, new, 1))
    assert _exit_code(cli_main, ["fit", "--config", str(tmp_path / "typo.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(headline), err[:2000]
    assert len(err) < 4000 and "Traceback" not in err
    runs = tmp_path / "runs" / "typo"
    assert not runs.exists() or not list(runs.iterdir()), "a run that never started left a directory"


def test_help_and_models_subcommand(capsys) -> None:
    from harmonia.train import cli_main, models_main

    assert _exit_code(cli_main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert "models [PATTERN]" in out and "convert SOURCE OUT" in out and "{fit,validate,test,predict}" in out
    assert _exit_code(models_main, ["--help"]) == 0
    assert "usage: harmonia models" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no registered model matches 'no_such_model\\*'"):
        models_main(["no_such_model*"])
    models_main(["lipschitz*"])
    assert capsys.readouterr().out.startswith("lipschitz_cnn")


def test_convert_into_an_existing_file_is_a_clear_error(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import data_files
    from harmonia.data.convert import main as convert_main

    source = data_files.folder(tmp_path / "source")
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit, match=f"output {re.escape(str(tmp_path / 'out'))} exists and is a file"):
        convert_main([str(source), str(tmp_path / "out")])
    convert_main([str(source), str(tmp_path / "shards")])
    with pytest.raises(SystemExit, match="already holds converted shards"):
        convert_main([str(source), str(tmp_path / "shards")])


def test_index_csv_with_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import data_files
    from harmonia.data.folder import FolderDataset

    root = data_files.folder(tmp_path / "data")
    index = root / "index.csv"
    index.write_bytes(b"\xef\xbb\xbf" + index.read_bytes())  # what Excel's "CSV UTF-8" writes
    assert len(FolderDataset(root)) == 6
