"""TFRecord files without TensorFlow: framing, CRC checks, an offset index, a writer.

A TFRecord file is a sequence of records, each framed as (SPEC §2)::

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

little-endian, with ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8`` (mod 2³²). CRC32C
comes from ``google-crc32c`` (a C implementation). Every read checks both CRCs by default, so a
flipped bit or a truncated file is an error naming the file and the record index, never a
silently wrong image.

Random access: :func:`record_offsets` scans a file once (headers only, seeking over the data)
and returns the byte offset of every record; the result is cached in ``<file>.idx`` (or in a
cache folder) and reused while the file's size and modification time are unchanged. With the
offsets, a map-style dataset can read record *i* with one seek (:func:`read_record`), which is
what makes shuffling, DistributedSampler and mixtures possible; :func:`iter_records` streams.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import numpy as np

from harmonia.data.errors import BadSampleError

_HEADER = struct.Struct("<QI")  # length, masked crc of the length
_FOOTER = struct.Struct("<I")  # masked crc of the data
_MASK_DELTA = 0xA282EAD8
_INDEX_MAGIC = 0x48524D49  # "HRMI": guards against reading a foreign .idx file


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data`` (rotated right by 15 bits, plus a constant)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _where(path: str | Path, index: int) -> str:
    return f"{path}, record {index}"


def _read_header(f: BinaryIO, path: str | Path, index: int, verify: bool) -> int | None:
    """Read one record header; ``None`` at a clean end of file, else the data length."""
    return _parse_header(f.read(_HEADER.size), path, index, verify)


def _parse_header(header: bytes, path: str | Path, index: int, verify: bool) -> int | None:
    """The data length of a record header; ``None`` for no bytes at all (a clean end of file)."""
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise BadSampleError(_where(path, index), f"truncated file: {len(header)} of {_HEADER.size} header bytes")
    length, length_crc = _HEADER.unpack(header)
    if verify and masked_crc32c(header[:8]) != length_crc:
        raise BadSampleError(_where(path, index), "CRC mismatch in the record length (corrupted or not a TFRecord file)")
    return length


def _read_body(f: BinaryIO, length: int, path: str | Path, index: int, verify: bool) -> bytes:
    return _check_body(f.read(length + _FOOTER.size), length, path, index, verify)


def _check_body(body: bytes, length: int, path: str | Path, index: int, verify: bool) -> bytes:
    """The data of a record body (data + footer), its CRC checked."""
    if len(body) < length + _FOOTER.size:
        raise BadSampleError(
            _where(path, index), f"truncated file: record needs {length + _FOOTER.size} bytes, {len(body)} left"
        )
    data = body[:length]
    if verify and masked_crc32c(data) != _FOOTER.unpack_from(body, length)[0]:
        raise BadSampleError(_where(path, index), "CRC mismatch in the record data (corrupted record)")
    return data


def read_record(f: BinaryIO, offset: int, path: str | Path, index: int, verify: bool = True) -> bytes:
    """The data of the record starting at byte ``offset`` of the open file ``f``.

    ``path`` and ``index`` only name the record in errors.
    """
    f.seek(offset)
    length = _read_header(f, path, index, verify)
    if length is None:
        raise BadSampleError(_where(path, index), f"no record at byte {offset}: end of file (stale index?)")
    return _read_body(f, length, path, index, verify)


def pread_record(fd: int, offset: int, path: str | Path, index: int, verify: bool = True) -> bytes:
    """:func:`read_record` on a file descriptor, by two ``os.pread`` calls.

    Half the cost of a seek and two reads through a Python file object (~6 vs ~12 µs per
    record), and no shared file position, so it needs no seek and no lock.
    """
    length = _parse_header(os.pread(fd, _HEADER.size, offset), path, index, verify)
    if length is None:
        raise BadSampleError(_where(path, index), f"no record at byte {offset}: end of file (stale index?)")
    return _check_body(os.pread(fd, length + _FOOTER.size, offset + _HEADER.size), length, path, index, verify)


def iter_records(path: str | Path, verify: bool = True) -> Iterator[tuple[int, bytes]]:
    """Stream ``(record index, data)`` from one file, checking CRCs unless ``verify=False``."""
    with open(path, "rb", buffering=1 << 20) as f:
        index = 0
        while (length := _read_header(f, path, index, verify)) is not None:
            yield index, _read_body(f, length, path, index, verify)
            index += 1


def scan_offsets(path: str | Path) -> np.ndarray:
    """Byte offsets of every record in ``path``, by one pass over the headers.

    Checks each length's CRC and that the data fits in the file (a truncated last record is an
    error); the data CRCs are checked later, when a record is read. The error raised at a
    damaged frame carries ``partial_offsets``: the records before it, which are still good.
    """
    size = os.path.getsize(path)
    offsets: list[int] = []
    try:
        with open(path, "rb", buffering=1 << 16) as f:
            offset = 0
            while (length := _read_header(f, path, len(offsets), verify=True)) is not None:
                end = offset + _HEADER.size + length + _FOOTER.size
                if end > size:
                    raise BadSampleError(
                        _where(path, len(offsets)), f"truncated file: record ends at byte {end}, file has {size}"
                    )
                offsets.append(offset)
                offset = end
                f.seek(offset)
    except BadSampleError as err:
        err.partial_offsets = np.asarray(offsets, dtype=np.int64)
        raise
    return np.asarray(offsets, dtype=np.int64)


def _index_path(path: Path, index_dir: str | Path | None) -> Path:
    if index_dir is None:
        return path.with_name(path.name + ".idx")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return Path(index_dir) / f"{path.name}.{digest}.idx"


def record_offsets(path: str | Path, index_dir: str | Path | None = None, cache: bool = True) -> np.ndarray:
    """Record offsets of ``path``, from the cached index when it is still valid.

    The index (``<file>.idx`` beside the file, or under ``index_dir`` when given, e.g. because
    the data folder is read-only) stores the file's size and mtime; any change triggers a rescan.
    A folder that cannot be written just means no cache (the scan is cheap: headers only).
    """
    path = Path(path)
    stat = path.stat()
    key = np.asarray([_INDEX_MAGIC, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    index_file = _index_path(path, index_dir)
    if cache and index_file.exists():
        try:
            stored = np.load(index_file, allow_pickle=False)
            if stored.ndim == 1 and len(stored) >= 3 and np.array_equal(stored[:3], key):
                return stored[3:]
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild it below
    offsets = scan_offsets(path)
    if cache:
        try:
            index_file.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(index_file, np.concatenate([key, offsets]))
        except OSError:
            pass  # read-only location: work without a cache
    return offsets


def _atomic_save(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TFRecordWriter:
    """Write records to a TFRecord file atomically (a temporary file renamed on ``close``).

    Use as a context manager; if the block raises, the temporary file is removed and ``path``
    is left as it was.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self.count = 0

    def write(self, data: bytes) -> None:
        """Append one record."""
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)))
        self._file.write(data)
        self._file.write(_FOOTER.pack(masked_crc32c(data)))
        self.count += 1

    def close(self) -> None:
        """Flush and move the file into place."""
        if not self._file.closed:
            self._file.close()
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Discard everything written."""
        if not self._file.closed:
            self._file.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.abort() if exc_type is not None else self.close()
