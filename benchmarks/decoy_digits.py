"""Decoy-digits benchmark: does harmonization remove the shortcut?

Every arm is built from a shipped config (``configs/digits*.yaml``, what ``harmonia fit
--config`` trains), plus the command-line overrides shown in the table; the budget (epochs,
optimizer, schedule, batch) is the config's. Each architecture has its own baseline (its
harmonized config with the penalty weights at 0: ``configs/digits_cnn_baseline.yaml``,
``configs/digits_baseline.yaml``) and its own oracle (that baseline trained with random-shade
decoys), so the recipe and budget are the same by construction and every harmonized arm is
compared with the baseline *of its own architecture*. 3 seeds each; a seed sets both the
initialization and the data split (``seed_everything`` and ``data.seed``).
- ``baseline``: the unconstrained CNN, no penalty, decoyed training split (the shade tells the label);
- ``baseline_lipschitz``: the same for the 1-Lipschitz CNN;
- ``harmonized_cnn``: the CNN + the harmonization loss (configs/digits_cnn_harmonized.yaml);
- ``harmonized_lipschitz``: the 1-Lipschitz CNN + the harmonization loss (configs/digits.yaml);
- ``oracle`` / ``oracle_lipschitz``: each baseline trained with random-shade decoys (no shortcut);
- ``harmonized_rrr_cnn``: harmonization + the RRR penalty (Ross et al. 2017) on the same CNN
  (configs/digits_cnn_harmonized_rrr.yaml);
- ``harmonized_rrr_lipschitz``: the same for the 1-Lipschitz CNN (configs/digits_rrr.yaml);
optional (``--variants``): ``rrr_cnn`` (RRR instead of harmonization, configs/digits_cnn_rrr.yaml)
and ``harmonized_cnn_noshortcut`` (harmonization with random-shade training decoys: what the
loss costs when there is no shortcut at all).

Targets, per architecture: a harmonized arm gains ≥ 15 points over its own baseline where that
baseline falls ≥ 15 points below its oracle, and stays within 3 points of its own oracle
everywhere. The 1-Lipschitz baseline's own gain over the CNN baseline is reported separately:
the architecture resists the shortcut by itself.

Reported: decoy-free test accuracy (test decoys have random shades) of the weights the CLI
tests after fit (best validation accuracy; validation decoys are random too), and two probes
of shortcut reliance on the same test digits: accuracy when every decoy is repainted in the
training shade of *another* class, and the share of those predictions that follow the decoy.

    python benchmarks/decoy_digits.py --out benchmarks/results/decoy_digits.json

Every fit runs on one CPU thread (``--threads``, default 1), ``--jobs`` fits at a time in worker
processes (default: one per core). One thread per fit makes a fit's numbers independent of how
many run at once (tested: a fit in a worker equals the same fit in-process), whereas float
reductions split over two threads change a 30-epoch run by up to a point on one seed. Another
machine (CPU model, MKL/oneDNN kernels) can still give other numbers for the same seed: the
2026-12-06 table does not reproduce the 2026-11-25 one seed for seed (benchmarks/README.md).
The arms and seeds can also be run as separate invocations (``--variants``, ``--seeds``, one
``--out`` each) and merged into the one JSON with ``--merge part1.json part2.json ... --out
F.json`` (runs of the same arm are pooled by seed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from harmonia.allocator import retain_freed_memory
from harmonia.data import DecoyDigits
from harmonia.data.digits import label_shade
from harmonia.train import cli_main

ROOT = Path(__file__).resolve().parents[1]
RANDOM_DECOYS = ("--data.init_args.train_decoy=random",)


@dataclass(frozen=True)
class Arm:
    """A shipped config, the overrides that turn it into this arm, and the arm to compare with."""

    config: str
    overrides: tuple[str, ...] = ()
    oracle: str = "oracle"
    baseline: str = "baseline"


_LIP = {"oracle": "oracle_lipschitz", "baseline": "baseline_lipschitz"}
ARMS = {
    "baseline": Arm("configs/digits_cnn_baseline.yaml"),
    "baseline_lipschitz": Arm("configs/digits_baseline.yaml", **_LIP),
    "harmonized_cnn": Arm("configs/digits_cnn_harmonized.yaml"),
    "harmonized_lipschitz": Arm("configs/digits.yaml", **_LIP),
    "oracle": Arm("configs/digits_cnn_baseline.yaml", RANDOM_DECOYS),
    "oracle_lipschitz": Arm("configs/digits_baseline.yaml", RANDOM_DECOYS, **_LIP),
    "harmonized_rrr_cnn": Arm("configs/digits_cnn_harmonized_rrr.yaml"),
    "harmonized_rrr_lipschitz": Arm("configs/digits_rrr.yaml", **_LIP),
    "rrr_cnn": Arm("configs/digits_cnn_rrr.yaml"),
    "harmonized_cnn_noshortcut": Arm("configs/digits_cnn_harmonized.yaml", RANDOM_DECOYS),
}
DEFAULT_VARIANTS = ["baseline", "baseline_lipschitz", "harmonized_cnn", "harmonized_rrr_cnn", "harmonized_lipschitz",
                    "harmonized_rrr_lipschitz", "oracle", "oracle_lipschitz"]
PENALIZED = ("harmonized_cnn", "harmonized_rrr_cnn", "harmonized_lipschitz", "harmonized_rrr_lipschitz", "rrr_cnn")


def describe_penalties(module: torch.nn.Module) -> dict:
    """The table's penalty columns read from the instantiated penalties (0 where absent)."""
    by_kind = {type(p).__name__: p for p in module.penalties}
    harm, rrr = by_kind.get("Harmonization"), by_kind.get("RightReasons")
    return {
        "lambda_harmonization": harm.weight if harm is not None else 0.0,
        "harmonization_schedule": repr(harm.schedule) if harm is not None else None,
        "first_level": harm.first_level if harm is not None else None,
        "lambda_rrr": rrr.weight if rrr is not None else 0.0,
        "saliency": harm.saliency.reduction if harm is not None else None,
        "saliency_score": harm.saliency.score if harm is not None else None,
    }


@torch.no_grad()
def shortcut_probes(model: torch.nn.Module, test: DecoyDigits, seed: int) -> dict[str, float]:
    """Accuracy with each test decoy repainted in another class's training shade, and how
    often the prediction is that other class (the decoy's class); plus the same accuracy with
    the true class's training shade (what the shortcut gives when it agrees)."""
    model.eval()
    labels = test.labels
    other = (labels + torch.randint(1, 10, labels.shape, generator=torch.Generator().manual_seed(seed))) % 10
    pred_other = model(test.with_decoy_shades(label_shade(other.float()))).argmax(-1)
    pred_true = model(test.with_decoy_shades(label_shade(labels.float()))).argmax(-1)
    return {
        "acc_other_shade": (pred_other == labels).float().mean().item(),
        "follows_decoy": (pred_other == other).float().mean().item(),
        "acc_true_shade": (pred_true == labels).float().mean().item(),
    }


def run(name: str, seed: int, epochs: int | None = None) -> tuple[dict[str, float], dict]:
    """Train one arm with one seed as its config says; test the best-validation weights.

    ``epochs`` replaces the config's ``max_epochs`` (quick looks only: the schedule's
    ``T_max`` stays the config's). Returns the measurements and a description of the arm
    (read from the instantiated objects).
    """
    arm = ARMS[name]
    args = ["--config", str(ROOT / arm.config), *arm.overrides,
            f"--seed_everything={seed}", f"--data.init_args.seed={seed}", "--trainer.logger=false"]
    if epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    cli = cli_main(args, run=False)  # seeds, then builds the model and data as `harmonia fit` would
    module, data = cli.model, cli.datamodule
    with tempfile.TemporaryDirectory() as tmp:
        # The configs' selection (ModelCheckpoint on val/acc, tested after fit), written to a
        # temporary folder; no logger, so nothing is left under runs/.
        trainer = pl.Trainer(
            max_epochs=cli.trainer.max_epochs, accelerator="cpu", devices=1, logger=False,
            callbacks=[ModelCheckpoint(dirpath=tmp, monitor="val/acc", mode="max")],
            enable_progress_bar=False, enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=data)
        result = trainer.test(module, datamodule=data, ckpt_path="best", verbose=False)[0]  # loads the best weights
    out = {"acc": float(result["test/acc"]), "test_harmonization": float(result["test/harmonization"])}
    out.update(shortcut_probes(module.model, data.datasets["test"], seed))
    described = {
        "config": arm.config, "overrides": list(arm.overrides), "oracle": arm.oracle, "baseline": arm.baseline,
        "arch": module.hparams.arch, "objective": type(module.objective).__name__, **describe_penalties(module),
        "train_decoy": data.hparams.train_decoy, "epochs": cli.trainer.max_epochs, "batch_size": data.hparams.batch_size,
    }
    return out, described


def run_job(name: str, seed: int, epochs: int | None, threads: int) -> tuple[str, int, dict[str, float], dict, float]:
    """:func:`run` in a worker process with ``threads`` torch threads: ``(name, seed, measured, described, seconds)``."""
    retain_freed_memory()  # as the harmonia command does (speed only; spawned workers do not inherit it)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    measured, described = run(name, seed, epochs)
    return name, seed, measured, described, time.perf_counter() - start


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean and sample std over seeds of every measured quantity (``mean``/``std``: accuracy)."""
    out: dict[str, float] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        prefix = "" if key == "acc" else f"{key}_"
        out[f"{prefix}mean"] = statistics.mean(values)
        out[f"{prefix}std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def write_json(path: Path, results: dict) -> None:
    """Write ``results`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def merge(paths: list[Path]) -> dict[str, dict]:
    """Pool the per-seed runs of partial JSON files (same arm, different seeds) and re-summarize."""
    results: dict[str, dict] = {}
    for path in paths:
        part = json.loads(path.read_text())
        for name, arm in part.items():
            if name == "settings":
                continue
            if name not in results:
                results[name] = {**arm, "runs": [], "seeds": [], "seconds": 0.0}
            seeds = arm.get("seeds", part["settings"]["seeds"] if "settings" in part else [None] * len(arm["runs"]))
            if set(seeds) & set(results[name]["seeds"]) - {None}:
                raise ValueError(f"{path}: arm {name!r} has seeds {seeds} already merged from another file")
            described = {k: v for k, v in arm.items() if k not in ("runs", "seeds", "seconds") and not k.endswith(("mean", "std"))}
            merged = {k: v for k, v in results[name].items() if k not in ("runs", "seeds", "seconds") and not k.endswith(("mean", "std"))}
            if described != merged:
                raise ValueError(f"{path}: arm {name!r} was run with different settings than in the other files")
            results[name]["runs"] += arm["runs"]
            results[name]["seeds"] += seeds
            results[name]["seconds"] += arm["seconds"]
    for arm in results.values():
        order = sorted(range(len(arm["runs"])), key=lambda i: (arm["seeds"][i] is None, arm["seeds"][i]))
        arm["runs"] = [arm["runs"][i] for i in order]
        arm["seeds"] = [arm["seeds"][i] for i in order]
        arm.update(summarize(arm["runs"]))
    return results


def print_table(results: dict[str, dict], variants: list[str]) -> None:
    """The markdown table and the targets' lines."""
    print("\n| variant | config (+ overrides) | arch | objective | λ harm. | λ RRR | train decoy | decoy-free test acc. | other-shade acc. | follows decoy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in variants:
        r = results[name]
        config = " ".join([Path(r["config"]).name, *(o.split(".")[-1] for o in r["overrides"])])
        print(f"| {name} | {config} | {r['arch']} | {r['objective']} | {r['lambda_harmonization']:g} | {r['lambda_rrr']:g} "
              f"| {r['train_decoy']} | {100 * r['mean']:.1f}% ± {100 * r['std']:.1f} | {100 * r['acc_other_shade_mean']:.1f}% "
              f"| {100 * r['follows_decoy_mean']:.1f}% |")
    print("\nper seed:", {name: [round(100 * x["acc"], 1) for x in results[name]["runs"]] for name in variants})
    print()
    for line in target_lines(results):
        print(line)


def target_lines(results: dict[str, dict]) -> list[str]:
    """Each penalized arm against the baseline and oracle of its own architecture, and the
    1-Lipschitz architecture's own gain over the CNN baseline."""
    lines = []
    if "baseline" in results and "baseline_lipschitz" in results:
        gain = 100 * (results["baseline_lipschitz"]["mean"] - results["baseline"]["mean"])
        lines.append(f"architecture: baseline_lipschitz {gain:+.1f} points over the CNN baseline (no penalty; "
                     "the 1-Lipschitz network resists the shortcut by itself)")
    for name in PENALIZED:
        if name not in results:
            continue
        arm = results[name]
        base = arm.get("baseline", "baseline")
        oracle = arm.get("oracle", "oracle")
        parts = [name + ":"]
        if base in results:
            gain = 100 * (arm["mean"] - results[base]["mean"])
            gap = 100 * (results[oracle]["mean"] - results[base]["mean"]) if oracle in results else None
            if gap is None or gap >= 15:
                verdict = "met" if gain >= 15 else "NOT met"
                parts.append(f"{gain:+.1f} points over {base} (target ≥ +15: {verdict})")
            else:
                parts.append(f"{gain:+.1f} points over {base} ({base} is only {gap:.1f} below {oracle}: no gain target)")
        if oracle in results:
            below = 100 * (results[oracle]["mean"] - arm["mean"])
            parts.append(f"{below:.1f} points below {oracle} (target ≤ 3: {'met' if below <= 3 else 'NOT met'})")
        lines.append(" ".join(parts))
    return lines


def main() -> None:
    """Run the arms and seeds (or merge partial runs), print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decoy_digits.json"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(ARMS), default=DEFAULT_VARIANTS)
    parser.add_argument("--epochs", type=int, help="replace the configs' max_epochs (smoke runs; not for the reported table)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per fit (default 1: the setting of the published table, see above)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="fits run at once, each in its own process")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these partial JSON files into --out instead of training")
    args = parser.parse_args()
    if args.merge:
        results = merge(args.merge)
        variants = [n for n in [*DEFAULT_VARIANTS, *ARMS] if n in results]
        variants = list(dict.fromkeys(variants))
        print_table(results, variants)
        results["settings"] = {"merged": [str(p) for p in args.merge], "variants": variants}
        write_json(args.out, results)
        print(f"wrote {args.out}")
        return

    start_all = time.perf_counter()
    results: dict[str, dict] = {}
    done: dict[str, dict[int, tuple[dict[str, float], dict, float]]] = {name: {} for name in args.variants}
    jobs = [(name, seed) for name in args.variants for seed in args.seeds]
    # spawn: a fresh interpreter per worker (forking a process whose OpenMP pool has run can hang).
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs))), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_job, name, seed, args.epochs, args.threads) for name, seed in jobs]
        for future in as_completed(futures):
            name, seed, measured, described, seconds = future.result()
            done[name][seed] = (measured, described, seconds)
            print(f"{name:<26} seed {seed}: {100 * measured['acc']:6.2f}  ({time.perf_counter() - start_all:.0f} s)",
                  file=sys.stderr, flush=True)
            if len(done[name]) == len(args.seeds):  # an arm is summarized once all its seeds are in
                runs = [done[name][seed][0] for seed in args.seeds]
                results[name] = {**summarize(runs), "runs": runs, "seeds": list(args.seeds), **done[name][args.seeds[0]][1],
                                 "seconds": sum(done[name][seed][2] for seed in args.seeds)}
                write_json(args.out, {n: results[n] for n in args.variants if n in results})  # partial results survive
    elapsed = time.perf_counter() - start_all
    results = {name: results[name] for name in args.variants}
    results["settings"] = {"seeds": args.seeds, "variants": args.variants, "epochs_override": args.epochs,
                           "threads": args.threads, "jobs": args.jobs, "seconds": elapsed}
    print_table(results, args.variants)
    epochs = sorted({results[n]["epochs"] for n in args.variants})
    print(f"\n{len(args.variants)} variants × {len(args.seeds)} seeds, epochs {epochs}, "
          f"{args.threads} thread(s) per fit, {args.jobs} at once: {elapsed / 60:.1f} minutes")
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
