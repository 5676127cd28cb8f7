"""A file of decoded images, so that a streamed folder is decoded once, not once an epoch.

Decoding and resizing a folder's JPEGs in DataLoader workers takes CPU time that, on a small
CPU, the model's threads would otherwise use (on the 2-core reference machine, about 45 ms of a
core for a 360 ms step). The first epoch writes each image, decoded at the load size, into
this file; later epochs read it back instead of decoding it again.

The file holds one fixed-size record per position of the folder's listing, up to a capacity
set by a disk budget (positions past it are decoded every time):

- a 16-byte header: a tag, a key of the image file's path, size and modification time, and a
  CRC-32 of the pixels;
- the pixels, uint8 (C, S, S).

A record is used only when its tag, key and checksum all match, so a file edited or replaced
since it was written, a record cut short by a crash, a record never written (the file is
sparse: zeros) or a file left by another listing is decoded again, never served stale. Records
are read and written with positional reads and writes (no memory map), so the file's pages
stay in the operating system's page cache and out of the trainer's resident memory, and the
workers of one run (or the processes of several) write disjoint records without locks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from common.errors import first_line

log = logging.getLogger(__name__)

FILE_TAG = b"retrieval decoded images\n"
FILE_HEADER = struct.Struct("<32sIII")  # the tag (padded), format version, side, channels
FORMAT_VERSION = 1
HEADER_BYTES = 64  # the file header, padded: records start here
RECORD = struct.Struct("<4sQI")  # tag, key, CRC-32 of the pixels
RECORD_TAG = b"img1"
DISK_SHARE = 4  # by default the file may take up to a quarter of the free disk space
MAX_SHARE = 0.5  # and never more than half of it, whatever it is given


def file_key(path: bytes) -> int | None:
    """A 64-bit key of an image file's path, size and modification time (None: no such file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    h = hashlib.blake2b(bytes(path), digest_size=8)
    h.update(struct.pack("<qq", st.st_size, st.st_mtime_ns))
    return int.from_bytes(h.digest(), "little")


def free_bytes(folder: Path) -> int:
    """The free space on the disk that holds ``folder`` (or its nearest existing parent)."""
    for place in (folder, *folder.parents):
        if place.exists():
            return shutil.disk_usage(place).free
    return 0


def record_bytes(size: int, channels: int) -> int:
    """The bytes of one record: its header and an image's pixels (C, S, S)."""
    return RECORD.size + channels * size * size


def default_budget_bytes(folder: Path) -> int:
    """A quarter of the free space on the disk that holds ``folder``."""
    return free_bytes(folder) // DISK_SHARE


class DecodedCache:
    """Records of decoded images at ``path`` (see the module docstring); positions up to ``capacity``."""

    def __init__(self, path: Path, size: int, channels: int, capacity: int):
        self.path, self.size, self.channels, self.capacity = Path(path), size, channels, capacity
        self.record = record_bytes(size, channels)
        self._fd: int | None = None
        self._pid: int | None = None
        self._broken = False

    @staticmethod
    def capacity_for(budget_bytes: int, count: int, size: int, channels: int) -> int:
        """How many of ``count`` images a file of ``budget_bytes`` holds."""
        return max(0, min(count, (budget_bytes - HEADER_BYTES) // record_bytes(size, channels)))

    @classmethod
    def create(cls, path: Path, size: int, channels: int, capacity: int) -> DecodedCache | None:
        """Open the file at ``path`` for ``capacity`` records, keeping the records of a file
        already there for the same side and channels (a resumed run) and starting afresh
        otherwise; None (with a warning) when it cannot be written."""
        path = Path(path)
        header = FILE_HEADER.pack(FILE_TAG, FORMAT_VERSION, size, channels).ljust(HEADER_BYTES, b"\0")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "r+b" if path.exists() else "w+b") as f:
                if f.read(HEADER_BYTES) != header:
                    f.seek(0)
                    f.truncate()
                    f.write(header)
                # Sparse: the disk fills as records are written.
                f.truncate(HEADER_BYTES + capacity * record_bytes(size, channels))
        except OSError as exc:
            log.warning("cannot write decoded images to %s (%s): every epoch decodes the files", path, first_line(exc))
            return None
        return cls(path, size, channels, capacity)

    def get(self, position: int, key: int) -> torch.Tensor | None:
        """The image recorded at ``position`` for the file whose key is ``key``; None when
        there is none (never written, written for another file, or damaged)."""
        fd = self._file() if position < self.capacity else None
        if fd is None:
            return None
        buf = bytearray(self.record)
        try:
            got = os.preadv(fd, [buf], HEADER_BYTES + position * self.record)
        except OSError:
            return None
        tag, stored, crc = RECORD.unpack_from(buf)
        if got != self.record or tag != RECORD_TAG or stored != key:
            return None
        if zlib.crc32(memoryview(buf)[RECORD.size:]) != crc:
            return None
        return torch.frombuffer(buf, dtype=torch.uint8, offset=RECORD.size).view(self.channels, self.size, self.size)

    def put(self, position: int, key: int, image: torch.Tensor) -> None:
        """Record ``image`` (uint8, (C, S, S)) at ``position`` for the file whose key is
        ``key``. A write that fails (a full disk) turns the cache off in this process."""
        fd = self._file() if position < self.capacity else None
        if fd is None:
            return
        if image.dtype != torch.uint8 or tuple(image.shape) != (self.channels, self.size, self.size):
            raise ValueError(f"expected uint8 {(self.channels, self.size, self.size)}, got {image.dtype} {tuple(image.shape)}")
        pixels = np.ascontiguousarray(image.numpy()).tobytes()
        try:
            os.pwrite(fd, RECORD.pack(RECORD_TAG, key, zlib.crc32(pixels)) + pixels, HEADER_BYTES + position * self.record)
        except OSError as exc:
            self._broken = True
            log.warning("cannot write decoded images to %s (%s): the rest are decoded each epoch",
                        self.path, first_line(exc))

    def _file(self) -> int | None:
        """This process's descriptor (each DataLoader worker opens its own)."""
        if self._broken:
            return None
        if self._pid != os.getpid():
            try:
                self._fd, self._pid = os.open(self.path, os.O_RDWR), os.getpid()
            except OSError:
                self._broken = True
                return None
        return self._fd

    def remove(self) -> None:
        """Delete the file (the run is over)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid, self._broken = None, None, True
        self.path.unlink(missing_ok=True)

    def __getstate__(self) -> dict:
        # A worker started by spawning opens its own descriptor.
        return {**self.__dict__, "_fd": None, "_pid": None}
