"""Cost of 1-Lipschitz training and inference next to the unconstrained twin (issue #7).

For each Lipschitz model (registry name + constructor arguments) and its twin (``cnn`` with
the same arguments), measured side by side in one run: every round times a few steps of
every variant in turn (interleaved, so machine noise hits them alike); medians over rounds.

- ``ce`` step: ``AlignedClassifier.training_step`` with λ = 0 (cross-entropy, label
  smoothing 0.1) + backward + Adam step, as a Lightning fit runs it (inside
  ``parametrize.cached()``);
- ``harmonized`` step: the same with λ = 1 and a human map on every sample (forward, input
  gradient with ``create_graph=True``, harmonization loss, double backward, Adam step);
- ``export`` inference: ``export(model)`` vs the twin in eval mode under ``inference_mode``.

Ratios are Lipschitz / twin (targets: steps ≤ 1.5, export inference ≤ 1.0). The JSON's
top-level keys are those of the default digits model (``configs/digits.yaml``).

    PYTHONPATH=. python benchmarks/lipschitz_cost.py --out benchmarks/results/lipschitz_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from harmonia.allocator import retain_freed_memory
from harmonia.data import DecoyDigits, Sample
from harmonia.explain import Saliency
from harmonia.losses import Harmonization
from harmonia.models import export
from harmonia.module import AlignedClassifier

# The default digits model's constructor arguments, read from its config so that this stays true.
DIGITS_ARGS: dict[str, Any] = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "configs" / "digits.yaml").read_text())["model"]["arch_args"]
# (label, registry name, constructor arguments); the first is the default digits model.
MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("lipschitz_cnn (digits.yaml)", "lipschitz_cnn", DIGITS_ARGS),
    ("lipschitz_cnn head=spectral", "lipschitz_cnn", {**DIGITS_ARGS, "head": "spectral"}),
    ("lipschitz_cnn pool=invertible", "lipschitz_cnn", {**DIGITS_ARGS, "pool": "invertible"}),
    ("lipschitz_cnn depth=1", "lipschitz_cnn", {**DIGITS_ARGS, "depth": 1}),
    ("lipschitz_cnn backend=deel (before)", "lipschitz_cnn", {**DIGITS_ARGS, "backend": "deel"}),
]
TWIN_IGNORES = ("backend", "bjorck_iterations", "power_iterations")


def make_batch(batch_size: int, seed: int) -> Sample:
    """A training batch of decoy digits in which every sample carries its human map."""
    ds = DecoyDigits("train", seed=0)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:batch_size] % len(ds)
    return Sample(ds.images[idx], ds.maps[idx], torch.ones(batch_size, dtype=torch.bool), ds.labels[idx])


def step_timer(arch: str, arch_args: dict[str, Any], lam: float) -> Callable[[Sample], float]:
    """A closure that runs one training step of a fresh module and returns its seconds."""
    torch.manual_seed(0)
    penalties = [Harmonization(lam, saliency=Saliency(reduction="mean_abs"))] if lam > 0 else []
    module = AlignedClassifier(arch=arch, arch_args=arch_args, penalties=penalties)
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3)

    def step(batch: Sample) -> float:
        start = time.perf_counter()
        loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def inference_timer(model: torch.nn.Module) -> Callable[[Sample], float]:
    """A closure that times one eval-mode forward of ``model`` under ``inference_mode``."""
    model.eval()

    def forward(batch: Sample) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(batch.image)
        return time.perf_counter() - start

    return forward


def measure(arch: str, arch_args: dict[str, Any], batch_sizes: list[int], rounds: int, steps: int) -> dict[str, float]:
    """Interleaved medians (ms) and Lipschitz/twin ratios for one model."""
    twin_args = {k: v for k, v in arch_args.items() if k not in TWIN_IGNORES}
    timers: dict[str, Callable[[Sample], float]] = {}
    for bs in batch_sizes:
        for kind, lam in (("ce", 0.0), ("harmonized", 1.0)):
            timers[f"{kind}_lip_bs{bs}"] = step_timer(arch, arch_args, lam)
            timers[f"{kind}_twin_bs{bs}"] = step_timer("cnn", twin_args, lam)
    trained = AlignedClassifier(arch=arch, arch_args=arch_args).model
    twin = AlignedClassifier(arch="cnn", arch_args=twin_args).model
    for bs in batch_sizes:
        timers[f"export_lip_bs{bs}"] = inference_timer(export(trained))
        timers[f"export_twin_bs{bs}"] = inference_timer(twin)
    batches = {bs: [make_batch(bs, seed) for seed in range(steps)] for bs in batch_sizes}
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for r in range(rounds + 1):  # round 0 warms up (allocator, oneDNN primitives) and is dropped
        for name, timer in timers.items():
            bs = int(name.rsplit("bs", 1)[1])
            times = [timer(batch) for batch in batches[bs]]
            if r:
                samples[name] += times
    med = {name: statistics.median(v) for name, v in samples.items()}
    out: dict[str, float] = {f"{name}_ms": 1e3 * v for name, v in med.items()}
    for bs in batch_sizes:
        for kind in ("ce", "harmonized", "export"):
            out[f"{kind}_over_twin_bs{bs}"] = med[f"{kind}_lip_bs{bs}"] / med[f"{kind}_twin_bs{bs}"]
    return out


def main() -> None:
    """Measure every model, print a table, write the JSON atomically."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lipschitz_cost.json"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", type=int, nargs="+", help="indices into MODELS (default: all)")
    parser.add_argument("--malloc", choices=["retain", "system"], default="retain",
                        help='"retain" (default): glibc keeps freed memory, as the harmonia command sets it (harmonia/allocator.py); "system": malloc untouched')
    args = parser.parse_args()
    malloc = "retain" if args.malloc == "retain" and retain_freed_memory() else "system"
    # training_step is called without a Trainer: its self.log() calls are no-ops that warn.
    warnings.filterwarnings("ignore", message=r".*self\.trainer. reference is not registered")
    torch.set_num_threads(args.threads)
    chosen = [MODELS[i] for i in args.models] if args.models else MODELS
    per_model = {}
    for label, arch, arch_args in chosen:
        start = time.perf_counter()
        per_model[label] = measure(arch, arch_args, args.batch_sizes, args.rounds, args.steps)
        print(f"measured {label} in {time.perf_counter() - start:.0f} s", flush=True)
    default = per_model[chosen[0][0]]
    result: dict[str, Any] = {
        "ce_step_over_twin_bs64": default.get("ce_over_twin_bs64"),
        "ce_step_over_twin_bs256": default.get("ce_over_twin_bs256"),
        "harmonized_step_over_twin_bs64": default.get("harmonized_over_twin_bs64"),
        "harmonized_step_over_twin_bs256": default.get("harmonized_over_twin_bs256"),
        # the worse of the batch sizes measured
        "export_inference_over_twin": max(default[f"export_over_twin_bs{bs}"] for bs in args.batch_sizes),
        "model": chosen[0][0],
        "threads": torch.get_num_threads(),
        "malloc": malloc,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "per_model": per_model,
    }
    bss = args.batch_sizes
    print(f"\n{torch.get_num_threads()} threads, malloc {malloc}, medians of {args.rounds} interleaved rounds × {args.steps} steps; Lipschitz / twin")
    header = " | ".join(f"{k} bs{bs}" for k in ("CE step", "harmonized step", "export inference") for bs in bss)
    print(f"| model | {header} |")
    print("|---|" + "---|" * (3 * len(bss)))
    for label, m in per_model.items():
        cells = " | ".join(
            f"{m[f'{k}_over_twin_bs{bs}']:.2f} ({m[f'{k}_lip_bs{bs}_ms']:.1f}/{m[f'{k}_twin_bs{bs}_ms']:.1f} ms)"
            for k in ("ce", "harmonized", "export") for bs in bss
        )
        print(f"| {label} | {cells} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(result, tmp, indent=2)
    os.replace(tmp.name, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
