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


def _without(config: dict, *model_keys: str) -> dict:
    return {**config, "model": {k: v for k, v in config["model"].items() if k not in model_keys}}


@pytest.mark.parametrize(
    ("config", "reference", "differences"),
    [
        ("digits_baseline.yaml", "digits.yaml", {"lambda_harmonization": 0.0}),
        ("digits_cnn_harmonized_rrr.yaml", "digits_cnn_harmonized.yaml", {"lambda_rrr": 0.01}),
        ("digits_rrr.yaml", "digits.yaml", {"lambda_rrr": 0.3, "pyramid_first_level": 2}),
        ("digits_cnn_rrr.yaml", "digits_cnn_harmonized.yaml", {"lambda_harmonization": 0.0, "lambda_rrr": 0.01}),
    ],
)
def test_paired_configs_differ_only_in_the_penalty(config: str, reference: str, differences: dict) -> None:
    ours, theirs = _load(config), _load(reference)
    assert {k: ours["model"].get(k, 0.0) for k in differences} == differences
    assert _without(ours, *differences) == _without(theirs, *differences)


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
