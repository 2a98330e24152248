"""Cost of a harmonized training step, measured side by side in one run.

Ratios of median step times (forward + backward + optimizer step), all variants interleaved
round by round so that machine noise hits them alike:
- ``harmonized_over_plain``: every sample carries a map / no penalty (target ≤ 2.5×);
- ``mixed25_over_plain``: 25% of the batch carries maps (target ≤ 1.5×);
- ``module_over_handwritten``: ``AlignedClassifier`` trained by a Lightning ``Trainer`` / a
  hand-written PyTorch loop doing the same math (target ≤ 1.05×).

The networks are those of ``configs/digits.yaml`` (the JSON's headline) and of its unconstrained
twin ``configs/digits_cnn_harmonized.yaml`` (``arch`` + ``arch_args``, read from the configs), with
``AlignedClassifier``'s default objective and penalty (``Harmonization()``, the reference).

    python benchmarks/step_cost.py --out benchmarks/results/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset

from harmonia.allocator import retain_freed_memory
from harmonia.data import DecoyDigits, Sample
from harmonia.losses import Harmonization, harmonization_error
from harmonia.models import build_model
from harmonia.module import AlignedClassifier

ROOT = Path(__file__).resolve().parents[1]


def batches(n_batches: int, batch_size: int, map_fraction: float) -> list[Sample]:
    """Fixed training batches of decoy digits with the given share of mapped samples."""
    ds = DecoyDigits("train", seed=0)
    out = []
    for b in range(n_batches):
        idx = torch.arange(b * batch_size, (b + 1) * batch_size) % len(ds)
        has_map = torch.zeros(batch_size, dtype=torch.bool)
        has_map[torch.randperm(batch_size, generator=torch.Generator().manual_seed(b))[: round(map_fraction * batch_size)]] = True
        out.append(Sample(ds.images[idx], ds.maps[idx], has_map, ds.labels[idx]))
    return out


def time_module_steps(module: AlignedClassifier, data: list[Sample], optimizer: torch.optim.Optimizer) -> list[float]:
    """Per-step seconds of ``module.training_step`` + backward + step, without a Trainer."""
    times = []
    for i, batch in enumerate(data):
        start = time.perf_counter()
        loss = module.training_step(batch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def time_handwritten(model: torch.nn.Module, data: list[Sample], optimizer: torch.optim.Optimizer, lam: float) -> list[float]:
    """The same math as AlignedClassifier's harmonized step, written as a plain loop."""
    times = []
    for image, human_map, _, label in data:
        start = time.perf_counter()
        x = image.detach().requires_grad_(True)
        logits = model(x)
        score = logits.gather(1, label[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x, create_graph=True)
        harm = harmonization_error(grad.mean(1, keepdim=True), human_map).sum() / len(label)
        loss = F.cross_entropy(logits, label, label_smoothing=0.1) + lam * harm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


class _StepTimer(pl.Callback):
    """Wall time of each training batch inside a Lightning fit (batch start → batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


class _ListDataset(Dataset):
    def __init__(self, items: list[Sample]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        return self.items[i]


def time_lightning(module: AlignedClassifier, data: list[Sample]) -> list[float]:
    """Per-step seconds of a Lightning fit over pre-made batches (logging and metrics on)."""
    timer = _StepTimer()
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    loader = DataLoader(_ListDataset(data), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.times


def config_model(name: str) -> tuple[str, dict]:
    """``(arch, arch_args)`` of a shipped config's model."""
    model = yaml.safe_load((ROOT / "configs" / name).read_text())["model"]
    return model["arch"], model.get("arch_args", {})


def measure(arch: str, arch_args: dict, batch_size: int, rounds: int, steps: int) -> dict[str, float]:
    """Interleaved medians for one architecture."""
    torch.manual_seed(0)
    full, mixed = batches(steps, batch_size, 1.0), batches(steps, batch_size, 0.25)
    plain_mod = AlignedClassifier(arch=arch, arch_args=arch_args, penalties=[])
    harm_mod = AlignedClassifier(arch=arch, arch_args=arch_args, penalties=[Harmonization(1.0)])
    mixed_mod = AlignedClassifier(arch=arch, arch_args=arch_args, penalties=[Harmonization(1.0)])
    light_mod = AlignedClassifier(arch=arch, arch_args=arch_args, penalties=[Harmonization(1.0)],
                                  optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    hand_model = build_model(arch, num_classes=10, **arch_args)
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in
            (("plain", plain_mod), ("harmonized", harm_mod), ("mixed25", mixed_mod), ("hand", hand_model))}
    samples: dict[str, list[float]] = {k: [] for k in ("plain", "harmonized", "mixed25", "handwritten", "lightning")}
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        got = {
            "plain": time_module_steps(plain_mod, full, opts["plain"]),
            "harmonized": time_module_steps(harm_mod, full, opts["harmonized"]),
            "mixed25": time_module_steps(mixed_mod, mixed, opts["mixed25"]),
            "handwritten": time_handwritten(hand_model, full, opts["hand"], 1.0),
            "lightning": time_lightning(light_mod, full),
        }
        if r:
            for k, v in got.items():
                samples[k] += v[1:]  # the first step of each round pays allocator warm-up
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "plain_ms": 1e3 * med["plain"], "harmonized_ms": 1e3 * med["harmonized"], "mixed25_ms": 1e3 * med["mixed25"],
        "handwritten_ms": 1e3 * med["handwritten"], "lightning_ms": 1e3 * med["lightning"],
        "harmonized_over_plain": med["harmonized"] / med["plain"],
        "mixed25_over_plain": med["mixed25"] / med["plain"],
        "module_over_handwritten": med["lightning"] / med["handwritten"],
    }


def main() -> None:
    """Measure the default digits model (and the unconstrained twin), print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_cost.json"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--malloc", choices=["retain", "system"], default="retain",
                        help='"retain" (default): glibc keeps freed memory, as the harmonia command sets it (harmonia/allocator.py); "system": malloc untouched')
    args = parser.parse_args()
    malloc = "retain" if args.malloc == "retain" and retain_freed_memory() else "system"
    models = dict(map(config_model, ("digits.yaml", "digits_cnn_harmonized.yaml")))  # arch → arch_args
    per_arch = {arch: measure(arch, arch_args, args.batch_size, args.rounds, args.steps) for arch, arch_args in models.items()}
    default = per_arch["lipschitz_cnn"]
    result = {key: default[key] for key in ("harmonized_over_plain", "mixed25_over_plain", "module_over_handwritten")}
    result.update({"model": "lipschitz_cnn (configs/digits.yaml)", "arch_args": models, "batch_size": args.batch_size, "threads": torch.get_num_threads(), "malloc": malloc, "per_arch": per_arch})
    print(f"\nbatch {args.batch_size}, {torch.get_num_threads()} threads, malloc {malloc}, medians of {args.rounds}×{args.steps - 1} interleaved steps")
    print("| model | plain ms | harmonized ms | 25% mapped ms | hand-written ms | Lightning ms | harmonized/plain (≤2.5) | mixed25/plain (≤1.5) | module/hand-written (≤1.05) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch, m in per_arch.items():
        print(f"| {arch} | {m['plain_ms']:.1f} | {m['harmonized_ms']:.1f} | {m['mixed25_ms']:.1f} | {m['handwritten_ms']:.1f} | {m['lightning_ms']:.1f} "
              f"| {m['harmonized_over_plain']:.2f} | {m['mixed25_over_plain']:.2f} | {m['module_over_handwritten']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
