"""EVA on the default digits model: how tight are its bounds, does it rank like an attack, what does it cost?

On the model of ``configs/digits.yaml`` (trained here for ``--epochs`` epochs, or loaded with
``--ckpt``) and the first ``--images`` test digits (target = the predicted class):

- **Tightness** at ε ∈ {0.01, 0.03, 0.1} (L∞, images in [0, 1]): how far the verified
  adversarial overlap rises above its clean value, divided by how far a PGD attack raises it,
  ``Σ (AO_bound − AO_clean) / Σ (AO_pgd − AO_clean)`` over the images (≥ 1 when sound; 1 = exact).
  Shown for EVA's bound (CROWN + interval + Lipschitz caps, the minimum), the same with
  α-CROWN, and for CROWN alone, α-CROWN alone, interval bounds alone and the certificate alone
  (``margin + c·‖ε‖₂``). ``--crown-max-neurons 0`` would give every hidden layer interval
  bounds; a large value (or ``-1``: all) CROWN bounds on every layer (tighter, slower).
- **Soundness**: ``pgd_violations`` counts (image, class, ε) where the attack exceeds the bound
  by more than ``1e-5·(1 + |value|)`` (float32 rounding); it must be 0.
- **Rank agreement** at ε = 0.03: Spearman correlation, per image, of EVA's region importance
  (``grid × grid`` cells) with the PGD-estimated importance ``AO_pgd(B) − AO_pgd(B∖u)``; the
  mean over images (an image whose EVA map is constant counts as 0). EVA ranks by CROWN's
  bounds (its default); ``eva_tightest`` compares the tightest bounds (Lipschitz caps included).
- **Cost**: EVA time per image ÷ Sobol attribution time per image (Harmonia's
  ``SobolAttribution``, same grid, its defaults), interleaved rounds, medians.
- **Fidelity**: Deletion / Insertion / MuFidelity (registry defaults) of EVA next to saliency,
  Integrated Gradients and Sobol on the same probe.

    python benchmarks/eva_cost.py --out benchmarks/results/eva_cost.json
    python benchmarks/eva_cost.py --ckpt runs/digits/checkpoints/best.ckpt --out F.json

Writes ``{"bound_over_pgd_eps003", "rank_agreement_eps003", "eva_over_sobol_time",
"pgd_violations", ...details}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmonia.data.digits import DecoyDigits  # noqa: E402
from harmonia.explain import IntegratedGradients, Saliency, SobolAttribution  # noqa: E402
from harmonia.metrics import build_metric  # noqa: E402
from harmonia.metrics.correlation import spearman_rows  # noqa: E402
from harmonia.verify import EVA, box_radius, cell_masks, overlap, pgd_margins  # noqa: E402

EPSILONS = (0.01, 0.03, 0.1)


def trained_model(config: Path, epochs: int, ckpt: Path | None, device: torch.device) -> torch.nn.Module:
    """The config's classifier: loaded from ``ckpt`` (Lightning checkpoint or state dict) or trained briefly."""
    import pytorch_lightning as pl

    from harmonia.train import cli_main

    cli = cli_main(["--config", str(config), "--trainer.logger=false", f"--trainer.max_epochs={epochs}"], run=False)
    module = cli.model
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if any(k.startswith("model.") for k in state):
            module.load_state_dict(state, strict=False)
        else:
            module.model.load_state_dict(state)
    else:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                             num_sanity_val_steps=0)
        trainer.fit(module, datamodule=cli.datamodule)
    return module.model.to(device).eval()


def clean_overlap(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``max_{k≠c} f_k(x) − f_c(x)`` per image."""
    with torch.no_grad():
        logits = model(x)
    return overlap(logits - logits.gather(1, target[:, None]), target)


def tightness(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, eva: EVA, pgd_steps: int,
              restarts: int, epsilons: tuple[float, ...] = EPSILONS) -> tuple[dict, int]:
    """Bound ÷ attack gain per ε and bound kind; and the number of soundness violations.

    Kinds: ``eva`` (the tightest bound with CROWN: what EVA's overlaps use), ``eva_alpha``
    (the same with α-CROWN), ``crown`` and ``alpha_crown`` alone, ``interval`` alone,
    ``certificate`` alone.
    """
    net = eva.network(model, x)
    base = clean_overlap(model, x, target)
    out, violations = {}, 0
    for eps in epsilons:
        radius = box_radius(x, eps)
        state = net.bound(x - radius, x + radius, eva.intermediate, eva.crown_max_neurons)
        attack = pgd_margins(model, x, target, eps, steps=pgd_steps, restarts=restarts)
        gain = float((overlap(attack, target) - base).sum())
        row = {"pgd_gain": gain / len(x)}
        for method, suffix in (("crown", ""), ("alpha-crown", "_alpha")):
            margins = net.margins(state, target, method, eva.alpha_steps, eva.alpha_lr)
            bound = margins.upper(radius)
            linear = margins.linear_at_center() + (margins.coef.abs().flatten(2) * radius.flatten(1)[:, None]).sum(2)
            violations += int((attack > bound + 1e-5 * (1 + bound.abs())).sum())
            kinds = [(f"eva{suffix}", bound), ("crown" if not suffix else "alpha_crown", linear)]
            if not suffix:
                cap = margins.margin + margins.lipschitz * radius.flatten(1).norm(dim=1, keepdim=True)
                kinds += [("interval", margins.interval), ("certificate", cap)]
            for kind, value in kinds:
                row[kind] = float((overlap(value, target) - base).sum()) / gain if gain > 0 else math.inf
        out[f"eps{eps}"] = row
    return out, violations


def rank_agreement(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, eva: EVA, pgd_steps: int) -> dict[str, float]:
    """Mean per-image Spearman correlation of EVA's cell importance with PGD-estimated importance."""
    g = eva.grid_size
    masks = cell_masks(g, *x.shape[-2:], x.device)
    estimated = []
    for i in range(len(x)):
        xi, ti = x[i : i + 1], target[i : i + 1]
        full = pgd_margins(model, xi, ti, eva.epsilon, steps=pgd_steps, restarts=2)
        classes = torch.zeros_like(full, dtype=torch.bool)
        classes[0, full[0].topk(min(4, full.shape[1])).indices] = True  # the most threatening classes
        sub = pgd_margins(model, xi.expand(g * g, -1, -1, -1), ti.expand(g * g), eva.epsilon, mask=1 - masks,
                          steps=pgd_steps, restarts=1, classes=classes.expand(g * g, -1))
        estimated.append(overlap(full, ti) - overlap(sub, ti.expand(g * g)))
    estimated = torch.stack(estimated).float()
    out = {}
    for label, explainer in (("eva", eva), ("eva_tightest", _tightest(eva))):
        importance = explainer.region_importance(model, x, target).flatten(1).float()
        rho = spearman_rows(importance.cpu(), estimated.cpu())
        constant = importance.std(1) == 0
        out[label] = float(torch.where(constant.cpu() | rho.isnan(), torch.zeros_like(rho), rho).mean())
        out[f"{label}_constant_maps"] = int(constant.sum())
    return out


def _tightest(eva: EVA) -> EVA:
    """The same EVA comparing the tightest bounds (caps included) instead of CROWN's."""
    return EVA(epsilon=eva.epsilon, grid_size=eva.grid_size, intermediate=eva.intermediate,
               crown_max_neurons=eva.crown_max_neurons, importance="tightest", batch_size=eva.batch_size)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def cost(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, eva: EVA, sobol: SobolAttribution,
         rounds: int) -> dict[str, float]:
    """Seconds per image of EVA and Sobol, interleaved rounds, medians."""
    times: dict[str, list[float]] = {"eva": [], "sobol": []}
    eva.attribute(model, x[:1], target[:1])
    sobol.attribute(model, x[:1], target[:1])  # warm-up
    for _ in range(rounds):
        for name, method in (("eva", eva), ("sobol", sobol)):
            _sync(x.device)
            start = time.perf_counter()
            method.attribute(model, x, target)
            _sync(x.device)
            times[name].append((time.perf_counter() - start) / len(x))
    eva_s, sobol_s = statistics.median(times["eva"]), statistics.median(times["sobol"])
    return {"eva_s_per_image": eva_s, "sobol_s_per_image": sobol_s, "ratio": eva_s / sobol_s}


def fidelity(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, methods: dict) -> dict[str, dict[str, float]]:
    """Deletion / Insertion / MuFidelity of each method's maps on the probe."""
    out = {}
    for label, method in methods.items():
        maps = method.attribute(model, x, target)
        row = {}
        for name in ("deletion", "insertion", "mufidelity"):
            metric = build_metric(name).to(x.device)
            metric.update(model, x, target, maps)
            row[name] = float(metric.compute())
        out[label] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eva_cost.json"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    parser.add_argument("--ckpt", type=Path, default=None, help="Lightning checkpoint or state dict of the model")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs when no --ckpt is given")
    parser.add_argument("--images", type=int, default=16, help="test images in the probe")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--crown-max-neurons", type=int, default=2048, help="-1: CROWN bounds for every hidden layer")
    parser.add_argument("--pgd-steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = trained_model(args.config, args.epochs, args.ckpt, device)
    for p in model.parameters():
        p.requires_grad_(False)
    test = DecoyDigits("test", seed=0)
    x = test.images[: args.images].to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    accuracy = float((target.cpu() == test.labels[: args.images]).float().mean())
    max_neurons = None if args.crown_max_neurons < 0 else args.crown_max_neurons
    eva = EVA(epsilon=0.03, grid_size=args.grid, crown_max_neurons=max_neurons)
    bounds, violations = tightness(model, x, target, eva, args.pgd_steps, restarts=3)
    ranks = rank_agreement(model, x, target, eva, max(10, args.pgd_steps // 2))
    timing = cost(model, x, target, eva, SobolAttribution(grid_size=args.grid), args.rounds)
    methods = {"eva": eva, "saliency": Saliency(), "integrated_gradients": IntegratedGradients(),
               "sobol": SobolAttribution(grid_size=args.grid)}
    scores = fidelity(model, x, target, methods)
    result = {
        "bound_over_pgd_eps003": bounds["eps0.03"]["eva"],
        "rank_agreement_eps003": ranks["eva"],
        "eva_over_sobol_time": timing["ratio"],
        "pgd_violations": violations,
        "tightness": bounds,
        "rank_agreement": ranks,
        "cost": timing,
        "fidelity": scores,
        "probe": {"images": args.images, "accuracy": accuracy, "grid": args.grid, "device": str(device),
                  "crown_max_neurons": args.crown_max_neurons, "ckpt": str(args.ckpt) if args.ckpt else None,
                  "epochs": None if args.ckpt else args.epochs, "config": str(args.config)},
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"probe: {args.images} test digits, accuracy {accuracy:.1%}, device {device}")
    print("tightness (bound gain ÷ PGD gain):")
    for eps, row in bounds.items():
        print(f"  {eps}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
    print(f"pgd_violations: {violations}")
    print("rank agreement (Spearman, ε = 0.03): " + ", ".join(f"{k} {v:.3g}" for k, v in ranks.items()))
    print(f"cost: EVA {timing['eva_s_per_image']:.3g} s/image, Sobol {timing['sobol_s_per_image']:.3g} s/image, ratio {timing['ratio']:.3g}")
    for label, row in scores.items():
        print(f"  {label:22s} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
