"""TFRecord files without TensorFlow: framing, CRC checks, an offset index, random access, a writer.

A TFRecord file is a sequence of records, each framed as::

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

little-endian, with ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8`` (mod 2³²). CRC32C
comes from ``google-crc32c`` (a C implementation). Every read checks both CRCs by default, so a
flipped bit or a truncated file is an error naming the file and the record index, never a
silently wrong image.

Random access: :func:`record_offsets` scans a file once (headers only, seeking over the data)
and returns the byte offset of every record; the result is cached in ``<file>.idx`` (or in a
cache folder) and reused while the file's size and modification time are unchanged.
:class:`RecordIndex` holds those offsets for a list of files and reads record *i* of the whole
list, which is what makes shuffling, DistributedSampler and mixtures possible; every reader of
record files in Harmonia goes through it. :func:`iter_records` streams one file.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
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


def pread_record(fd: int, offset: int, path: str | Path, index: int, verify: bool = True) -> bytes:
    """The data of the record starting at byte ``offset`` of the open file ``fd``.

    Two ``os.pread`` calls: no shared file position, so no seek and no lock, and no Python
    file object in the way. ``path`` and ``index`` only name the record in errors.
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


class RecordIndex:
    """Random access to every record of a list of TFRecord files: ``read(i)`` → the record's bytes.

    Args:
        files: the record files, in the order that numbers their records.
        index_dir: where offset indexes are cached (None: ``<file>.idx`` beside each file).
        verify_crc: check both CRCs of every record read.
        keep_damaged: a file whose framing is damaged (a truncated tail, a bad length CRC)
            raises :class:`BadSampleError` while indexing; with ``keep_damaged`` its records
            before the damage are kept and the error is stored in ``damaged`` instead.

    Files are opened on first use in each process (a forked DataLoader worker opens its own)
    and never pickled. Record ``i`` is named in errors as ``"<file>, record <k>"``, ``k``
    counting within its file.
    """

    def __init__(self, files: Sequence[str | Path], index_dir: str | Path | None = None, verify_crc: bool = True,
                 keep_damaged: bool = False) -> None:
        self.files = [Path(f) for f in files]
        self.verify_crc = verify_crc
        self.damaged: list[BadSampleError] = []
        offsets = []
        for path in self.files:
            try:
                found = record_offsets(path, index_dir)
            except BadSampleError as err:
                if not keep_damaged:
                    raise
                self.damaged.append(err)
                found = err.partial_offsets  # the records before the damaged frame
            offsets.append(found)
        counts = [len(o) for o in offsets]
        self.offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self.file_of = np.repeat(np.arange(len(self.files), dtype=np.int32), counts)
        self.record_of = np.arange(len(self.offsets)) - np.repeat(np.cumsum([0] + counts[:-1]), counts)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        """``"<file>, record <k>"`` for record ``i`` of the list."""
        return _where(self.files[self.file_of[i]], int(self.record_of[i]))

    def read(self, i: int) -> bytes:
        """The data of record ``i``, its CRCs checked (unless ``verify_crc`` is off)."""
        if not 0 <= i < len(self.offsets):
            raise IndexError(f"record {i} out of range: {len(self.offsets)} records in {len(self.files)} file(s)")
        number = int(self.file_of[i])
        return pread_record(self._fd(number), int(self.offsets[i]), self.files[number], int(self.record_of[i]),
                            self.verify_crc)

    def _fd(self, number: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors, never the parent's
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(number)
        if fd is None:
            fd = self._fds[number] = os.open(self.files[number], os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close the open files (they are reopened on demand)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state


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
