"""The storage layer on a local folder, a real S3 server and a GCS emulator: same assertions.

(On gs:// the conditional operations are check-then-write; these single-client assertions hold
there too, and the output lease is what keeps a second driver away.)"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.storage import StorageError, Store, open_store, split_location


@pytest.fixture(params=["local", "s3", "gs"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    return open_store(request.getfixturevalue(f"{request.param}_prefix"))


def test_whole_objects_list_and_delete(store: Store) -> None:
    store.check()
    store.write_bytes("a/b/one.json", b"1")
    store.write_bytes("a/two.json", b"22")
    store.write_bytes("top.txt", b"3")
    assert store.list() == ["a/b/one.json", "a/two.json", "top.txt"]
    assert store.list("a") == ["a/b/one.json", "a/two.json"]
    assert store.list("missing") == []
    assert store.read_bytes("a/two.json") == b"22"
    assert store.exists("top.txt") and not store.exists("nope")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope")
    store.delete("a/two.json")
    store.delete("a/two.json")  # deleting what is gone is fine
    store.delete_tree("a")
    assert store.list() == ["top.txt"]


def test_create_is_once_only(store: Store) -> None:
    assert store.create("_harvest/x.json", b"first")
    assert not store.create("_harvest/x.json", b"second")
    assert store.read_bytes("_harvest/x.json") == b"first"
    assert store.list("_harvest") == ["_harvest/x.json"]  # no temporary left behind


def test_replace_and_delete_only_at_the_version_read(store: Store) -> None:
    assert store.read_versioned("lease.json") is None
    store.create("lease.json", b"v1")
    v1 = store.read_versioned("lease.json")
    assert v1 is not None and v1.data == b"v1" and v1.age_s < 3600
    v2 = store.replace("lease.json", b"v2", v1.token)
    assert v2 and v2 != v1.token
    assert store.replace("lease.json", b"v3", v1.token) is None  # stale version: refused
    assert store.read_bytes("lease.json") == b"v2"
    assert not store.delete_if("lease.json", v1.token)
    assert store.delete_if("lease.json", v2)
    assert not store.exists("lease.json")


def test_parquet_checksum_and_streamed_lines(store: Store) -> None:
    table = pa.table({"x": list(range(1000))})
    digest = store.write_table(table, "data/p.parquet", "zstd")
    assert hashlib.sha256(store.read_bytes("data/p.parquet")).hexdigest() == digest
    with store.open_input_file("data/p.parquet") as fh:
        assert pq.read_table(fh).equals(table)
    lines = b"".join(b'{"i": %d}\n' % i for i in range(200_000)) + b"last"
    store.write_bytes("in.jsonl", lines)  # > 1 chunk: lines cross chunk boundaries
    got = list(store.iter_lines("in.jsonl"))
    assert len(got) == 200_001 and got[-1] == b"last" and b"".join(got) == lines


def test_locations_round_trip(store: Store) -> None:
    store.write_bytes("d/f.parquet", b"x")
    parent, name = split_location(store.child_uri("d/f.parquet"))
    assert name == "f.parquet" and parent.read_bytes(name) == b"x"


def test_unsupported_location_is_one_line() -> None:
    with pytest.raises(StorageError, match=r"ftp://h/x: unsupported location"):
        open_store("ftp://h/x")


def test_a_streamed_object_appears_whole_on_close(store: Store) -> None:
    """Written piece by piece (a shard's row groups), it is invisible under its name until
    ``close``, hashed over every byte, and gone without a trace when aborted."""
    pieces = [b"x" * 10, b"y" * (3 << 20), b"z"]  # one piece larger than a write block
    sink = store.open_stream("data/streamed.bin")
    for piece in pieces:
        sink.write(piece)
    assert "data/streamed.bin" not in store.list("data")  # on disk only a temporary, yet
    sink.close()
    whole = b"".join(pieces)
    assert store.read_bytes("data/streamed.bin") == whole
    assert sink.sha256 == hashlib.sha256(whole).hexdigest() and sink.tell() == len(whole)
    assert store.list("data") == ["data/streamed.bin"]
    dropped = store.open_stream("data/dropped.bin")
    dropped.write(b"partial" * (1 << 18))  # past a block: some bytes reached the store
    dropped.abort()
    assert store.list("data") == ["data/streamed.bin"]
