"""benchmarks/decoy_digits.py: partial runs (split by arm and seed) merge into the one JSON."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.decoy_digits import main, merge  # noqa: E402

ARM = {"config": "configs/digits.yaml", "overrides": [], "oracle": "oracle_lipschitz", "baseline": "baseline_lipschitz",
       "arch": "lipschitz_cnn", "objective": "TauCrossEntropy", "lambda_harmonization": 0.1, "lambda_rrr": 0.0,
       "saliency": "mean_abs", "saliency_score": "log_prob", "train_decoy": "label", "epochs": 30, "batch_size": 64}


def _part(tmp_path: Path, name: str, seeds: list[int], accs: list[float], **changes) -> Path:
    runs = [{"acc": a, "acc_other_shade": a, "follows_decoy": 0.01} for a in accs]
    path = tmp_path / f"{name}_{'_'.join(map(str, seeds))}.json"
    path.write_text(json.dumps({"harmonized_lipschitz": {**ARM, **changes, "runs": runs, "seeds": seeds, "seconds": 1.0,
                                                         "mean": 0.0, "std": 0.0}, "settings": {"seeds": seeds}}))
    return path


def test_merge_pools_seeds_and_resummarizes(tmp_path: Path) -> None:
    merged = merge([_part(tmp_path, "a", [2], [0.8]), _part(tmp_path, "b", [0, 1], [0.9, 0.7])])
    arm = merged["harmonized_lipschitz"]
    assert arm["seeds"] == [0, 1, 2] and [r["acc"] for r in arm["runs"]] == [0.9, 0.7, 0.8]
    assert arm["mean"] == pytest.approx(0.8) and arm["std"] == pytest.approx(0.1)
    assert arm["seconds"] == 2.0 and arm["config"] == "configs/digits.yaml"


def test_merge_refuses_repeated_seeds_or_different_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seeds"):
        merge([_part(tmp_path, "a", [0], [0.8]), _part(tmp_path, "b", [0, 1], [0.9, 0.7])])
    with pytest.raises(ValueError, match="different settings"):
        merge([_part(tmp_path, "a", [2], [0.8]), _part(tmp_path, "b", [0, 1], [0.9, 0.7], lambda_harmonization=1.0)])


def test_merge_cli_writes_the_interface(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "all.json"
    monkeypatch.setattr(sys, "argv", ["decoy_digits.py", "--merge", str(_part(tmp_path, "a", [0, 1], [0.9, 0.7])), "--out", str(out)])
    main()
    result = json.loads(out.read_text())
    assert result["harmonized_lipschitz"]["mean"] == pytest.approx(0.8)


def test_targets_compare_each_arm_with_its_own_architecture() -> None:
    from benchmarks.decoy_digits import target_lines

    def arm(mean: float, lipschitz: bool = False) -> dict:
        return {"mean": mean, "oracle": "oracle_lipschitz" if lipschitz else "oracle",
                "baseline": "baseline_lipschitz" if lipschitz else "baseline"}

    results = {"baseline": arm(0.77), "oracle": arm(0.96), "harmonized_cnn": arm(0.935),
               "baseline_lipschitz": arm(0.90, True), "oracle_lipschitz": arm(0.94, True),
               "harmonized_lipschitz": arm(0.93, True)}
    lines = target_lines(results)
    assert lines[0].startswith("architecture: baseline_lipschitz +13.0 points over the CNN baseline")
    assert "harmonized_cnn: +16.5 points over baseline (target ≥ +15: met) 2.5 points below oracle (target ≤ 3: met)" in lines
    lipschitz = next(line for line in lines if line.startswith("harmonized_lipschitz"))
    assert "+3.0 points over baseline_lipschitz (baseline_lipschitz is only 4.0 below oracle_lipschitz: no gain target)" in lipschitz
    assert "1.0 points below oracle_lipschitz (target ≤ 3: met)" in lipschitz


def test_a_fit_in_a_worker_process_equals_the_same_fit_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs runs fits in spawned workers at one thread each: the numbers must not depend on it."""
    import torch

    from benchmarks.decoy_digits import run

    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "jobs.json"
    monkeypatch.setattr(sys, "argv", ["decoy_digits.py", "--variants", "baseline", "--seeds", "1", "--epochs", "1",
                                      "--jobs", "1", "--out", str(out)])
    main()
    in_worker = json.loads(out.read_text())["baseline"]["runs"][0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        in_process, _ = run("baseline", 1, epochs=1)
    finally:
        torch.set_num_threads(threads)
    assert in_worker == pytest.approx(in_process, abs=0, rel=0)
