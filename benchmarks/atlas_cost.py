"""What does the explanation atlas cost, and does it find the decoy?

1. Checkpoints: ``--ckpt`` (harmonized, ``configs/digits.yaml``) and ``--baseline_ckpt``
   (``configs/digits_baseline.yaml``, λ = 0), or, when not given, both trained here
   (``harmonia fit``, into ``--work``).
2. **Cost**: a ``harmonia atlas`` of ``--classes`` (default all 10) of the harmonized checkpoint in
   a fresh folder (no cache), in this process, wall time split by stage: ``load`` (config, model,
   checkpoints), ``images``, ``predict`` (the Lightning run; inside it ``analysis`` with the
   analysis's own sub-stages when it reports them, ``documents``, ``cache``, ``heldout``),
   ``index``, ``render`` (sub-stages are named ``predict/analysis`` and so on in the JSON);
   then ``browser`` (``check_site``: headless Chromium), not counted in
   ``atlas_seconds``.
3. **Floor**: every call of a direct child of the explained network during the atlas is recorded
   by a global forward hook (input shape, dtype, and whether a backward reached its output); the
   same calls are then replayed on random inputs of those shapes, in order, in a tight loop (a
   forward, and an input-gradient backward where the atlas did one), and timed. That is the model
   compute any atlas of these classes must run; ``atlas_over_floor = atlas_seconds / floor``
   (the hook's own cost, a set lookup per module call, is inside ``atlas_seconds``).
4. **Shortcut flags**: the baseline's atlas of the same classes (without MACO pictures, which
   change no number); ``flagged_classes_*`` count the classes whose page flags an important,
   mostly off-map concept. ``--cnn_pair`` adds the plain-CNN pair, which leans on the decoy far
   more. ``background_reliant_*``: the classes the background swap flags (accuracy falls by ≥ 10
   points when everything off the human maps comes from other classes' images). Ground truth
   beside them: ``decoy_dependent_*``, the classes whose training accuracy falls by ≥ 10 points
   when the decoy square is repainted in a random shade.
5. **Browser**: ``browser_errors`` = console errors + broken links + broken images that
   ``harmonia.atlas.browser.check_site`` finds in the harmonized atlas.

    python benchmarks/atlas_cost.py --out benchmarks/results/atlas_cost.json
    python benchmarks/atlas_cost.py --ckpt runs/digits/latest/checkpoints/best.ckpt \\
        --baseline_ckpt runs/digits_baseline/latest/checkpoints/best.ckpt --out F.json
    # a quick check that it runs (numbers meaningless):
    python benchmarks/atlas_cost.py --ckpt A.ckpt --baseline_ckpt B.ckpt --classes 0 1 \\
        --images-per-class 4 --concepts 3 --no-maco --out /tmp/x.json

Writes ``{"atlas_seconds", "atlas_over_floor", "flagged_classes_baseline",
"flagged_classes_harmonized", "browser_errors", ...details}`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmonia.atlas import analysis, command  # noqa: E402


# ----------------------------------------------------------------------------- checkpoints
def train(config: Path, run_dir: Path, threads: int) -> Path:
    """``harmonia fit`` of ``config`` into ``run_dir`` (no logger); its best checkpoint."""
    best = run_dir / "checkpoints" / "best.ckpt"
    if best.is_file():
        return best
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "harmonia.train", "fit", "--config", str(config), "--run_dir", str(run_dir),
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
                    "--overwrite", "true"], check=True, env=env, cwd=ROOT)
    if not best.is_file():
        raise SystemExit(f"training {config} left no {best}")
    return best


# ----------------------------------------------------------------------------- the floor
@dataclass
class Call:
    """One call of a child of the explained network."""

    module: nn.Module
    shape: tuple[int, ...]
    dtype: torch.dtype
    backward: bool = False


@dataclass
class CallRecorder:
    """Records the calls of the direct children of the networks the atlas runner holds."""

    calls: list[Call] = field(default_factory=list)
    watched: set[int] = field(default_factory=set)

    def watch(self, network: nn.Module | None) -> None:
        """Record the calls of ``network``'s children from now on."""
        if network is not None:
            self.watched.update(id(child) for child in network.children())

    def hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """Global forward hook: note a watched child's call and whether a backward reaches its output."""
        if id(module) not in self.watched or not inputs or not isinstance(inputs[0], Tensor):
            return
        call = Call(module, tuple(inputs[0].shape), inputs[0].dtype)
        self.calls.append(call)
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, Tensor) and out.requires_grad:
            def reached(grad: Tensor) -> None:
                call.backward = True
            out.register_hook(reached)


@contextmanager
def recording(recorder: CallRecorder) -> Iterator[None]:
    """Hook every module call, and point the recorder at the runner's networks when predict starts."""
    original = command.AtlasRunner.on_predict_start

    def on_predict_start(runner: command.AtlasRunner) -> None:
        for classifier in (runner.classifier, runner.compare, runner.work):
            recorder.watch(None if classifier is None else analysis.network(classifier))
        original(runner)

    command.AtlasRunner.on_predict_start = on_predict_start
    handle = torch.nn.modules.module.register_module_forward_hook(recorder.hook)
    try:
        yield
    finally:
        handle.remove()
        command.AtlasRunner.on_predict_start = original


def replay(calls: list[Call], device: torch.device) -> float:
    """Seconds to run the recorded calls again on random inputs (forward, and backward where recorded)."""
    inputs = {}
    for call in calls:  # inputs made before the clock starts: the floor is the model's compute only
        key = (call.shape, call.dtype, call.backward)
        if key not in inputs:
            x = torch.rand(call.shape, dtype=call.dtype, device=device) if call.dtype.is_floating_point else \
                torch.zeros(call.shape, dtype=call.dtype, device=device)
            inputs[key] = x.requires_grad_(call.backward and call.dtype.is_floating_point)
    for call in calls:
        call.module.to(device).eval()
    start = time.perf_counter()
    for call in calls:
        x = inputs[(call.shape, call.dtype, call.backward)]
        with torch.set_grad_enabled(call.backward):
            out = call.module(x)
            if call.backward and isinstance(out, Tensor) and out.requires_grad:
                torch.autograd.grad(out, x, torch.ones_like(out))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- the atlases
def atlas_args(ckpt: Path, config: Path, out: Path, args: argparse.Namespace, maco: bool = True) -> list[str]:
    """The ``harmonia atlas`` command line of one atlas (``maco=False`` for atlases read only for
    their flags: MACO draws pictures, it changes no number)."""
    argv = ["--ckpt_path", str(ckpt), "--config", str(config), "--out", str(out), "--overwrite",
            "--classes", *map(str, args.classes), "--trainer.accelerator", args.accelerator, "--trainer.devices", "1"]
    if args.images_per_class:
        argv += ["--images-per-class", str(args.images_per_class)]
    if args.concepts:
        argv += ["--concepts", str(args.concepts)]
    if args.no_maco or not maco:
        argv += ["--no-maco"]
    return argv


def fresh(folder: Path) -> Path:
    """``folder`` emptied (its cache too: the atlas is timed from scratch)."""
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def flagged_classes(index: dict[str, Any]) -> int:
    """Classes with at least one flagged concept."""
    return len({flag["class"] for flag in index["flags"]})


def background_classes(index: dict[str, Any]) -> list[int]:
    """Classes the background swap flags (accuracy falls by ≥ ``flag_background`` off the human maps)."""
    return sorted(flag["class"] for flag in index["background_flags"])


def decoy_dependent_classes(ckpt: Path, drop: float = 0.10) -> dict[str, Any]:
    """The ground truth the flags should find: classes whose training accuracy falls by ≥ ``drop``
    when the decoy stops telling the label (``harmonia.data.digits.decoy_reliance``)."""
    from harmonia.data.digits import decoy_reliance
    from harmonia.module import AlignedClassifier

    module = AlignedClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    reliance = decoy_reliance(module)
    return {"classes": [c for c in range(10) if float(reliance[c]) >= drop], "accuracy_drop": reliance.tolist()}


def browser_check(out: Path, screenshots: Path) -> tuple[dict[str, Any], float]:
    """Console errors, broken links and broken images of the site, and the seconds the check took."""
    from harmonia.atlas.browser import check_site

    start = time.perf_counter()
    report = check_site(out, screenshots)
    seconds = time.perf_counter() - start
    found = {name: list(getattr(report, name)) for name in ("console_errors", "broken_links", "broken_images", "failures")}
    found["pages"] = len(getattr(report, "pages", []) or [])
    return found, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/atlas_cost.json"))
    parser.add_argument("--ckpt", type=Path, default=None, help="harmonized checkpoint (default: train configs/digits.yaml)")
    parser.add_argument("--baseline_ckpt", type=Path, default=None,
                        help="baseline checkpoint (default: train configs/digits_baseline.yaml)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    parser.add_argument("--baseline_config", type=Path, default=ROOT / "configs" / "digits_baseline.yaml")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/atlas_cost"),
                        help="trained runs, the two atlases and the screenshots")
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--images-per-class", "--images_per_class", dest="images_per_class", type=int, default=None,
                        help="(quick checks only) default: the atlas's default")
    parser.add_argument("--concepts", type=int, default=None, help="(quick checks only) default: the config's")
    parser.add_argument("--no-maco", "--no_maco", dest="no_maco", action="store_true", help="(quick checks only)")
    parser.add_argument("--no-browser", "--no_browser", dest="no_browser", action="store_true",
                        help="skip the Chromium check (browser_errors = null)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target is for 2 CPU cores)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--cnn_pair", type=Path, nargs=2, default=None, metavar=("BASELINE_CKPT", "HARMONIZED_CKPT"),
                        help="also flag the plain-CNN pair (configs/digits_cnn_baseline.yaml, digits_cnn_harmonized.yaml)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt or train(args.config, work / "runs" / "digits", args.threads)
    baseline = args.baseline_ckpt or train(args.baseline_config, work / "runs" / "digits_baseline", args.threads)

    recorder = CallRecorder()
    out = fresh(work / "atlas_harmonized")
    with recording(recorder):
        start = time.perf_counter()
        result = command.build_atlas(atlas_args(ckpt, args.config, out, args))
        atlas_seconds = time.perf_counter() - start
    floor = replay(recorder.calls, torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu"))
    stages = dict(result.seconds)
    browser, browser_errors = None, None
    if not args.no_browser:
        browser, stages["browser"] = browser_check(out, work / "screenshots")
        browser_errors = sum(len(browser[k]) for k in ("console_errors", "broken_links", "broken_images", "failures"))

    baseline_result = command.build_atlas(atlas_args(baseline, args.baseline_config, fresh(work / "atlas_baseline"), args, maco=False))
    # The plain-CNN pair relies on the decoy far more than the 1-Lipschitz pair: flags of both.
    pairs = {"": (ckpt, baseline, result.index, baseline_result.index)}
    if args.cnn_pair:
        cnn_baseline, cnn_harmonized = args.cnn_pair
        cnn_b = command.build_atlas(atlas_args(cnn_baseline, ROOT / "configs" / "digits_cnn_baseline.yaml",
                                               fresh(work / "atlas_cnn_baseline"), args, maco=False))
        cnn_h = command.build_atlas(atlas_args(cnn_harmonized, ROOT / "configs" / "digits_cnn_harmonized.yaml",
                                               fresh(work / "atlas_cnn_harmonized"), args, maco=False))
        pairs["cnn_"] = (cnn_harmonized, cnn_baseline, cnn_h.index, cnn_b.index)
    flags_extra: dict[str, Any] = {}
    for prefix, (h_ckpt, b_ckpt, h_index, b_index) in pairs.items():
        if prefix:
            flags_extra[f"flagged_classes_{prefix}baseline"] = flagged_classes(b_index)
            flags_extra[f"flagged_classes_{prefix}harmonized"] = flagged_classes(h_index)
        flags_extra[f"flagged_{prefix}baseline"] = sorted({f["class"] for f in b_index["flags"]})
        flags_extra[f"flagged_{prefix}harmonized"] = sorted({f["class"] for f in h_index["flags"]})
        flags_extra[f"background_reliant_{prefix}baseline"] = background_classes(b_index)
        flags_extra[f"background_reliant_{prefix}harmonized"] = background_classes(h_index)
        flags_extra[f"background_flags_{prefix}baseline"] = b_index["background_flags"]  # drops, intervals, carriers
        flags_extra[f"background_flags_{prefix}harmonized"] = h_index["background_flags"]
        flags_extra[f"decoy_dependent_{prefix}baseline"] = decoy_dependent_classes(b_ckpt)
        flags_extra[f"decoy_dependent_{prefix}harmonized"] = decoy_dependent_classes(h_ckpt)
    report = {
        "atlas_seconds": atlas_seconds,
        "atlas_over_floor": atlas_seconds / floor if floor > 0 else None,
        "flagged_classes_baseline": flagged_classes(baseline_result.index),
        "flagged_classes_harmonized": flagged_classes(result.index),
        "browser_errors": browser_errors,
        **flags_extra,
        "floor_seconds": floor,
        "stages": stages,
        "model_calls": len(recorder.calls),
        "backward_calls": sum(call.backward for call in recorder.calls),
        "classes": args.classes,
        "settings": result.index["settings"],
        "flags": {"harmonized": result.index["flags"], "baseline": baseline_result.index["flags"]},
        "browser": browser,
        "checkpoints": {"harmonized": str(ckpt), "baseline": str(baseline)},
        "atlases": {"harmonized": str(out), "baseline": str(baseline_result.out)},
        "machine": {"threads": args.threads, "cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "accelerator": args.accelerator},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    rows = [("atlas seconds (load → render)", f"{atlas_seconds:.2f}"),
            *[("  " * name.count("/") + f"  {name.rsplit('/', 1)[-1]}", f"{seconds:.2f}") for name, seconds in stages.items()],
            ("floor seconds (model calls replayed)", f"{floor:.2f}"),
            ("  calls / with a backward", f"{report['model_calls']} / {report['backward_calls']}"),
            ("atlas ÷ floor", f"{report['atlas_over_floor']:.2f}" if report["atlas_over_floor"] else "n/a"),
            ("flagged classes baseline / harmonized",
             f"{report['flagged_classes_baseline']} / {report['flagged_classes_harmonized']} of {len(args.classes)}"),
            ("browser errors", "skipped" if browser_errors is None else str(browser_errors))]
    for prefix in pairs:
        for arm in ("baseline", "harmonized"):
            truth = report[f"decoy_dependent_{prefix}{arm}"]["classes"]
            rows.append((f"{prefix}{arm}: flagged / background-reliant / decoy-dependent classes",
                         f"{report[f'flagged_{prefix}{arm}']} / {report[f'background_reliant_{prefix}{arm}']} / {truth}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
