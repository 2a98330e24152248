"""``harmonia atlas``: arguments, defaults from the run, image selection, cache, compare/timeline, curves, DDP.

The analysis and the renderer are replaced by the stand-ins of ``tests/atlas_fakes.py`` (schema-valid
documents from a real forward/backward of the model), so these tests check the command itself; the
last test runs the real modules end to end when they are present.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import atlas_fakes
from harmonia.atlas import command
from harmonia.atlas.command import AtlasError, add_similar_concepts, build_atlas, cache_key, read_curves, select_images
from harmonia.atlas.schema import validate
from harmonia.data import DecoyDigitsDataModule
from harmonia.data.sample import Sample
from harmonia.module import AlignedClassifier

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = {"in_channels": 1, "input_size": 32, "widths": [8, 16], "depth": 2, "hidden": 32, "pool": "l2",
             "head": "frobenius"}


@pytest.fixture()
def fakes(monkeypatch: pytest.MonkeyPatch) -> list:
    """The stand-in analysis and renderer, and the list of their calls."""
    monkeypatch.setitem(sys.modules, "harmonia.atlas.analysis", None)
    monkeypatch.setitem(sys.modules, "harmonia.atlas.render", None)
    atlas_fakes.install()
    atlas_fakes.CALLS.clear()
    return atlas_fakes.CALLS


def _save_checkpoint(path: Path, epoch: int = 0, step: int = 0, arch: str = "lipschitz_cnn", seed: int = 0,
                     arch_args: dict | None = None) -> Path:
    """A Lightning-format checkpoint of a fresh (untrained) AlignedClassifier."""
    torch.manual_seed(seed)
    module = AlignedClassifier(arch=arch, arch_args=dict(TINY_ARCH if arch_args is None else arch_args))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": epoch,
                "global_step": step, "pytorch-lightning_version": "2.6.6"}, path)
    return path


def _run_dir(tmp: Path, name: str = "run") -> Path:
    """``tmp/<name>``: config.yaml (configs/digits.yaml with a tiny model, no logger) and checkpoints/best.ckpt."""
    run = tmp / name
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    config["trainer"]["logger"] = False
    config["model"]["arch_args"] = TINY_ARCH
    config["ckpt_path"] = None  # as a run's own config.yaml has it (the fit subcommand's key)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    _save_checkpoint(run / "checkpoints" / "best.ckpt", epoch=3, step=30)
    return run


def _small(*args: str) -> list[str]:
    return [*args, "--classes", "0", "1", "2", "--images-per-class", "3", "--heldout_images", "64"]


def test_the_issue_spellings_and_underscores_parse_alike() -> None:
    dashed = command.parse_args(["--ckpt_path", "m.ckpt", "--images-per-class", "7", "--concepts", "4", "--no-maco",
                                 "--classes", "3", "5", "--trainer.devices", "2", "--trainer.accelerator=cpu"])
    underscored = command.parse_args(["--ckpt-path", "m.ckpt", "--images_per_class", "7", "--n_concepts", "4",
                                      "--maco", "false", "--classes", "3", "5", "--trainer.devices", "2",
                                      "--trainer.accelerator=cpu"])
    for parsed in (dashed, underscored):
        o = parsed.options
        assert (o.images_per_class, o.n_concepts, o.maco, o.classes, o.split) == (7, 4, False, [3, 5], "train")
        assert parsed.overrides == ["--trainer.devices", "2", "--trainer.accelerator=cpu"]
    assert command.parse_args(["--ckpt_path", "m", "--maco", "--layer", "-2"]).options.maco is True
    assert command.parse_args(["--ckpt_path", "m", "--layer", "-2"]).options.layer == -2
    assert command.parse_args(["--ckpt_path", "m", "--layer", "net.layer3"]).options.layer == "net.layer3"
    assert "where a dataset's shortcuts live" in " ".join(command.build_parser().format_help().split())


def test_argument_errors_are_one_line_and_name_the_culprit(tmp_path: Path, fakes: list, capsys) -> None:
    run = _run_dir(tmp_path)
    ckpt = str(run / "checkpoints" / "best.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        command.main([])
    assert exit_info.value.code == 2 and "--ckpt_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        command.main(["--ckpt_path", ckpt, "--frobnicate", "3"])
    assert "unrecognized argument '--frobnicate'" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        command.main(["--ckpt_path", str(tmp_path / "missing.ckpt")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip() == f"error: harmonia atlas: checkpoint {tmp_path / 'missing.ckpt'} does not exist"

    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(AtlasError, match=r"junk\.ckpt cannot be read"):
        build_atlas(["--ckpt_path", str(tmp_path / "junk.ckpt"), "--config", str(run / "config.yaml")])
    torch.save({"weights": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(AtlasError, match=r"plain\.ckpt holds no 'state_dict'"):
        build_atlas(["--ckpt_path", str(tmp_path / "plain.ckpt"), "--config", str(run / "config.yaml")])
    outside = _save_checkpoint(tmp_path / "elsewhere" / "m.ckpt")
    with pytest.raises(AtlasError, match=r"no --config given and checkpoint .*m\.ckpt is not in a run directory"):
        build_atlas(["--ckpt_path", str(outside)])
    other = _save_checkpoint(tmp_path / "cnn.ckpt", arch="cnn", arch_args={"in_channels": 1})
    with pytest.raises(AtlasError, match=r"cnn\.ckpt is a cnn model; the configuration builds lipschitz_cnn"):
        build_atlas(["--ckpt_path", str(other), "--config", str(run / "config.yaml"), "--out", str(tmp_path / "a1")])
    wider = _save_checkpoint(tmp_path / "wide.ckpt", arch_args={**TINY_ARCH, "widths": [16, 16]})
    with pytest.raises(AtlasError, match=r"wide\.ckpt does not fit the configured lipschitz_cnn"):
        build_atlas(["--ckpt_path", str(wider), "--config", str(run / "config.yaml"), "--out", str(tmp_path / "a2")])
    with pytest.raises(AtlasError, match=r"class 12 is not a class of .*best\.ckpt \(its classes are 0\.\.9\)"):
        build_atlas(["--ckpt_path", ckpt, "--classes", "3", "12", "--out", str(tmp_path / "a3")])
    assert not fakes  # nothing was analysed


def test_defaults_come_from_the_run_and_no_run_directory_is_made(tmp_path: Path, fakes: list,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = _run_dir(tmp_path)
    result = build_atlas(_small("--ckpt_path", str(run / "checkpoints" / "best.ckpt")))
    out = run / "atlas"
    assert result.out == out and (out / "index.html").is_file()
    assert not (tmp_path / "runs").exists()  # building the model from the config made no run directory
    index = json.loads((out / "data" / "atlas.json").read_text())
    validate(index, "atlas.json")
    # config.yaml of the run, the ConceptMonitor's layer/patch/concepts/baseline, the LipschitzMonitor's epsilons
    assert index["model"]["config"] == (run / "config.yaml").read_text()
    settings = index["settings"]
    assert (settings["layer"], settings["patch_size"], settings["n_concepts"], settings["baseline"]) == (9, 12, 6, 0.0)
    assert settings["epsilons"] == [0.05, 0.1, 0.25, 0.5] and settings["split"] == "train"
    assert settings["images_per_class"] == 3
    model = index["model"]
    assert (model["arch"], model["epoch"], model["global_step"], model["lipschitz"]) == ("lipschitz_cnn", 3, 30, True)
    assert model["label"] == "run/best" and model["arch_args"]["widths"] == [8, 16]
    assert model["parameters"] == sum(p.numel() for p in AlignedClassifier(arch_args=TINY_ARCH).model.parameters())
    assert "DecoyDigitsDataModule" in model["data"] and "train split: 9 images of 3 classes (9 with human maps)" in model["data"]
    metrics = index["metrics"]
    assert metrics["images"] == 9 and 0 <= metrics["heldout_accuracy"] <= 1
    assert metrics["certified"] == {"epsilons": [0.05, 0.1, 0.25, 0.5], "accuracy": [0.5] * 4}
    assert [c["id"] for c in index["classes"]] == [0, 1, 2] and index["classes"][0]["page"] == "class/0.html"
    assert index["flags"] == [{"class": 0, "concept": 0, "importance": 1 / 6, "off_map_share": 0.8}]
    # the background swap of each class gets the mapped images of the two other classes (3 each)
    assert [c for f, c in fakes if f == "donors"] == [6, 6, 6]
    assert index["background_flags"] == [{"class": 1, "drop": 0.5, "drop_interval": [0.4, 0.6], "accuracy": 1.0,
                                          "swapped_accuracy": 0.5, "concept": None, "concept_share": None}]
    assert [c["background_drop"] for c in index["classes"]] == [0.0, 0.5, 0.0]
    assert index["compare"] is None and index["timeline"] is None and index["curves"] is None
    for c in (0, 1, 2):
        validate(json.loads((out / "data" / "class" / f"{c}.json").read_text()), f"class {c}")
        assert (out / "img" / "class" / str(c) / "written.txt").is_file()
    # the command line wins over the config; an existing atlas is not overwritten without the flag
    with pytest.raises(AtlasError, match=r"already holds files \(data, img, index.html\); pass --overwrite"):
        build_atlas(_small("--ckpt_path", str(run / "checkpoints" / "best.ckpt")))
    result = build_atlas(_small("--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "--concepts", "2", "--no-maco",
                                "--layer", "5", "--overwrite"))
    assert (result.index["settings"]["n_concepts"], result.index["settings"]["maco"]) == (2, False)
    assert result.index["settings"]["layer"] == 5


def test_images_are_the_first_of_each_class_in_the_split_with_maps(fakes: list) -> None:
    data = DecoyDigitsDataModule(map_fraction=0.5)
    chosen = select_images(data, "train", [4, 1], 5)
    train = data.datasets["train"]
    for c in (4, 1):
        expected = [i for i in range(len(train)) if train.labels[i] == c and train.has_map[i]][:5]
        assert chosen[c].indices == expected
        torch.testing.assert_close(chosen[c].images, train.images[expected])
        torch.testing.assert_close(chosen[c].maps, train.maps[expected])
        assert chosen[c].labels.tolist() == [c] * 5
    val = select_images(data, "val", [0], 2)[0]
    assert val.indices == [i for i in range(len(data.datasets["val"])) if data.datasets["val"].labels[i] == 0][:2]
    assert chosen[4].digest() == select_images(data, "train", [4], 5)[4].digest() != val.digest()


class _NoThrees(torch.utils.data.Dataset):
    """A map-less (image, label) dataset without class 3."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple:
        return torch.full((1, 8, 8), float(i)), torch.tensor(i % 3)


class _PairsModule(DecoyDigitsDataModule):
    def setup(self, stage: str | None = None) -> None:
        self.datasets = {"train": _NoThrees()}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.datasets["train"], batch_size=4)

    def finish_batch(self, batch, train: bool = False) -> Sample:  # noqa: ANN001 - as the data modules
        assert train is False  # the atlas finishes batches as in evaluation
        image, label = batch
        return Sample(image * 2, None, None, label)


def test_image_selection_without_maps_and_an_empty_class() -> None:
    chosen = select_images(_PairsModule(), "train", [2], 3)[2]
    assert chosen.indices == [2, 5, 8] and chosen.maps is None
    assert chosen.images[:, 0, 0, 0].tolist() == [4.0, 10.0, 16.0]  # finished by the data module
    with pytest.raises(AtlasError, match=r"class 3 has no images in the train split of _PairsModule"):
        select_images(_PairsModule(), "train", [0, 3], 2)


def test_a_rerun_with_the_same_inputs_reuses_the_cache(tmp_path: Path, fakes: list) -> None:
    run = _run_dir(tmp_path)
    args = _small("--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "atlas"))
    first = build_atlas(args)
    assert (first.analysed, first.cached) == (3, 0) and [c for f, c in fakes if f == "analyze_class"] == [0, 1, 2]
    assert len(list((tmp_path / "atlas" / "cache").glob("*.pt"))) == 3
    documents = {c: json.loads((tmp_path / "atlas" / "data" / "class" / f"{c}.json").read_text()) for c in (0, 1, 2)}
    fakes.clear()
    second = build_atlas([*args, "--overwrite", "true"])
    assert (second.analysed, second.cached) == (0, 3)
    assert not [c for f, c in fakes if f == "analyze_class"]  # nothing analysed again
    for c in (0, 1, 2):
        assert json.loads((tmp_path / "atlas" / "data" / "class" / f"{c}.json").read_text()) == documents[c]
    # other settings, images or weights are other keys; so are other donor classes for the background swap
    fakes.clear()
    third = build_atlas([*args, "--overwrite", "--concepts", "2"])
    assert third.analysed == 3
    fourth = build_atlas([*args, "--overwrite", "--classes", "0", "1"])
    assert (fourth.analysed, fourth.cached) == (2, 0)
    settings = atlas_fakes.AtlasSettings()
    assert cache_key("a", settings, 1, "i") != cache_key("b", settings, 1, "i") != cache_key("a", settings, 2, "i")
    assert cache_key("a", settings, 1, "i") != cache_key("a", settings, 1, "j")
    assert cache_key("a", settings, 1, "i") == cache_key("a", atlas_fakes.AtlasSettings(), 1, "i")
    assert cache_key("a", settings, 1, "i", "penalty A") != cache_key("a", settings, 1, "i", "penalty B")
    assert cache_key("a", settings, 1, "i", names=["x", "y"]) != cache_key("a", settings, 1, "i", names=["x", "z"])
    plain = AlignedClassifier(arch_args=TINY_ARCH)
    assert command.hparams_digest(plain) == command.hparams_digest(AlignedClassifier(arch_args=TINY_ARCH))
    assert command.hparams_digest(plain) != command.hparams_digest(AlignedClassifier(arch_args=TINY_ARCH, penalties=[]))


def test_compare_and_timeline_are_wired_into_the_documents(tmp_path: Path, fakes: list) -> None:
    run = _run_dir(tmp_path)
    other = _save_checkpoint(tmp_path / "baseline" / "b.ckpt", seed=1)
    # file names sort against the training order: the timeline follows epoch/step
    timeline = tmp_path / "timeline"
    _save_checkpoint(timeline / "a_late.ckpt", epoch=9, step=90, seed=2)
    _save_checkpoint(timeline / "b_early.ckpt", epoch=1, step=10, seed=3)
    _save_checkpoint(timeline / "c_mid.ckpt", epoch=4, step=40, seed=4)
    result = build_atlas(_small("--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "atlas"),
                                "--compare", str(other), "--compare_label", "baseline", "--timeline", str(timeline)))
    index = result.index
    assert index["compare"]["label"] == "baseline" and index["compare"]["checkpoint"] == str(other)
    assert index["compare"]["flags"] == [{"class": 0, "concept": 0, "importance": 1 / 6, "off_map_share": 0.8}]
    assert [f["class"] for f in index["compare"]["background_flags"]] == [1]
    steps = [(c["label"], c["epoch"], c["step"]) for c in index["timeline"]["checkpoints"]]
    assert steps == [("b_early", 1, 10), ("c_mid", 4, 40), ("a_late", 9, 90)]
    assert index["timeline"]["page"] == "timeline.html"
    sums = {}
    for name, path in (("main", run / "checkpoints" / "best.ckpt"), ("other", other), ("b", timeline / "b_early.ckpt"),
                       ("c", timeline / "c_mid.ckpt"), ("a", timeline / "a_late.ckpt")):
        weights = torch.load(path, weights_only=False)["state_dict"]
        sums[name] = float(sum(v.double().sum() for k, v in weights.items() if k.startswith("model.") and v.is_floating_point()))
    for c in (0, 1, 2):
        doc = json.loads((tmp_path / "atlas" / "data" / "class" / f"{c}.json").read_text())
        validate(doc, f"class {c}")
        assert doc["weights_sum"] == pytest.approx(sums["main"])
        assert doc["compare"]["label"] == "baseline" and doc["compare"]["weights_sum"] == pytest.approx(sums["other"])
        assert doc["timeline"]["checkpoints"] == [{"label": lab, "epoch": e, "step": s} for lab, e, s in steps]
        assert doc["timeline"]["weights_sums"] == pytest.approx([sums["b"], sums["c"], sums["a"]])
        assert (tmp_path / "atlas" / "img" / "compare" / "class" / str(c)).is_dir()
    assert result.analysed == 3 * 5  # main, compare, three timeline checkpoints


def test_compare_with_a_checkpoint_of_another_architecture(tmp_path: Path, fakes: list) -> None:
    run = _run_dir(tmp_path)
    other = _save_checkpoint(tmp_path / "cnn" / "plain.ckpt", arch="cnn", arch_args={"in_channels": 1})
    result = build_atlas([*_small("--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "--compare", str(other)),
                          "--classes", "4"])
    doc = json.loads((result.out / "data" / "class" / "4.json").read_text())
    weights = torch.load(other, weights_only=False)["state_dict"]
    expected = float(sum(v.double().sum() for k, v in weights.items() if k.startswith("model.") and v.is_floating_point()))
    assert doc["compare"]["label"] == "plain" and doc["compare"]["weights_sum"] == pytest.approx(expected)


def test_curves_from_tensorboard_and_csv_logs(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    logs = tmp_path / "logs"
    writer = SummaryWriter(str(logs / "tb"))
    for step in (0, 10, 20):
        writer.add_scalar("val/acc", step / 100, step)
    writer.close()
    (logs / "csv").mkdir(parents=True)
    with open(logs / "csv" / "metrics.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["epoch", "step", "train/loss", "val/acc"])
        rows.writerows([[0, 5, 1.5, ""], [0, 9, "", 0.9], [1, 15, "nan", ""]])
    curves = read_curves(logs)
    assert curves["series"]["train/loss"] == [[5.0, 1.5]]  # NaN left out: JSON has no NaN
    points = curves["series"]["val/acc"]  # TensorBoard keeps float32
    assert [s for s, _ in points] == [0.0, 9.0, 10.0, 20.0] and [v for _, v in points] == pytest.approx([0, 0.9, 0.1, 0.2])
    assert "epoch" not in curves["series"] and "TensorBoard" in curves["source"] and "CSV" in curves["source"]
    assert read_curves(tmp_path / "nothing") is None


def test_logs_of_the_run_become_the_index_curves(tmp_path: Path, fakes: list) -> None:
    run = _run_dir(tmp_path)
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("epoch,step,val/acc\n0,10,0.5\n1,20,0.75\n")
    result = build_atlas([*_small("--ckpt_path", str(run / "checkpoints" / "best.ckpt")), "--classes", "1"])
    assert result.index["curves"]["series"] == {"val/acc": [[10.0, 0.5], [20.0, 0.75]]}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "disabled"
    return env


@pytest.mark.slow
def test_ddp_two_processes_share_the_classes(tmp_path: Path) -> None:
    """``--trainer.devices 2 --trainer.strategy ddp`` on CPU (gloo): each class analysed once, on one rank."""
    run = _run_dir(tmp_path)
    log = tmp_path / "calls.txt"
    env = {**_env(), "ATLAS_FAKE_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-m", "atlas_fakes", "atlas", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
                           "--classes", "0", "1", "2", "3", "4", "--images-per-class", "2", "--trainer.accelerator", "cpu",
                           "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = [line.split() for line in log.read_text().splitlines()]
    analysed = {int(c): r for r, f, c in calls if f == "analyze_class"}
    assert sorted(analysed) == [0, 1, 2, 3, 4] and len([1 for _, f, _ in calls if f == "analyze_class"]) == 5
    assert set(analysed.values()) == {"0", "1"}  # both ranks worked
    assert [r for r, f, _ in calls if f == "render_site"] == ["0"]
    index = json.loads((run / "atlas" / "data" / "atlas.json").read_text())
    assert [c["id"] for c in index["classes"]] == [0, 1, 2, 3, 4] and index["metrics"]["images"] == 10
    assert "atlas of 5 classes (5 analysed, 0 from the cache" in proc.stdout


def test_end_to_end_with_the_real_analysis_and_renderer(tmp_path: Path) -> None:
    """The real modules, a tiny model and two classes: a site whose documents validate."""
    pytest.importorskip("harmonia.atlas.analysis", reason="harmonia/atlas/analysis.py is not on this branch yet")
    pytest.importorskip("harmonia.atlas.render", reason="harmonia/atlas/render.py is not on this branch yet")
    run = _run_dir(tmp_path)
    result = build_atlas(["--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "--classes", "0", "1",
                          "--images-per-class", "4", "--concepts", "3", "--no-maco", "--heldout_images", "64"])
    out = result.out
    validate(json.loads((out / "data" / "atlas.json").read_text()), "atlas.json")
    for c in (0, 1):
        document = json.loads((out / "data" / "class" / f"{c}.json").read_text())
        validate(document, f"class {c}")
        assert document["background"]["images"] == 4 and document["background"]["donors"] == 4  # the other class's backgrounds
    assert (out / "index.html").is_file() and (out / "class" / "0.html").is_file()


def test_similar_concepts_are_the_closest_of_other_classes() -> None:
    documents = [{"class": {"id": c}, "concepts": [{} for _ in range(2)]} for c in (3, 5, 8)]
    vectors = [torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]),      # class 3: c0 = x, c1 = y
               torch.tensor([[0.9, 0.1, 0], [0, 0, 1.0]]),    # class 5: c0 ≈ x, c1 = z
               torch.tensor([[0, 0.8, 0.2], [0.5, 0.5, 0]])]  # class 8: c0 ≈ y, c1 between x and y
    assert add_similar_concepts(documents, vectors, top=2)
    first = documents[0]["concepts"][0]["similar"]
    assert [(m["class"], m["concept"]) for m in first] == [(5, 0), (8, 1)]  # never its own class
    assert first[0]["cosine"] == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5, abs=1e-4)
    assert [(m["class"], m["concept"]) for m in documents[0]["concepts"][1]["similar"]] == [(8, 0), (8, 1)]
    assert not add_similar_concepts(documents[:1], vectors[:1])  # one class: nothing to compare with
    assert not add_similar_concepts(documents, [vectors[0], None, vectors[2]])  # a bank missing: left as is


def test_background_donors_come_from_the_other_mapped_classes(tmp_path: Path) -> None:
    """Each donor is an image of another class with its own map; a class without maps gives none."""
    images = {k: command.ClassImages(torch.full((3, 1, 4, 4), float(k)), torch.full((3,), k),
                                     torch.full((3, 1, 4, 4), float(k + 1)), [0, 1, 2]) for k in range(4)}
    images[3] = command.ClassImages(images[3].images, images[3].labels, None, [0, 1, 2])  # no maps: no donor
    runner = command.AtlasRunner(torch.nn.Linear(16, 4), command.Job(main=None), images,
                                 atlas_fakes.AtlasSettings(background_donors=1), ["0", "1", "2", "3"], tmp_path)
    donors, maps = runner.donors(1)
    assert sorted(donors[:, 0, 0, 0].tolist()) in ([0.0, 0.0, 2.0], [0.0, 2.0, 2.0])  # 3 images × 1 draw, classes 0 and 2
    torch.testing.assert_close(maps[:, 0, 0, 0], donors[:, 0, 0, 0] + 1)  # each with its own map
    assert runner.donors(1)[0].tolist() == donors.tolist()  # seeded
    only = {0: images[0], 3: images[3]}
    assert command.AtlasRunner(torch.nn.Linear(16, 4), command.Job(main=None), only, atlas_fakes.AtlasSettings(),
                               ["0", "1", "2", "3"], tmp_path).donors(0) is None
    # the cache key changes with the images the donors are drawn from
    before = runner.images_digest(1)
    runner.images[2] = command.ClassImages(images[2].images + 1, images[2].labels, images[2].maps, [0, 1, 2])
    runner._digests.clear()
    assert runner.images_digest(1) != before
