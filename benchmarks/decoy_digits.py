"""Decoy-digits benchmark: does harmonization remove the shortcut? (issue #2)

Trains, with the same budget and 3 seeds each:
- ``baseline``: the plain CNN, λ = 0, on the decoyed training split (learns the shortcut);
- ``harmonized_cnn``: the same CNN with the harmonization loss;
- ``harmonized_lipschitz``: the 1-Lipschitz CNN with the harmonization loss;
- ``oracle``: the plain CNN, λ = 0, trained with random-shade decoys (no shortcut to learn);
plus ``baseline_lipschitz`` and ``oracle_lipschitz`` for the Lipschitz architecture.
Reports decoy-free test accuracy (test decoys are random) as mean ± std over seeds.

    python benchmarks/decoy_digits.py --out benchmarks/results/decoy_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from harmonia.data import DecoyDigitsDataModule
from harmonia.module import AlignedClassifier

# variant: (arch, λ, train decoy)
VARIANTS = {
    "baseline": ("cnn", 0.0, "label"),
    "harmonized_cnn": ("cnn", None, "label"),
    "harmonized_lipschitz": ("lipschitz_cnn", None, "label"),
    "oracle": ("cnn", 0.0, "random"),
    "baseline_lipschitz": ("lipschitz_cnn", 0.0, "label"),
    "oracle_lipschitz": ("lipschitz_cnn", 0.0, "random"),
}


def run(arch: str, lam: float, decoy: str, seed: int, epochs: int, lr: float, saliency: str, select: str) -> float:
    """Train one variant; return its test accuracy (decoy shade independent of the label).

    ``select="best"`` tests the epoch with the best validation accuracy (validation decoys are
    random too, as in the shipped configs' ModelCheckpoint); ``"last"`` the final weights.
    """
    pl.seed_everything(seed, verbose=False)
    data = DecoyDigitsDataModule(batch_size=64, seed=seed, train_decoy=decoy)
    module = AlignedClassifier(
        arch=arch,
        lambda_harmonization=lam,
        saliency=saliency,
        optimizer=lambda params: torch.optim.Adam(params, lr=lr),
    )
    with tempfile.TemporaryDirectory() as tmp:
        best = ModelCheckpoint(dirpath=tmp, monitor="val/acc", mode="max")
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[best],
            enable_checkpointing=True, enable_progress_bar=False, enable_model_summary=False,
            inference_mode=False, num_sanity_val_steps=0, limit_val_batches=1.0 if select == "best" else 0,
        )
        trainer.fit(module, datamodule=data)
        ckpt = "best" if select == "best" else None
        return float(trainer.test(module if ckpt is None else None, datamodule=data, ckpt_path=ckpt, verbose=False)[0]["test/acc"])


def main() -> None:
    """Run every variant over the seeds, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decoy_digits.json"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lam", type=float, default=1.0, help="λ of the harmonized variants")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--saliency", choices=["signed", "abs"], default="signed")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--select", choices=["best", "last"], default="best", help="epoch tested: best validation accuracy, or last")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    results: dict[str, dict] = {}
    for name in args.variants:
        arch, lam, decoy = VARIANTS[name]
        lam = args.lam if lam is None else lam
        start = time.perf_counter()
        accs = [run(arch, lam, decoy, seed, args.epochs, args.lr, args.saliency, args.select) for seed in args.seeds]
        results[name] = {
            "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "runs": accs, "arch": arch, "lambda": lam, "train_decoy": decoy,
            "seconds": time.perf_counter() - start,
        }
        print(f"{name:<22} {100 * results[name]['mean']:6.2f} ± {100 * results[name]['std']:5.2f}  {accs}", file=sys.stderr, flush=True)

    results["settings"] = {"seeds": args.seeds, "epochs": args.epochs, "lambda": args.lam, "lr": args.lr, "saliency": args.saliency, "select": args.select, "batch_size": 64}
    print("\n| variant | arch | λ | train decoy | decoy-free test accuracy (mean ± std) |")
    print("|---|---|---|---|---|")
    for name in args.variants:
        r = results[name]
        print(f"| {name} | {r['arch']} | {r['lambda']:g} | {r['train_decoy']} | {100 * r['mean']:.1f}% ± {100 * r['std']:.1f} |")
    if {"baseline", "harmonized_lipschitz", "harmonized_cnn", "oracle"} <= set(results):
        for h in ("harmonized_cnn", "harmonized_lipschitz"):
            gain = 100 * (results[h]["mean"] - results["baseline"]["mean"])
            gap = 100 * (results["oracle"]["mean"] - results[h]["mean"])
            print(f"\n{h}: +{gain:.1f} points over baseline (target ≥ 15), {gap:.1f} points below oracle (target ≤ 3)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
