"""MACO feature visualization: what it costs, against its floor and against horama, and what it
shows of the decoy shortcut (issue #16).

1. ``maco_over_floor``: time of :func:`harmonia.visualize.run_maco` per objective ÷ time of the
   same number of plain forward + backward-to-the-input passes of the model on crops of the
   same size (``steps × crops`` per objective, the same batch shape, no MACO around them).
   Target ≤ 1.2: the parametrization, the crops and the optimizer cost at most a fifth of the
   model's own work.
2. ``maco_over_horama``: images per second of Harmonia's MACO ÷ horama 0.3's (``pip install
   horama einops``; the ``bench`` extra), same model, canvas, input size, steps, crops and noise.
   horama takes one objective per call; Harmonia draws ``--objectives`` at once (the ratio
   for one objective at a time is reported as ``maco_over_horama_single``). horama is given a
   local spectrum (``spectrum_decorrelated.npy`` in its working folder, so it downloads
   nothing), and its crop interval is corrected: its code draws crop sizes from
   ``[b1, 2·b1 − b0]`` instead of ``[b0, b1]`` (``rand·(b1−b0) + b1``), so with its default
   ``(0.20, 0.25)`` crops are 0.25–0.30 of the canvas; Harmonia is run with crops of 0.30 →
   0.25 (no jitter) so that both cut the same range. ``null`` when horama is not installed.
3. ``decoy_alpha_share_*``: on the decoy digits, the MACO pictures of the ten classes
   (small-input settings, spectrum of the training images) of a decoy-trained baseline and of
   its harmonized twin, and the share of their transparency mass that falls in the four 4×4
   decoy corners (6.25% of the canvas). Mean over classes. A baseline that reads the label
   from the decoy's shade puts more of its transparency there. Pairs (``--pairs``):
   ``lipschitz``, ``configs/digits.yaml`` (1-Lipschitz CNN + harmonization) against
   ``configs/digits_baseline.yaml``: the keys ``decoy_alpha_share_baseline`` /
   ``_harmonized``; ``cnn``, ``configs/digits_cnn_harmonized.yaml`` against
   ``configs/digits_cnn_baseline.yaml``: ``decoy_alpha_share_cnn_baseline`` / ``_cnn_harmonized``.
   Each model is trained here for ``--epochs`` epochs (the config's recipe, no logger, the
   final weights) unless a ``--ckpt-*`` option gives its checkpoint. Pictures:
   ``benchmarks/results/maco_digits_<arm>.png`` (image with transparency as alpha, over black),
   ``…_image.png`` (the image alone) and ``…_alpha.png`` (the transparency alone, each class
   scaled to its maximum); classes 0-9 from left to right.

    python benchmarks/maco_cost.py --out benchmarks/results/maco_cost.json

Timings mean something only on an otherwise idle machine. On a CPU the default ResNet-18 at
224 px is slow: ``--model digits`` times the 32×32 digits network instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # horama's progress bar

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmonia.data import DecoyDigits  # noqa: E402
from harmonia.data.digits import DECOY, decoy_origin  # noqa: E402
from harmonia.visualize import (  # noqa: E402
    SMALL_INPUT_SETTINGS,
    XPLIQUE_SETTINGS,
    ClassLogit,
    Spectrum,
    figure_grid,
    maco_figure,
    run_maco,
    save_figure,
)
from harmonia.visualize.maco import frozen  # noqa: E402


def synchronize(device: torch.device) -> None:
    """Wait for the device (timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost_model(name: str, device: torch.device) -> tuple[nn.Module, int, int]:
    """``(model, input side, default canvas side)``: torchvision's ResNet-18 (random weights, 224 px) or the digits network (32 px)."""
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(weights=None).to(device).eval(), 224, 512
    if name == "digits":
        from harmonia.models import build_model

        model = build_model("lipschitz_cnn", in_channels=3, input_size=32, widths=[32, 64], depth=2, hidden=128)
        return model.to(device).eval(), 32, 64
    raise ValueError(f"unknown --model {name!r} (resnet18 or digits)")


def local_spectrum(canvas: int, channels: int) -> Spectrum:
    """A spectrum from the embedded digits (replicated to ``channels``), resized to the canvas: local data only."""
    images = DecoyDigits("train", channels=channels).images[:256]
    return Spectrum.from_images(images, size=canvas)


def time_maco(model: nn.Module, spectrum: Spectrum, objectives: int, settings: dict, repeats: int, device: torch.device) -> float:
    """Best-of-``repeats`` seconds of one MACO run of ``objectives`` class objectives."""
    run_maco(model, [ClassLogit(i) for i in range(objectives)], spectrum, **{**settings, "steps": 2})  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run_maco(model, [ClassLogit(i) for i in range(objectives)], spectrum, **settings)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def time_floor(model: nn.Module, objectives: int, steps: int, crops: int, channels: int, side: int, repeats: int,
               device: torch.device) -> float:
    """Best-of-``repeats`` seconds of ``steps`` forward + backward-to-input passes over ``objectives × crops`` crops."""
    x = torch.rand(objectives * crops, channels, side, side, device=device)
    classes = torch.arange(objectives, device=device).repeat_interleave(crops)

    def once(count: int) -> None:
        for _ in range(count):
            inputs = x.clone().requires_grad_(True)
            logits = model(inputs)
            torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), inputs)

    with frozen(model):
        once(2)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            once(steps)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return min(times)


def time_horama(model: nn.Module, spectrum: Spectrum, steps: int, crops: int, side: int, noise: float, repeats: int,
                device: torch.device) -> float | None:
    """Best-of-``repeats`` seconds of one horama MACO run (one objective); None without horama."""
    try:
        import horama
    except ImportError as error:
        print(f"horama is not installed ({error}); `pip install horama einops` (the bench extra)")
        return None
    if spectrum.channels != 3:
        raise ValueError("horama draws RGB images only: give it a 3-channel model and spectrum")
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # horama reads spectrum_decorrelated.npy from the working folder (else it downloads it)
        try:
            np.save("spectrum_decorrelated.npy", spectrum.magnitude.numpy())

            def objective(x: torch.Tensor) -> torch.Tensor:
                return model(x)[:, 0].mean()

            args = {"objective_function": objective, "learning_rate": 1.0, "image_size": spectrum.size[0],
                    "model_input_size": side, "noise": noise, "values_range": (0.0, 1.0), "crops_per_iteration": crops,
                    "box_size": (0.20, 0.25), "device": str(device)}
            horama.maco(total_steps=2, **args)  # warm-up
            times = []
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                horama.maco(total_steps=steps, **args)
                synchronize(device)
                times.append(time.perf_counter() - start)
        finally:
            os.chdir(here)
    return min(times)


def cost(args: argparse.Namespace, device: torch.device) -> dict:
    """Parts 1 and 2: MACO ÷ floor, MACO ÷ horama."""
    model, side, canvas = cost_model(args.model, device)
    canvas = args.canvas or canvas
    spectrum = local_spectrum(canvas, 3)
    settings = {**XPLIQUE_SETTINGS, "steps": args.steps, "crops": args.crops, "input_size": side}
    maco_seconds = time_maco(model, spectrum, args.objectives, settings, args.repeats, device)
    floor_seconds = time_floor(model, args.objectives, args.steps, args.crops, 3, side, args.repeats, device)
    out = {
        "model": args.model, "device": str(device), "canvas": canvas, "input": side, "steps": args.steps,
        "crops": args.crops, "objectives": args.objectives,
        "maco_seconds_per_objective": maco_seconds / args.objectives,
        "floor_seconds_per_objective": floor_seconds / args.objectives,
        "maco_over_floor": maco_seconds / floor_seconds,
    }
    print(f"MACO {maco_seconds / args.objectives:.3f} s/objective, floor {floor_seconds / args.objectives:.3f} s: "
          f"{out['maco_over_floor']:.3f}× (target ≤ 1.2)")
    if args.skip_horama:
        out["maco_over_horama"] = None
        return out
    # Same crop range as horama really draws (0.25–0.30), same noise; batched and one at a time.
    same = {**settings, "box": (0.30, 0.25), "box_jitter": 0.0, "noise": args.horama_noise}
    batched = time_maco(model, spectrum, args.objectives, same, args.repeats, device) / args.objectives
    single = time_maco(model, spectrum, 1, same, args.repeats, device)
    horama_seconds = time_horama(model, spectrum, args.steps, args.crops, side, args.horama_noise, args.repeats, device)
    out.update({
        "horama_seconds_per_objective": horama_seconds,
        "maco_seconds_per_objective_horama_settings": batched,
        "maco_seconds_single_objective_horama_settings": single,
        "maco_over_horama": None if horama_seconds is None else horama_seconds / batched,
        "maco_over_horama_single": None if horama_seconds is None else horama_seconds / single,
    })
    if horama_seconds is not None:
        print(f"horama {horama_seconds:.3f} s/objective; Harmonia {batched:.3f} s ({args.objectives} at once), "
              f"{single:.3f} s (one): {out['maco_over_horama']:.2f}× / {out['maco_over_horama_single']:.2f}× "
              "the images per second (target ≥ 1.5)")
    return out


def decoy_mask(size: int = 32) -> torch.Tensor:
    """``(size, size)`` bool: the four corners where a decoy square can sit."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    for corner in range(4):
        top, left = decoy_origin(corner)
        mask[top : top + DECOY, left : left + DECOY] = True
    return mask


def trained_model(config: str, epochs: int, ckpt: str | None, seed: int) -> nn.Module:
    """The classifier of ``config``: loaded from ``ckpt``, or trained for ``epochs`` as ``harmonia fit`` would (no logger)."""
    import pytorch_lightning as pl

    from harmonia.module import AlignedClassifier
    from harmonia.train import cli_main

    if ckpt:
        return AlignedClassifier.load_from_checkpoint(ckpt, map_location="cpu").model.eval()
    cli = cli_main(["--config", str(ROOT / config), f"--seed_everything={seed}", "--trainer.logger=false",
                    f"--trainer.max_epochs={epochs}"], run=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model.model.eval()


PAIRS = {
    # pair: (baseline config, harmonized config, JSON key prefix)
    "lipschitz": ("configs/digits_baseline.yaml", "configs/digits.yaml", "decoy_alpha_share_"),
    "cnn": ("configs/digits_cnn_baseline.yaml", "configs/digits_cnn_harmonized.yaml", "decoy_alpha_share_cnn_"),
}


def decoy(args: argparse.Namespace) -> dict:
    """Part 3: pictures and decoy-corner transparency share of each pair's baseline and harmonized model."""
    results_dir = Path(args.results_dir)
    spectrum = Spectrum.from_images(DecoyDigits("train", seed=args.seed).images)
    mask = decoy_mask()
    out: dict = {"uniform_share": float(mask.float().mean()), "epochs": args.epochs}
    ckpts = {("lipschitz", "baseline"): args.ckpt_baseline, ("lipschitz", "harmonized"): args.ckpt_harmonized,
             ("cnn", "baseline"): args.ckpt_cnn_baseline, ("cnn", "harmonized"): args.ckpt_cnn_harmonized}
    for pair in args.pairs:
        baseline_config, harmonized_config, prefix = PAIRS[pair]
        for arm, config in (("baseline", baseline_config), ("harmonized", harmonized_config)):
            name = arm if pair == "lipschitz" else f"{pair}_{arm}"
            ckpt = ckpts[pair, arm]
            start = time.perf_counter()
            model = trained_model(config, args.epochs, ckpt, args.seed)
            trained = time.perf_counter() - start
            result = run_maco(model, [ClassLogit(c) for c in range(10)], spectrum, seed=args.seed, **SMALL_INPUT_SETTINGS)
            alpha = result.alpha.mean(1)  # (10, 32, 32)
            shares = (alpha * mask).flatten(1).sum(1) / alpha.flatten(1).sum(1)
            # Over black, the digits' own background: what shows is bright and looked at.
            pictures = maco_figure(result.image, result.alpha, background=0.0)
            save_figure(figure_grid(pictures, cell=96, fill=0.0), results_dir / f"maco_digits_{name}.png")
            plain = result.image.expand(-1, 3, -1, -1)  # the image alone, in the model's [0, 1] range
            save_figure(figure_grid(plain, cell=96, fill=0.0), results_dir / f"maco_digits_{name}_image.png")
            heat = (alpha / alpha.flatten(1).amax(1)[:, None, None])[:, None].expand(-1, 3, -1, -1)
            save_figure(figure_grid(heat, cell=96, fill=0.0), results_dir / f"maco_digits_{name}_alpha.png")
            out[f"{prefix}{arm}"] = float(shares.mean())
            out[name] = {"config": config, "ckpt": ckpt, "per_class": [round(float(x), 4) for x in shares],
                         "train_seconds": round(trained, 1)}
            print(f"{name} ({config}): decoy-corner transparency share {shares.mean():.3f} "
                  f"(per class {[round(float(x), 3) for x in shares]}; uniform {out['uniform_share']:.4f})", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the requested parts and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--model", default="resnet18", help="cost model: resnet18 (224 px) or digits (32 px)")
    parser.add_argument("--canvas", type=int, default=None, help="canvas side (default: 512 for resnet18, 64 for digits)")
    parser.add_argument("--steps", type=int, default=32, help="MACO steps per timed run")
    parser.add_argument("--crops", type=int, default=32, help="crops per step and objective")
    parser.add_argument("--objectives", type=int, default=4, help="objectives drawn at once by Harmonia")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is kept)")
    parser.add_argument("--horama-noise", type=float, default=0.05, help="noise of the horama comparison (horama's default)")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-horama", action="store_true")
    parser.add_argument("--skip-decoy", action="store_true")
    parser.add_argument("--pairs", nargs="+", default=["lipschitz", "cnn"], choices=sorted(PAIRS),
                        help="decoy pairs: lipschitz (digits_baseline.yaml vs digits.yaml; the required JSON keys), "
                             "cnn (digits_cnn_baseline.yaml vs digits_cnn_harmonized.yaml)")
    parser.add_argument("--ckpt-baseline", default=None, help="checkpoint of the lipschitz baseline (skips its training)")
    parser.add_argument("--ckpt-harmonized", default=None)
    parser.add_argument("--ckpt-cnn-baseline", default=None)
    parser.add_argument("--ckpt-cnn-harmonized", default=None)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of each decoy arm (without --ckpt-*)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    results: dict = {"maco_over_floor": None, "maco_over_horama": None,
                     "decoy_alpha_share_baseline": None, "decoy_alpha_share_harmonized": None}
    if not args.skip_cost:
        results.update(cost(args, device))
    if not args.skip_decoy:
        results.update(decoy(args))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(args.out)
    print(json.dumps({k: results[k] for k in ("maco_over_floor", "maco_over_horama", "decoy_alpha_share_baseline",
                                              "decoy_alpha_share_harmonized")}, indent=2))
    return results


if __name__ == "__main__":
    main()
