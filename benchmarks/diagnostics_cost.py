"""What do the diagnostics callbacks cost, and how close is Sobol attribution to its forward floor?

1. **Callback shares** (issues #4, #5). The config (default ``configs/digits.yaml``) is fitted
   ``--fits`` times exactly as configured (its callbacks, cadence, logger and data; files go to
   a temporary folder; progress bar off) with Lightning's ``SimpleProfiler``, which times every
   callback hook as ``[Callback]<Name>.<hook>``. Diagnostics callbacks are found in the config by
   class name (``DIAGNOSTICS``: SaliencyMonitor → saliency, ConceptMonitor → concept,
   LipschitzMonitor → lipschitz), so a callback added to the config later is measured without
   touching this script. A clock callback appended last marks the training window, from the
   first epoch's start to the end of ``on_train_end`` (where end-of-fit runs happen). For each
   diagnostics callback:

       share = (time in all its hooks) / (training window − time in all diagnostics hooks within it)

   i.e. the time it adds, as a fraction of the epochs it rides on. The median over fits is
   reported. Hooks that run before the window (setup, sanity check) count in the numerator and
   are conservatively subtracted from the denominator as if inside.

2. **Sobol ÷ forward floor** (issue #4). On the config's model (the last fit's weights, eval
   mode) and ``--sobol-images`` validation images: ``SobolAttribution`` at its defaults
   (grid 8, nb_design 32, batch 256: ``N · 32 · 66`` forwards) vs the same number of plain
   forwards of an unperturbed batch at the same batch size (``no_grad`` and cached weight
   parametrizations, as Sobol's own forwards). Also timed, as a diagnostic: plain forwards of
   the exact perturbed images Sobol builds, made beforehand, which separates Sobol's own work
   from data-dependent forward cost. Interleaved rounds, medians.

    python benchmarks/diagnostics_cost.py --out benchmarks/results/diagnostics_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: import this checkout's harmonia

from harmonia.explain import SobolAttribution  # noqa: E402
from harmonia.explain.base import chunks  # noqa: E402
from harmonia.train import cli_main  # noqa: E402

DIAGNOSTICS = {"SaliencyMonitor": "saliency", "ConceptMonitor": "concept", "LipschitzMonitor": "lipschitz"}
# Hooks that run outside the training window (before the first epoch or after on_train_end).
OUTSIDE = {"setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_sanity_check_start",
           "on_sanity_check_end", "on_exception", "state_dict", "load_state_dict"}


class _Clock(pl.Callback):
    """Marks the training window: first ``on_train_epoch_start`` → this callback's ``on_train_end``."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.epochs = 0

    def on_train_epoch_start(self, *args) -> None:
        self.start = self.start or time.perf_counter()
        self.epochs += 1

    def on_train_end(self, *args) -> None:
        self.end = time.perf_counter()


def diagnostics_in(config: dict) -> dict[str, str]:
    """``{class name: short name}`` of the diagnostics callbacks a config enables."""
    found = {}
    for callback in config.get("trainer", {}).get("callbacks") or []:
        name = str(callback.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(callback, dict) else ""
        if name in DIAGNOSTICS:
            found[name] = DIAGNOSTICS[name]
    return found


def one_fit(config_path: Path, workdir: Path) -> tuple[dict, pl.LightningModule, pl.LightningDataModule]:
    """Fit the config once with the profiler; return the timings, the model and the data."""
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["profiler"] = {"class_path": "pytorch_lightning.profilers.SimpleProfiler",
                                     "init_args": {"dirpath": str(workdir), "filename": "profile"}}
    config["trainer"]["enable_progress_bar"] = False
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cwd = os.getcwd()
    os.chdir(workdir)  # the config's relative paths (runs/…) land in the temporary folder
    try:
        cli = cli_main(["--config", str(path)], run=False)
        clock = _Clock()
        cli.trainer.callbacks.append(clock)  # appended after init: Lightning does not reorder it
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        os.chdir(cwd)
        if "wandb" in sys.modules:
            sys.modules["wandb"].finish()
    hooks: dict[str, dict[str, float]] = defaultdict(lambda: {"total": 0.0, "inside": 0.0})
    for action, durations in cli.trainer.profiler.recorded_durations.items():
        if not action.startswith("[Callback]"):
            continue
        owner, hook = action[len("[Callback]"):].rsplit(".", 1)
        owner = owner.split("{", 1)[0]  # state keys may carry arguments: "Name{...}"
        if owner in DIAGNOSTICS:
            hooks[owner]["total"] += sum(durations)
            hooks[owner]["inside"] += 0.0 if hook in OUTSIDE else sum(durations)
    window = clock.end - clock.start
    timings = {"window_s": window, "epochs": clock.epochs, "hooks_s": {k: dict(v) for k, v in hooks.items()}}
    return timings, cli.model, cli.datamodule


def callback_shares(config_path: Path, fits: int) -> dict:
    """Median shares over ``fits`` fits, per diagnostics callback and all together."""
    found = diagnostics_in(yaml.safe_load(config_path.read_text()))
    if not found:
        raise SystemExit(f"{config_path} enables none of {sorted(DIAGNOSTICS)}")
    runs, model, data = [], None, None
    for i in range(fits):
        with tempfile.TemporaryDirectory(prefix="diag_cost_") as tmp:
            timing, model, data = one_fit(config_path, Path(tmp))
        inside = sum(h["inside"] for h in timing["hooks_s"].values())
        base = timing["window_s"] - inside
        shares = {f"{short}_callback_share": timing["hooks_s"].get(name, {"total": 0.0})["total"] / base for name, short in found.items()}
        shares["all_diagnostics_share"] = sum(h["total"] for h in timing["hooks_s"].values()) / base
        runs.append({**timing, "epoch_s_without_diagnostics": base / timing["epochs"], **shares})
        print(f"fit {i + 1}/{fits}: window {timing['window_s']:.1f} s over {timing['epochs']} epochs; "
              + ", ".join(f"{k} {v:.2%}" for k, v in shares.items()), flush=True)
    keys = [k for k in runs[0] if k.endswith("_share")]
    return {"found": found, "runs": runs, **{k: statistics.median(r[k] for r in runs) for k in keys}}, model, data


def sobol_over_floor(model: torch.nn.Module, data: pl.LightningDataModule, images: int, rounds: int) -> dict:
    """Interleaved medians: Sobol attribution vs the same number of plain batched forwards."""
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    x, y = batch[0][:images], batch[3][:images]
    model = model.eval()
    sobol = SobolAttribution()  # defaults: grid 8, nb_design 32, perturbation inpainting, batch 256
    total = len(x) * sobol.forwards_per_image
    plain = x[torch.arange(sobol.batch_size) % len(x)].contiguous()

    # Diagnostic only: the very inputs Sobol builds, made beforehand. Forward cost can depend
    # on the data (deel-torchlip's GroupSort2 sorts), so this separates Sobol's own work from it.
    grid, size = sobol.grid_size, x.shape[-2:]
    masks = torch.nn.functional.interpolate(sobol._masks.view(-1, 1, grid, grid), size=size, mode="nearest-exact")
    perturbed = (x[:, None] * masks[None]).flatten(0, 1)

    def forwards(inputs: torch.Tensor, repeat: bool) -> None:
        with torch.no_grad(), parametrize.cached():
            for part in chunks(total, sobol.batch_size):
                model(inputs[: part.stop - part.start] if repeat else inputs[part])

    runs = {"sobol": lambda: sobol.attribute(model, x, y), "floor": lambda: forwards(plain, True),
            "floor_perturbed": lambda: forwards(perturbed, False)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        order = list(runs) if r % 2 else list(runs)[::-1]
        for name in order:
            start = time.perf_counter()
            runs[name]()
            if r:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"sobol_over_forward_floor": med["sobol"] / med["floor"], "sobol_s": med["sobol"], "floor_s": med["floor"],
            "floor_perturbed_s": med["floor_perturbed"], "sobol_over_perturbed_forwards": med["sobol"] / med["floor_perturbed"],
            "forwards": total, "images": len(x), "batch_size": sobol.batch_size, "rounds": rounds,
            "sobol_settings": {"grid_size": sobol.grid_size, "nb_design": sobol.nb_design, "perturbation": sobol.perturbation}}


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)


def main() -> None:
    """Measure, print a Markdown table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diagnostics_cost.json"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    parser.add_argument("--fits", type=int, default=3, help="fits of the config (median share)")
    parser.add_argument("--sobol-images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved Sobol/floor rounds")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    started = time.perf_counter()
    shares, model, data = callback_shares(args.config.resolve(), args.fits)
    sobol = sobol_over_floor(model, data, args.sobol_images, args.rounds)
    result = {key: value for key, value in shares.items() if key.endswith("_share")}
    result.update({
        "sobol_over_forward_floor": sobol["sobol_over_forward_floor"],
        "config": str(args.config), "fits": args.fits, "sobol": sobol, "per_fit": shares["runs"],
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "date": date.today().isoformat(),
        "seconds": time.perf_counter() - started,
    })
    print(f"\n{args.config.name}: {args.fits} fits (SimpleProfiler, median), {torch.get_num_threads()} threads")
    print("| diagnostics | share of epoch time (median) | per fit | target |")
    print("|---|---|---|---|")
    for key in [k for k in result if k.endswith("_share")]:
        per_fit = ", ".join(f"{r[key]:.2%}" for r in shares["runs"])
        target = "≤ 10%" if key == "all_diagnostics_share" else "≤ 5%"  # issues #4/#5: each ≤ 5%, all ≤ 10%
        print(f"| {key.removesuffix('_callback_share').removesuffix('_share')} | {result[key]:.2%} | {per_fit} | {target} |")
    epoch = statistics.median(r["epoch_s_without_diagnostics"] for r in shares["runs"])
    print(f"\nepoch without diagnostics: {epoch:.2f} s (median)")
    print(f"\n| Sobol ({sobol['images']} images, {sobol['forwards']} forwards, batch {sobol['batch_size']}) | s | ratio | target |")
    print("|---|---|---|---|")
    print(f"| SobolAttribution (grid 8, nb_design 32) | {sobol['sobol_s']:.2f} | {sobol['sobol_over_forward_floor']:.3f} | ≤ 1.15 |")
    print(f"| plain forwards of the images (floor) | {sobol['floor_s']:.2f} | 1 | |")
    print(f"| plain forwards of Sobol's perturbed images, made beforehand | {sobol['floor_perturbed_s']:.2f} "
          f"| {sobol['floor_perturbed_s'] / sobol['floor_s']:.3f} | |")
    write_json(args.out, result)
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
