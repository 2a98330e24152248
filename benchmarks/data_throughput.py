"""Data pipeline throughput per worker: ClickMe records → 224-px ``Sample`` batches vs. JPEG decoding.

    python benchmarks/data_throughput.py --out F.json [--records 256 --rounds 7 --batch 64]

Writes realistic 256×256 ClickMe records (JPEG image q=90 + JPEG heatmap, as the released
shards; photo-like synthetic content of ImageNet-like JPEG size) into a temporary folder, then
measures, in interleaved rounds on one thread (a DataLoader worker runs single-threaded):

- ``decode``: the floor, decoding the record's two JPEGs (image + heatmap) with
  torchvision.io, from bytes already in memory;
- ``decode_image``: decoding the image JPEG alone (for reference);
- ``train``: the full training pipeline as ``ClickMeDataModule`` runs it in a worker,
  ``ClickMeRecords`` with the joint training transform (random resized crop 224 + flip) plus
  collation into batches: file read, both CRCs, Example parsing, decoding, checks, map blur,
  crop/resize of image and map; images stay uint8 (made float on the device);
- ``train_float``: the same with float images made in the worker (4× more bytes to collate);
- ``eval``: the same with the reference evaluation preprocessing (resize 224, map 64→blur→224);
- ``device_worker``: the worker's share with ``augment_on="device"`` (read, CRCs, parse,
  decode, checks, map 256→64, crop box and flip drawn, collation of uint8 batches);
- ``device_stage``: the rest of that path, ``apply_device_geometry`` on the collated batches
  (map blur, crop/resize/flip, float): here on the CPU with one thread; on a GPU it runs in
  the training process, batched.

``pipeline_over_decode`` = median decode time / median ``train`` time: the strict reading,
everything in the worker (1.0 would mean the pipeline costs nothing beyond decoding);
``images_per_s`` = ``train``, per worker. ``device_worker_over_decode`` is the same ratio for
the worker's share with ``augment_on="device"``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmonia.data import ClickMeRecords, JointTransform  # noqa: E402
from harmonia.data.collate import collate_samples  # noqa: E402
from harmonia.data.device_geometry import apply_device_geometry  # noqa: E402
from harmonia.data.example import decode_example  # noqa: E402
from harmonia.data.synthetic import write_synthetic_clickme  # noqa: E402
from harmonia.data.tfrecord import iter_records  # noqa: E402


CLOCK = time.perf_counter


def _timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON output file")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: perf_counter (reported numbers, run under cpu-exclusive); thread: CPU time of "
                             "this thread (comparisons on a busy machine)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_clickme(Path(tmp) / "bench.tfrecords", args.records, size=256, num_classes=1000)
        jpegs = []
        for _, data in iter_records(path):
            features = decode_example(data)
            jpegs.append(tuple(torch.frombuffer(bytearray(features[k][0]), dtype=torch.uint8) for k in ("image", "heatmap")))
        mean_kb = path.stat().st_size / args.records / 1024
        pipelines = {
            "train": ClickMeRecords(path, transform=JointTransform(224, train=True, uint8_output=True)),
            "train_float": ClickMeRecords(path, transform=JointTransform(224, train=True)),
            "eval": ClickMeRecords(path, transform=JointTransform(224, uint8_output=True)),
            "device_worker": ClickMeRecords(path, transform=JointTransform(224, train=True), augment_on="device"),
        }
        device_batches: list = []

        def run(dataset: ClickMeRecords) -> None:
            order = torch.randperm(len(dataset)).tolist()
            device_batches.clear()
            for start in range(0, len(order), args.batch):
                device_batches.append(collate_samples([dataset[i] for i in order[start : start + args.batch]]))

        variants = {
            "decode": lambda: [(decode_jpeg(a), decode_jpeg(b)) for a, b in jpegs],
            "decode_image": lambda: [decode_jpeg(a) for a, _ in jpegs],
            "train": lambda: run(pipelines["train"]),
            "train_float": lambda: run(pipelines["train_float"]),
            "eval": lambda: run(pipelines["eval"]),
            "device_worker": lambda: run(pipelines["device_worker"]),
            "device_stage": lambda: [apply_device_geometry(b, 224) for b in device_batches],
        }
        for fn in variants.values():  # warm-up: page cache, allocator, index file
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(_timed(fn) / args.records)

    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "pipeline_over_decode": median["decode"] / median["train"],
        "images_per_s": 1.0 / median["train"],
        "eval_over_decode": median["decode"] / median["eval"],
        "eval_images_per_s": 1.0 / median["eval"],
        "pipeline_over_image_decode": median["decode_image"] / median["train"],
        "device_worker_over_decode": median["decode"] / median["device_worker"],
        "device_worker_images_per_s": 1.0 / median["device_worker"],
        "device_stage_ms_per_image_cpu": 1e3 * median["device_stage"],
        "ms_per_image": {k: 1e3 * v for k, v in median.items()},
        "records": args.records, "rounds": args.rounds, "batch": args.batch, "record_kb": mean_kb,
        "threads": 1, "clock": args.clock, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    print(f"{args.records} records of {mean_kb:.1f} KB (256×256 JPEG image + heatmap), 1 thread, "
          f"{args.rounds} interleaved rounds, medians")
    print("| variant | ms / image | images / s | floor / variant |")
    print("|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {1e3 * median[name]:.3f} | {1 / median[name]:.0f} | {median['decode'] / median[name]:.2f} |")
    print(f"pipeline_over_decode = {result['pipeline_over_decode']:.3f} (target ≥ 0.8); "
          f"images_per_s = {result['images_per_s']:.0f} per worker")
    print(f"augment_on=device: worker share {result['device_worker_over_decode']:.3f} of the floor "
          f"({result['device_worker_images_per_s']:.0f} images/s per worker) + "
          f"{result['device_stage_ms_per_image_cpu']:.3f} ms/image device stage (measured on this CPU)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
