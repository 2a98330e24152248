"""Peak memory of a harmonized training step ÷ a plain one, ResNet-18, with and without checkpointing.

    python benchmarks/finetune_memory.py --out F.json [--batch 16 --size 224 --rounds 3 --frozen-bn]

Writes ``{"harmonized_over_plain_mem": …, "harmonized_checkpointed_over_plain_mem": …}`` (plus
the per-variant numbers). One step = ``AlignedClassifier``'s training step (cross-entropy with
label smoothing, λ = 1, every sample mapped; λ = 0 for *plain*) + backward + an SGD
Nesterov-momentum update, on ``resnet18`` (1,000 classes) at the same batch for every variant.

How memory is measured (each variant × round in a fresh subprocess, after one warm-up step,
variants interleaved, medians over rounds):
- *resident*: bytes allocated before the step (weights, BatchNorm buffers, momentum, batch);
- *step peak*: the peak of bytes allocated during the step above that level (activations,
  gradients, temporaries). CUDA: ``torch.cuda.max_memory_allocated() − memory_allocated()``.
  CPU: torch has no CPU allocator statistics, so the step runs under ``torch.profiler`` with
  ``profile_memory=True``, whose ``[memory]`` events carry the CPU allocator's running total of
  blocks allocated since profiling began; its maximum is the step peak (frees of blocks
  allocated earlier are not seen, so the number is an upper bound). Process RSS is not used:
  the C allocator keeps freed pages, so RSS above the pre-step level under-reports.
- headline ratio: (resident + step peak) of a variant ÷ that of *plain*: what the device must
  hold. The table also shows the step-peak ratio (activations only), the stricter number.

*frozen BN* rows (``--frozen-bn``) put BatchNorm layers in eval mode (running statistics, common when
fine-tuning): BatchNorm's double backward in training mode needs several input-sized
temporaries at the 112×112 stem, which dominates the harmonized peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (λ, checkpointing, frozen BN)
    "plain": (0.0, False, False),
    "harmonized": (1.0, False, False),
    "harmonized_checkpointed": (1.0, True, False),
    "plain_frozen_bn": (0.0, False, True),
    "harmonized_frozen_bn": (1.0, False, True),
    "harmonized_checkpointed_frozen_bn": (1.0, True, True),
}


def _one(variant: str, batch: int, size: int, device: str) -> dict[str, float]:
    """Measure one variant in this process (run through a fresh subprocess by ``main``)."""
    import torch

    from harmonia.data.sample import Sample
    from harmonia.losses import CrossEntropy, Harmonization
    from harmonia.module import AlignedClassifier

    warnings.filterwarnings("ignore")  # self.log without a Trainer
    torch.manual_seed(0)
    lam, checkpointing, frozen_bn = VARIANTS[variant]
    module = AlignedClassifier(arch="resnet18", num_classes=1000, arch_args={"checkpointing": checkpointing},
                               penalties=[Harmonization(lam)] if lam > 0 else [],
                               objective=CrossEntropy(label_smoothing=0.1)).to(device)
    module.train()
    if frozen_bn:
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-5)
    g = torch.Generator().manual_seed(0)
    sample = Sample(torch.rand(batch, 3, size, size, generator=g), torch.rand(batch, 1, size, size, generator=g),
                    torch.ones(batch, dtype=torch.bool), torch.randint(0, 1000, (batch,), generator=g))
    sample = Sample(*(t.to(device) for t in sample))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module._step(sample, "train").backward()
        optimizer.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: momentum buffers, lazy kernels
    sync()
    start = time.perf_counter()
    step()
    sync()
    seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - resident
    else:
        tensors = [*module.parameters(), *module.buffers(), *sample,
                   *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
        resident = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())
        with tempfile.TemporaryDirectory() as tmp:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
        peak = max(totals, default=0)
    return {"resident_mb": resident / 2**20, "step_peak_mb": peak / 2**20,
            "total_mb": (resident + peak) / 2**20, "step_s": seconds}


def main() -> None:
    """Run every variant × round in a fresh subprocess, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/finetune_memory.json")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frozen-bn", action="store_true", help="also the variants with BatchNorm in eval mode")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_one(args._one, args.batch, args.size, args.device)))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    variants = [v for v in VARIANTS if args.frozen_bn or not v.endswith("frozen_bn")]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants:
            cmd = [sys.executable, __file__, "--_one", variant, "--batch", str(args.batch), "--size", str(args.size),
                   "--device", device, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {variant}: {runs[variant][-1]}", file=sys.stderr, flush=True)
    med = {v: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for v, rs in runs.items()}
    result: dict[str, object] = {
        "harmonized_over_plain_mem": med["harmonized"]["total_mb"] / med["plain"]["total_mb"],
        "harmonized_checkpointed_over_plain_mem": med["harmonized_checkpointed"]["total_mb"] / med["plain"]["total_mb"],
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "batch": args.batch, "size": args.size, "rounds": args.rounds, "variants": med,
    }
    header = "| variant | resident MB | step peak MB | total MB | total ÷ plain | step peak ÷ plain | step s |"
    print(f"\nResNet-18, batch {args.batch}, {args.size}×{args.size}, {result['device']}, medians of {args.rounds}\n")
    print(header + "\n|" + "---|" * 7)
    for v, m in med.items():
        base = med["plain_frozen_bn" if v.endswith("frozen_bn") else "plain"]
        print(f"| {v} | {m['resident_mb']:.0f} | {m['step_peak_mb']:.0f} | {m['total_mb']:.0f} | "
              f"{m['total_mb'] / base['total_mb']:.2f} | {m['step_peak_mb'] / base['step_peak_mb']:.2f} | {m['step_s']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)  # atomic: a reader never sees half a file
    print(f"\nharmonized / plain: {result['harmonized_over_plain_mem']:.2f}; "
          f"with checkpointing: {result['harmonized_checkpointed_over_plain_mem']:.2f} (target ≤ 1.5); wrote {out}")


if __name__ == "__main__":
    main()
