"""The offline W&B run reader the atlas uses for training curves."""

from __future__ import annotations

import numpy as np
import pytest

from harmonia.atlas.wandb_log import BLOCK, HEADER, read_history, records


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    """A real offline run: scalars over 300 steps (several 32 KiB blocks), an image, a long string."""
    wandb = pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb")
    run = wandb.init(mode="offline", dir=str(root), project="harmonia-test", settings=wandb.Settings(silent=True))
    for step in range(300):
        run.log({"trainer/global_step": 10 * step, "train/loss": 1.0 / (step + 1), "note": "x" * 500})
        if step % 100 == 0:
            run.log({"val/acc": step / 300, "trainer/global_step": 10 * step,
                     "grid": wandb.Image(np.zeros((8, 8, 3), dtype=np.uint8))})
    run.finish()
    (path,) = root.rglob("run-*.wandb")
    return path


def test_reads_every_scalar_with_its_step(run_file):
    assert run_file.stat().st_size > 2 * BLOCK  # records cross block boundaries
    history = read_history(run_file)
    assert set(history) == {"train/loss", "val/acc"}  # strings and images are not curves
    loss = history["train/loss"]
    assert [s for s, _ in loss] == [10.0 * i for i in range(300)]
    assert loss[-1][1] == pytest.approx(1 / 300)
    assert history["val/acc"] == [(0.0, 0.0), (1000.0, pytest.approx(1 / 3)), (2000.0, pytest.approx(2 / 3))]


def test_truncated_run_keeps_what_was_written(run_file, tmp_path):
    data = run_file.read_bytes()
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: len(data) // 2])
    assert 0 < len(records(cut)) < len(records(run_file))


def test_corruption_and_other_files_are_named(run_file, tmp_path):
    data = bytearray(run_file.read_bytes())
    data[len(HEADER) + 20] ^= 0xFF
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.wandb: corrupt record at byte 7"):
        records(bad)
    other = tmp_path / "other.wandb"
    other.write_bytes(b"not a run")
    with pytest.raises(ValueError, match=r"other\.wandb: not a W&B run log"):
        records(other)


def test_the_atlas_reads_the_curves_of_a_wandb_run(run_file):
    from harmonia.atlas.command import read_curves

    curves = read_curves(run_file.parent.parent)
    assert curves is not None and "W&B" in curves["source"]
    assert curves["series"]["val/acc"][1] == [1000.0, pytest.approx(1 / 3)]
