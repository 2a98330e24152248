"""The atlas on decoy digits: it flags the shortcut where the model took it, and not otherwise.

The shipped plain-CNN configurations are trained as `harmonia fit` trains them (their monitors
and logger left out, which changes no weight), then atlases of all ten classes are built without
MACO pictures (no number depends on them). The ground truth is
:func:`harmonia.data.digits.decoy_reliance`: how much each class's training accuracy falls when
the decoy stops telling the label. The decoy-trained CNN leans on the decoy in about half of its
classes (benchmarks/README.md, atlas_cost.py); the harmonized one in none. The concept flags find
some of those classes and nothing else; the background swap finds all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harmonia.atlas.command import build_atlas
from harmonia.data.digits import decoy_reliance
from harmonia.module import AlignedClassifier

ROOT = Path(__file__).resolve().parents[1]


def _fit(config: str, tmp: Path) -> Path:
    """Train ``configs/<config>.yaml`` with only its checkpoint callbacks; the best checkpoint."""
    settings = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())
    trainer = settings["trainer"]
    trainer["callbacks"] = [c for c in trainer.get("callbacks", []) if c["class_path"].endswith("ModelCheckpoint")]
    trainer["logger"] = False
    path = tmp / f"{config}.yaml"
    path.write_text(yaml.safe_dump(settings))
    run = tmp / config
    subprocess.run([sys.executable, "-m", "harmonia.train", "fit", "--config", str(path), "--run_dir", str(run)],
                   check=True, cwd=ROOT, capture_output=True)
    return run / "checkpoints" / "best.ckpt"


def _flags_and_reliant(config: str, tmp: Path) -> tuple[set[int], set[int], set[int]]:
    """Classes with a flagged concept, background-reliant classes, decoy-reliant classes (ground truth)."""
    ckpt = _fit(config, tmp)
    result = build_atlas(["--ckpt_path", str(ckpt), "--out", str(tmp / f"atlas_{config}"), "--no-maco",
                          "--heldout_images", "0"])
    index = json.loads((result.out / "data" / "atlas.json").read_text())
    flagged = {flag["class"] for flag in index["flags"]}
    background = {flag["class"] for flag in index["background_flags"]}
    reliance = decoy_reliance(AlignedClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval())
    return flagged, background, {c for c in range(10) if float(reliance[c]) >= 0.10}


@pytest.mark.slow
def test_the_decoy_trained_cnn_is_flagged_where_it_reads_the_decoy(tmp_path: Path) -> None:
    flagged, background, reliant = _flags_and_reliant("digits_cnn_baseline", tmp_path)
    assert len(reliant) >= 3, f"the baseline should lean on the decoy; reliant classes {sorted(reliant)}"
    # concept flags: precise but local (they miss the faint decoys); the background swap: every reliant class
    assert len(flagged) >= 2, f"flagged {sorted(flagged)}, decoy-reliant {sorted(reliant)}"
    assert flagged <= reliant, f"a flag where the decoy is not used: flagged {sorted(flagged)}, reliant {sorted(reliant)}"
    assert reliant <= background and len(background) >= 5, f"background-reliant {sorted(background)}, decoy-reliant {sorted(reliant)}"


@pytest.mark.slow
def test_the_harmonized_cnn_is_flagged_at_most_once(tmp_path: Path) -> None:
    flagged, background, reliant = _flags_and_reliant("digits_cnn_harmonized", tmp_path)
    assert not reliant, f"the harmonized CNN should not lean on the decoy; reliant classes {sorted(reliant)}"
    assert len(flagged) <= 1, f"flagged {sorted(flagged)}"
    assert len(background) <= 1, f"background-reliant {sorted(background)}"
