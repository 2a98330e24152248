"""ClickMe records → training batches: images per second per DataLoader worker, next to the decode floor.

    python benchmarks/data_throughput.py --out F.json [--count 512 --batch 64 --rounds 5 --size 224]

Writes ``--count`` synthetic ClickMe records (``harmonia.data.synthetic``: photo-like JPEG image
at quality 90 + JPEG heatmap, ``--size`` px, 224 by default) to a temporary folder, then measures
in interleaved rounds (medians):

- ``decode_floor``: the plain decode of the same records in this process, one thread: each
  record's bytes already in memory, its image and heatmap JPEGs decoded by libjpeg-turbo (the
  decoder the pipeline uses), nothing else. No reader can beat it by much.
- ``decode_path``: ``ClickMeRecords[i]`` for every record in this process, one thread: what a
  worker does per record (file read, both CRCs, Example parsing, image decode, map decode,
  checks, the map's 64-px resize), without the DataLoader.
- ``loader``: one epoch through a real ``DataLoader`` with ``--workers`` worker processes
  (1 by default), the DataLoader's own collate and shared memory (pinned when CUDA is present),
  wall clock, divided by the number of workers: **``loader_images_per_second_per_worker``**.
  The target is ≥ 1,000 images/s per worker at 224 px with maps.
- ``loader_worker_cpu``: the CPU time the worker processes spent in that epoch (all their
  threads), a figure load on the machine barely changes.
- ``device_stage``: what ``ClickMeDataModule.on_after_batch_transfer`` then does with a training
  batch (map blur, crop, flip, float images: ``finish_clickme_batch``), on this CPU with one
  thread, and on CUDA when present (batches already there; ``torch.cuda.synchronize``).

Run it on an idle machine for numbers worth reporting (``--rounds 7`` or more).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import simplejpeg
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmonia.allocator import retain_freed_memory  # noqa: E402
from harmonia.data import ClickMeRecords, JointTransform, collate_samples, finish_clickme_batch  # noqa: E402
from harmonia.data.synthetic import write_synthetic_clickme  # noqa: E402

TARGET = 1000.0  # images/s per worker


def _process_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of process ``pid`` (Linux schedstat, nanosecond resolution)."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _device_stage_cuda(batches: list, transform: JointTransform, rounds: int, count: int) -> float:
    """Median seconds per image of the device stage on CUDA, batches already on the GPU."""
    on_gpu = [type(b)(*(t.cuda() for t in b)) for b in batches]
    times = []
    for step in range(rounds + 1):  # the first round warms up kernels and caches
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in on_gpu:
            finish_clickme_batch(batch, transform)
        torch.cuda.synchronize()
        if step:
            times.append((time.perf_counter() - start) / count)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON output file")
    parser.add_argument("--count", type=int, default=512, help="records (one epoch)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224, help="side of the records' images and heatmaps")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--malloc", choices=["retain", "system"], default="retain",
                        help='"retain": glibc keeps freed memory, as the harmonia command sets it at start-up '
                             '(harmonia/allocator.py; forked workers inherit it); "system": malloc untouched')
    args = parser.parse_args()
    if args.count < args.batch or args.workers < 1:
        parser.error("--count must be at least --batch, --workers at least 1")
    malloc = "retain" if args.malloc == "retain" and retain_freed_memory() else "system"
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_clickme(Path(tmp) / "bench.tfrecords", args.count, size=args.size, num_classes=1000)
        record_kb = path.stat().st_size / args.count / 1024
        dataset = ClickMeRecords(path, num_classes=1000, index_dir=tmp)
        encoded = [dataset.record(i) for i in range(len(dataset))]  # the JPEG bytes, in memory

        def decode_floor() -> None:
            for record in encoded:
                simplejpeg.decode_jpeg(record.image, colorspace="RGB")
                simplejpeg.decode_jpeg(record.heatmap, colorspace="GRAY")

        def decode_path() -> None:
            for i in range(len(dataset)):
                dataset[i]

        loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                            collate_fn=collate_samples, persistent_workers=True, pin_memory=torch.cuda.is_available())
        kept: list = []
        worker_cpu: list[float] = []

        def run_loader() -> None:
            """One epoch; the workers' CPU time per image, once they exist (from the second call)."""
            iterator = loader._iterator  # persistent workers: made by the first (warm-up) epoch
            pids = [w.pid for w in iterator._workers] if iterator is not None else []
            before = sum(_process_cpu_seconds(pid) for pid in pids)
            kept[:] = [batch for batch in loader]
            if pids:
                worker_cpu.append((sum(_process_cpu_seconds(pid) for pid in pids) - before) / args.count)

        train = JointTransform(224, train=True)
        variants: dict[str, Callable[[], object]] = {
            "decode_floor": decode_floor,
            "decode_path": decode_path,
            "loader": run_loader,
            "device_stage": lambda: [finish_clickme_batch(batch, train) for batch in kept],
        }
        for fn in variants.values():  # warm-up: page cache, index, allocator, the loader's workers
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(_timed(fn) / args.count)
        cuda = _device_stage_cuda(kept, train, args.rounds, args.count) if torch.cuda.is_available() else None

    seconds = {name: statistics.median(values) for name, values in times.items()}
    per_worker = {
        "decode_floor": 1.0 / seconds["decode_floor"],
        "decode_path": 1.0 / seconds["decode_path"],
        "loader": 1.0 / (seconds["loader"] * args.workers),
        "loader_worker_cpu": 1.0 / (statistics.median(worker_cpu) / args.workers),
    }
    result = {
        "loader_images_per_second_per_worker": per_worker["loader"],
        "loader_worker_cpu_images_per_second": per_worker["loader_worker_cpu"],
        "decode_floor_images_per_second": per_worker["decode_floor"],
        "decode_path_images_per_second": per_worker["decode_path"],
        "loader_over_floor": per_worker["loader"] / per_worker["decode_floor"],
        "target_images_per_second_per_worker": TARGET,
        "meets_target": per_worker["loader"] >= TARGET,
        "device_stage_ms_per_image_cpu": 1e3 * seconds["device_stage"],
        "device_stage_ms_per_image_cuda": None if cuda is None else 1e3 * cuda,
        "count": args.count, "size": args.size, "batch": args.batch, "workers": args.workers, "rounds": args.rounds,
        "record_kb": record_kb, "malloc": malloc, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    rows = [
        ("decode_floor", "image + heatmap JPEG decode, bytes in memory, this process", per_worker["decode_floor"]),
        ("decode_path", "`ClickMeRecords[i]`, this process (read, CRCs, parse, decode, checks, 64-px map)",
         per_worker["decode_path"]),
        ("loader", f"real DataLoader, {args.workers} worker(s), own collate, wall clock, per worker",
         per_worker["loader"]),
        ("loader_worker_cpu", "the same, CPU time of the worker process(es), per worker", per_worker["loader_worker_cpu"]),
    ]
    print(f"{args.count} synthetic ClickMe records of {record_kb:.1f} KB ({args.size}×{args.size} JPEG image + "
          f"heatmap), batches of {args.batch}, {args.rounds} interleaved rounds, medians, malloc {malloc}")
    print("| variant | what | ms / image | images / s | vs floor |")
    print("|---|---|---|---|---|")
    for name, what, rate in rows:
        print(f"| {name} | {what} | {1e3 / rate:.3f} | {rate:.0f} | {rate / per_worker['decode_floor']:.2f} |")
    print(f"| device_stage | training batch finished on this CPU, 1 thread | {1e3 * seconds['device_stage']:.3f} | "
          f"{1 / seconds['device_stage']:.0f} | — |")
    if cuda is not None:
        print(f"| device_stage_cuda | the same on {result['cuda_device']} | {1e3 * cuda:.4f} | {1 / cuda:.0f} | — |")
    print(f"loader_images_per_second_per_worker = {per_worker['loader']:.0f} (target ≥ {TARGET:.0f}: "
          f"{'met' if result['meets_target'] else 'NOT met'})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
