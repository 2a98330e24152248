"""Data pipeline throughput per worker: ClickMe records → 224-px training batches vs. JPEG decoding.

    python benchmarks/data_throughput.py --out F.json [--records 256 --rounds 7 --batch 64]

Writes realistic 256×256 ClickMe records (JPEG image q=90 + JPEG heatmap, as the released
shards; photo-like synthetic content of ImageNet-like JPEG size) into a temporary folder, then
measures, in interleaved rounds on one thread (a DataLoader worker runs single-threaded):

- ``decode``, ``decode_reused``: full decodes of each record's two JPEGs (image + heatmap) from
  bytes already in memory, by the fastest decoder of the same bytes we have: libjpeg-turbo
  through ``simplejpeg`` (what the pipeline uses; bit-identical to torchvision's, and faster),
  into new arrays or into one reused pair of buffers; **the floor is the faster of the two**;
- ``decode_image``: decoding the image JPEG alone (a stricter floor);
- ``decode_torchvision``: the same two decodes with ``torchvision.io.decode_jpeg`` (deprecated
  in 0.29, a warning per call; the floor of earlier runs), for reference;
- ``device_worker``: what a worker does with ``configs/clickme_resnet50.yaml`` on a GPU
  (``augment_on: auto`` → ``device``, ``train_map_decode: scaled``), one batch per call as a
  DataLoader fetches it (``dataset.__getitems__`` then ``collate_fn``): file reads, both CRCs,
  Example parsing, image decode into the batch, the heatmap's 64-px map (DCT-scaled JPEG
  decode where the size allows), checks, labels, the batch's crop boxes and flips drawn
  (``DeviceCollate``); the crop, flip and map blur are left to the device;
- ``device_worker_per_sample``: the same, sample by sample (``dataset[i]`` then ``collate_fn``):
  what a dataset without ``__getitems__`` would cost;
- ``device_worker_exact``: the same with ``train_map_decode: exact`` (full map decode);
- ``worker``: everything in the worker (``augment_on: worker``, what CPU-only training gets):
  the same plus the random resized crop of image and map and the map blur; uint8 images out;
- ``worker_exact``: the same with ``train_map_decode: exact``;
- ``eval``: the reference evaluation preprocessing (resize 224, exact map 64 → blur → 224);
- ``loader``: ``device_worker`` run by a real ``DataLoader`` with one worker process
  (includes handing batches to the main process through shared memory, in blocks the worker
  recycles, ``harmonia/data/shared_batch.py``; wall clock only); ``loader_worker_cpu``: the
  CPU time of that worker process (all its threads: the reading loop, the queue's feeder,
  the descriptor handover), which load on the machine barely changes;
- ``device_stage``: the rest of the device path (``apply_device_geometry``: map blur,
  crop/resize/flip, float) on the collated batches, here on the CPU with one thread; and, when
  CUDA is available, on the GPU (``device_stage_cuda``, batches already on the GPU, and
  ``h2d_cuda``, the copy of the pinned uint8 batches), timed with ``torch.cuda.synchronize``.

``pipeline_over_decode`` = floor (median ``decode`` or ``decode_reused`` time, the faster) / median ``device_worker`` time (the mode a
GPU user of the ClickMe config gets; 1.0 would mean the worker costs nothing beyond decoding);
``images_per_s`` = ``device_worker``, per worker. ``worker_pipeline_over_decode`` is the same
ratio with everything in the worker.
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

import torch
from torch.utils.data import DataLoader
import numpy as np
import simplejpeg
from torchvision.io import ImageReadMode, decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmonia.allocator import retain_freed_memory  # noqa: E402
from harmonia.data import ClickMeRecords, JointTransform  # noqa: E402
from harmonia.data.collate import collate_samples  # noqa: E402
from harmonia.data.device_geometry import DeviceCollate, apply_device_geometry  # noqa: E402
from harmonia.data.example import decode_example  # noqa: E402
from harmonia.data.synthetic import write_synthetic_clickme  # noqa: E402
from harmonia.data.tfrecord import iter_records  # noqa: E402

CLOCK = time.perf_counter
ROWS = {  # variant: what it is, for the table
    "decode": "full decodes of image + heatmap JPEGs (libjpeg-turbo via simplejpeg), new arrays",
    "decode_reused": "the same into one reused pair of buffers (no allocation at all)",
    "decode_image": "image JPEG only",
    "decode_torchvision": "the two decodes by `torchvision.io.decode_jpeg` (earlier floor)",
    "device_worker": "**config on a GPU**: `augment_on: device`, scaled maps: the worker's share",
    "device_worker_per_sample": "same, sample by sample (no `__getitems__`)",
    "device_worker_exact": "same, `train_map_decode: exact`",
    "worker": "all in the worker (`augment_on: worker`, CPU-only training), scaled maps",
    "worker_exact": "same, `train_map_decode: exact`",
    "eval": "evaluation: reference resize 224, exact map 64 → blur → 224",
    "loader": "device_worker in a real DataLoader worker process (wall clock)",
    "loader_worker_cpu": "the same: CPU time of the worker process (all its threads), any clock",
    "device_stage": "device stage of `augment_on: device`, here on the CPU, 1 thread",
}


def _process_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of process ``pid`` (Linux schedstat, nanosecond resolution)."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def _cuda_stage(batches: list, size: int, rounds: int, records: int) -> dict[str, float]:
    """Median ms/image of the device stage on CUDA (and of the host-to-device copy)."""
    device = torch.device("cuda")
    pinned = [type(b)(*(t.pin_memory() for t in b)) for b in batches]

    def copy() -> list:
        return [type(b)(*(t.to(device, non_blocking=True) for t in b)) for b in pinned]

    on_gpu = copy()
    times: dict[str, list[float]] = {"h2d_cuda": [], "device_stage_cuda": []}
    for step in range(rounds + 1):  # the first round warms up kernels and caches
        for name, fn in (("h2d_cuda", copy), ("device_stage_cuda", lambda: [apply_device_geometry(b, size) for b in on_gpu])):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if step:
                times[name].append((time.perf_counter() - start) / records)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON output file")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224,
                        help="side of the records' images and heatmaps (224: the issue's definition; 256: ClickMe's)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: perf_counter (reported numbers, run under cpu-exclusive); thread: CPU time of "
                             "this thread (comparisons on a busy machine; no `loader` row)")
    parser.add_argument("--malloc", choices=["retain", "system"], default="retain",
                        help='"retain" (default): glibc keeps freed memory, as the harmonia command sets it at start-up '
                             'and its forked DataLoader workers inherit (harmonia/allocator.py); "system": malloc untouched')
    args = parser.parse_args()
    malloc = "retain" if args.malloc == "retain" and retain_freed_memory() else "system"
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_clickme(Path(tmp) / "bench.tfrecords", args.records, size=args.size, num_classes=1000)
        jpegs, tensors = [], []
        for _, data in iter_records(path):
            features = decode_example(data)
            jpegs.append((features["image"][0], features["heatmap"][0]))
            tensors.append(tuple(torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs[-1]))
        mean_kb = path.stat().st_size / args.records / 1024
        train = JointTransform(224, train=True, uint8_output=True)
        device_collate = DeviceCollate(train.crop, train.hflip)
        pipelines = {
            "device_worker": (ClickMeRecords(path, transform=train, augment_on="device", map_decode="scaled"), device_collate),
            "device_worker_exact": (ClickMeRecords(path, transform=train, augment_on="device", map_decode="exact"), device_collate),
            "worker": (ClickMeRecords(path, transform=train, map_decode="scaled"), collate_samples),
            "worker_exact": (ClickMeRecords(path, transform=train, map_decode="exact"), collate_samples),
            "eval": (ClickMeRecords(path, transform=JointTransform(224, uint8_output=True)), collate_samples),
        }
        pipelines["device_worker_per_sample"] = pipelines["device_worker"]
        device_batches: list = []

        def fetch(dataset: ClickMeRecords, indices: list[int], collate: Callable, per_sample: bool) -> object:
            """One batch as torch's map-style fetcher gets it (``__getitems__`` when the dataset has it)."""
            if per_sample or not hasattr(dataset, "__getitems__"):
                return collate([dataset[i] for i in indices])
            return collate(dataset.__getitems__(indices))

        def run(name: str) -> None:
            dataset, collate = pipelines[name]
            order = torch.randperm(len(dataset)).tolist()
            batches = [fetch(dataset, order[start : start + args.batch], collate, name.endswith("per_sample"))
                       for start in range(0, len(order), args.batch)]
            if name == "device_worker":
                device_batches[:] = batches

        reused = (np.empty((args.size, args.size, 3), np.uint8), np.empty((args.size, args.size, 1), np.uint8))
        variants: dict[str, Callable[[], object]] = {
            "decode": lambda: [(simplejpeg.decode_jpeg(a), simplejpeg.decode_jpeg(b, colorspace="GRAY"))
                               for a, b in jpegs],
            "decode_reused": lambda: [(simplejpeg.decode_jpeg(a, buffer=reused[0]),
                                       simplejpeg.decode_jpeg(b, colorspace="GRAY", buffer=reused[1])) for a, b in jpegs],
            "decode_image": lambda: [simplejpeg.decode_jpeg(a) for a, _ in jpegs],
            "decode_torchvision": lambda: [(decode_jpeg(a), decode_jpeg(b, mode=ImageReadMode.GRAY)) for a, b in tensors],
            **{name: (lambda name=name: run(name)) for name in pipelines},
        }
        loader = DataLoader(pipelines["device_worker"][0], batch_size=args.batch, shuffle=True, num_workers=1,
                            collate_fn=device_collate, persistent_workers=True)
        worker_cpu: list[float] = []

        def run_loader() -> None:
            """One epoch through the DataLoader; the worker process's CPU time per image, from the 2nd call."""
            iterator = loader._iterator  # persistent workers: made by the first (warm-up) epoch
            pid = iterator._workers[0].pid if iterator is not None else None
            before = _process_cpu_seconds(pid) if pid else None
            for _ in loader:
                pass
            if before is not None:
                worker_cpu.append((_process_cpu_seconds(pid) - before) / args.records)

        variants["loader"] = run_loader
        variants["device_stage"] = lambda: [apply_device_geometry(b, 224) for b in device_batches]
        for fn in variants.values():  # warm-up: page cache, allocator, index file, the loader's worker
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(_timed(fn) / args.records)
        cuda = _cuda_stage(device_batches, 224, args.rounds, args.records) if torch.cuda.is_available() else {}

    if args.clock == "thread":
        del times["loader"]  # this thread's clock says nothing of another process
    if worker_cpu:
        times["loader_worker_cpu"] = worker_cpu
    median = {k: statistics.median(v) for k, v in times.items()}
    floor = min(median["decode"], median["decode_reused"])  # the fastest way to decode the same bytes
    ratio = {k: floor / v for k, v in median.items()}
    result = {
        "pipeline_over_decode": ratio["device_worker"],
        "images_per_s": 1.0 / median["device_worker"],
        "mode": "configs/clickme_resnet50.yaml on a GPU: augment_on auto -> device, train_map_decode scaled "
                "(the worker's share; crop, flip and map blur run on the GPU)",
        "floor_ms_per_image": 1e3 * floor,
        "pipeline_over_image_decode": median["decode_image"] / median["device_worker"],  # stricter floor: image only
        "per_sample_pipeline_over_decode": ratio["device_worker_per_sample"],  # without __getitems__
        "torchvision_decode_over_decode": ratio["decode_torchvision"],  # < 1: the earlier floor was slower
        "worker_pipeline_over_decode": ratio["worker"],
        "worker_images_per_s": 1.0 / median["worker"],
        "device_worker_exact_over_decode": ratio["device_worker_exact"],
        "worker_exact_over_decode": ratio["worker_exact"],
        "eval_over_decode": ratio["eval"],
        "eval_images_per_s": 1.0 / median["eval"],
        "loader_over_decode": ratio.get("loader"),
        "loader_worker_cpu_over_decode": ratio.get("loader_worker_cpu"),
        "device_stage_ms_per_image_cpu": 1e3 * median["device_stage"],
        "device_stage_ms_per_image_cuda": cuda.get("device_stage_cuda"),
        "h2d_ms_per_image_cuda": cuda.get("h2d_cuda"),
        "ms_per_image": {k: 1e3 * v for k, v in median.items()},
        "records": args.records, "size": args.size, "rounds": args.rounds, "batch": args.batch, "record_kb": mean_kb,
        "threads": 1, "clock": args.clock, "malloc": malloc, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(f"{args.records} records of {mean_kb:.1f} KB ({args.size}×{args.size} JPEG image + heatmap), 1 thread, "
          f"{args.rounds} interleaved rounds, medians ({args.clock} clock), batches of {args.batch}, malloc {malloc}")
    print("| variant | what | ms / image | images / s | floor / variant |")
    print("|---|---|---|---|---|")
    for name in median:
        print(f"| {name} | {ROWS[name]} | {1e3 * median[name]:.3f} | {1 / median[name]:.0f} | {ratio[name]:.2f} |")
    for name, ms in cuda.items():
        print(f"| {name} | on {result['cuda_device']} | {ms:.4f} | {1e3 / ms:.0f} | — |")
    print(f"pipeline_over_decode = {result['pipeline_over_decode']:.3f} (target ≥ 0.8; {result['mode']}); "
          f"images_per_s = {result['images_per_s']:.0f} per worker")
    print(f"worker_pipeline_over_decode = {result['worker_pipeline_over_decode']:.3f} (everything in the worker); "
          f"device stage {result['device_stage_ms_per_image_cpu']:.3f} ms/image on this CPU"
          + (f", {cuda['device_stage_cuda']:.4f} ms/image on CUDA" if cuda else " (no CUDA here)"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
