"""Find duplicate prompt ids in an input of any size, in bounded memory.

A dict of every id would grow with the input (~100 bytes per prompt: 100 MB at a million rows).
Instead each id goes, with its position, to one of ``PARTITIONS`` temporary files chosen by a
hash of the id, through small write buffers; every copy of an id lands in the same file, so each
file is then checked on its own with a dict of only its ids. A file larger than ``BUDGET`` bytes
is split again by other bits of the hash (up to ``MAX_DEPTH`` times) before it is checked, so
memory stays bounded however large the input. Ids are compared exactly (the hash only chooses
the file), and the duplicates reported are the first ones in input order, as a dict would find.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

PARTITIONS = 64  # files per level; each write buffer holds at most FLUSH bytes
FLUSH = 64 << 10
BUDGET = 8 << 20  # bytes of records checked at once (their dict takes a few times that)
MAX_DEPTH = 3
_HEAD = struct.Struct("<QIII")  # row ordinal, file index, len(id), len(where)


@dataclass(frozen=True, order=True)
class Duplicate:
    ordinal: int  # the repeat's row number in the whole input: reports go in input order
    prompt_id: str
    first: tuple[int, str]  # (file index, where in it) of the id's first row
    again: tuple[int, str]


def _bits(key: bytes, depth: int) -> int:
    """Which file at ``depth``: other bits of one stable hash of the id at each depth."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return (h >> (6 * depth)) % PARTITIONS


class DuplicateFinder:
    """``add`` every row's id and position, then ``find()`` the first duplicates."""

    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        self._dir = tempfile.TemporaryDirectory(prefix="harvest-ids-")
        self._buffers = [bytearray() for _ in range(PARTITIONS)]
        self._rows = 0

    def add(self, prompt_id: str, file_index: int, where: str) -> None:
        key = prompt_id.encode("utf-8", "surrogatepass")
        loc = where.encode("utf-8", "surrogatepass")
        part = _bits(key, 0)
        buf = self._buffers[part]
        buf += _HEAD.pack(self._rows, file_index, len(key), len(loc))
        buf += key
        buf += loc
        self._rows += 1
        if len(buf) >= FLUSH:
            self._spill(self._path("", part), buf)

    def _path(self, parent: str, part: int) -> str:
        return os.path.join(self._dir.name, f"{parent}{part:02d}")

    @staticmethod
    def _spill(path: str, buf: bytearray) -> None:
        with open(path, "ab") as fh:
            fh.write(buf)
        buf.clear()

    def find(self, limit: int = 5) -> list[Duplicate]:
        """The first ``limit`` duplicates in input order (each with its id's first row)."""
        try:
            for part, buf in enumerate(self._buffers):
                if buf:
                    self._spill(self._path("", part), buf)
            self._buffers = []
            first: list[Duplicate] = []  # a heap of the ``limit`` earliest, negated by order
            for part in range(PARTITIONS):
                for dup in self._check(self._path("", part), 1):
                    _keep(first, dup, limit)
            return sorted(d for _, d in first)
        finally:
            self._dir.cleanup()

    def _check(self, path: str, depth: int) -> Iterator[Duplicate]:
        if not os.path.exists(path):
            return
        if os.path.getsize(path) > self.budget and depth <= MAX_DEPTH:
            yield from self._split(path, depth)
            return
        seen: dict[bytes, tuple[int, bytes]] = {}  # id -> where its first row is
        for ordinal, file_index, key, loc in _records(path):
            here = (file_index, loc)
            was = seen.setdefault(key, here)
            if was is not here:
                first, again = (was[0], _text(was[1])), (file_index, _text(loc))
                yield Duplicate(ordinal, _text(key), first, again)
        os.unlink(path)

    def _split(self, path: str, depth: int) -> Iterator[Duplicate]:
        """Re-partition an oversized file by the next bits of the hash, then check each part."""
        name = os.path.basename(path)
        bufs = [bytearray() for _ in range(PARTITIONS)]
        used: set[int] = set()
        for ordinal, file_index, key, loc in _records(path):
            part = _bits(key, depth)
            used.add(part)
            buf = bufs[part]
            buf += _HEAD.pack(ordinal, file_index, len(key), len(loc)) + key + loc
            if len(buf) >= FLUSH:
                self._spill(self._path(name, part), buf)
        os.unlink(path)
        for part in sorted(used):
            if bufs[part]:
                self._spill(self._path(name, part), bufs[part])
            yield from self._check(self._path(name, part), depth + 1)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def _keep(heap: list[tuple[int, Duplicate]], dup: Duplicate, limit: int) -> None:
    """Keep the ``limit`` duplicates of lowest ordinal (a max-heap on the ordinal)."""
    item = (-dup.ordinal, dup)
    if len(heap) < limit:
        heapq.heappush(heap, item)
    elif dup.ordinal < -heap[0][0]:
        heapq.heapreplace(heap, item)


def _records(path: str) -> Iterator[tuple[int, int, bytes, bytes]]:
    """Stream one partition file's records, a block at a time."""
    size = _HEAD.size
    with open(path, "rb") as fh:
        rest = b""
        while block := fh.read(FLUSH * 4):
            data, at = rest + block, 0
            while at + size <= len(data):
                ordinal, file_index, nk, nl = _HEAD.unpack_from(data, at)
                end = at + size + nk + nl
                if end > len(data):
                    break
                key = data[at + size : at + size + nk]
                yield ordinal, file_index, key, data[at + size + nk : end]
                at = end
            rest = data[at:]
