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
