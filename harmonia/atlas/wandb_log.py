"""Read the history of an offline W&B run (``run-<id>.wandb``) without wandb's server.

The default configuration logs to W&B offline, so a run's curves live only in that file. The
installed wandb reads it in its ``wandb-core`` binary and offers no Python reader, so the atlas
reads the file itself. The format is small and stable: a 7-byte header (``:W&B``, magic
``0xBEE1``, version 0), then LevelDB-style log records in 32 KiB blocks, each record
``crc32 (4) | length (2) | type (1) | data``, the CRC being zlib's CRC-32 of the type byte and
the data; a protobuf message (``wandb.proto.wandb_internal_pb2.Record``) may be split over
blocks as FIRST / MIDDLE / LAST pieces. History rows are the records whose ``record_type`` is
``history``.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32 * 1024
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[bytes]:
    """The protobuf payloads stored in the ``.wandb`` file at ``path``, in order.

    A truncated last record (a run killed mid-write) ends the list; a record whose CRC does not
    match raises ``ValueError`` naming the file and the offset.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a W&B run log (expected the header {HEADER!r}, got {data[:7]!r})")
    out: list[bytes] = []
    pieces: list[bytes] = []
    offset = len(HEADER)
    while offset + _RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < _RECORD_HEADER.size:  # block trailer: padding
            offset += left_in_block
            continue
        crc, length, kind = _RECORD_HEADER.unpack_from(data, offset)
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            offset += left_in_block
            continue
        start = offset + _RECORD_HEADER.size
        payload = data[start : start + length]
        if len(payload) < length:
            break  # written partly when the run stopped
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise ValueError(f"{path}: corrupt record at byte {offset} (CRC mismatch)")
        offset = start + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            pieces = [payload]
        elif kind == MIDDLE:
            pieces.append(payload)
        elif kind == LAST:
            out.append(b"".join(pieces + [payload]))
            pieces = []
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {offset}")
    return out


def read_history(path: str | Path, step_key: str = "trainer/global_step") -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` of every numeric scalar logged in the run at ``path``.

    The step is ``step_key`` of the same row when it was logged (Lightning logs the optimizer
    step there), W&B's own ``_step`` otherwise. Non-numeric values (images, tables) are skipped.
    """
    from wandb.proto import wandb_internal_pb2

    series: dict[str, list[tuple[float, float]]] = {}
    for payload in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, float] = {}
        media: set[str] = set()  # an image is logged as nested fields (_type, width, count...): not a curve
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if key.endswith("/_type"):
                media.add(key[: -len("_type")])
            try:
                value = json.loads(item.value_json)
            except ValueError:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                row[key] = float(value)
        step = row.get(step_key, row.get("_step", float(record.history.step.num)))
        for key, value in row.items():
            if key.startswith("_") or key in (step_key, "epoch") or any(key.startswith(m) for m in media):
                continue
            series.setdefault(key, []).append((step, value))
    return series
