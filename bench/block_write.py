"""Benchmark: a small result write through ``ContentAddressedStorage`` vs Prefect's ``LocalFileSystem``.

Usage::

    .venv/bin/python bench/block_write.py [--writes 2000] [--repeat 3]

Both blocks get exactly what Prefect's result store hands a storage block:
``block.write_path(key, content, _sync=True)`` with a new key per write. Four
payloads, each written ``--writes`` times:

- ``1 KiB blob, distinct``: 1024 random bytes, different every write;
- ``1 KiB blob, repeated``: the same 1024 bytes every write (ours stores one
  object and writes a ref per key);
- ``ResultRecord, distinct``: ``ResultRecord(...).serialize()`` as Prefect builds
  it (JSON metadata + base64 cloudpickle of a small dict, ~1 KiB), a different
  value every write;
- ``ResultRecord, repeated``: the same value every write (the records differ
  only in their ``storage_key``).

Payloads are built before the clock starts. Each figure is the median over
``--repeat`` rounds of (elapsed / writes), every round into new, empty base
folders (nothing is deleted until the end: see bench/README.md on this VM's
file system). The two blocks alternate within a round.

No Prefect server is involved: PREFECT_API_URL points at a closed port and
every ``socket.connect`` is counted (and refused); the script fails if any
write tried to reach the network.

NOTE: the two do different work. Prefect's LocalFileSystem opens the key's
path and writes the bytes: no temp file, no rename, no fsync, so a crash can
leave a torn or empty result under the final name. Ours hashes the content,
writes the object (if new) and the ref each to a temp file, fsyncs, renames
and fsyncs the folder: two durable, atomic writes (one for a repeated
content), which is what the ratio mostly measures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import loadavg

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "block_write"
GOAL_RATIO = 1.3

# -- no server, no network ------------------------------------------------------------
os.environ["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # discard port: nothing listens
os.environ["PREFECT_HOME"] = str(WORK / "prefect-home")
os.environ.pop("PREFECT_API_KEY", None)
CONNECTS: list[Any] = []
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _no_connect(self: socket.socket, address: Any) -> Any:
    CONNECTS.append(address)
    raise ConnectionRefusedError(f"block_write.py: no network allowed (tried {address!r})")


socket.socket.connect = _no_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _no_connect  # type: ignore[method-assign]


def payloads(kind: str, writes: int) -> list[bytes]:
    import random

    rng = random.Random(1234)
    if kind == "blob-distinct":
        return [rng.randbytes(1024) for _ in range(writes)]
    if kind == "blob-repeated":
        blob = rng.randbytes(1024)
        return [blob] * writes
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    out = []
    fixed = {"rows": 128, "digest": rng.randbytes(32).hex(), "values": list(range(100))}
    for i in range(writes):
        value = fixed if kind == "record-repeated" else {
            "rows": i, "digest": rng.randbytes(32).hex(), "values": list(range(i, i + 100)),
        }
        metadata = ResultRecordMetadata(storage_key=key_of(i), serializer=PickleSerializer())
        out.append(ResultRecord(metadata=metadata, result=value).serialize())
    return out


def key_of(i: int) -> str:
    return f"{i:032x}"  # Prefect's default result keys are hex digests


def durable_write(folder: str, name: str, data: bytes) -> None:
    """The bare OS sequence behind one atomic, durable write (no hashing, no JSON)."""
    temp = f"{folder}/.{name}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, f"{folder}/{name}")
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def floor_writes(base: str, contents: list[bytes], objects: bool) -> float:
    """What the durability alone costs: that sequence once per ref, and once more
    per object (in 256 fan-out folders) when every content is new."""
    refs = f"{base}/refs"
    os.makedirs(refs)
    for i in range(256):
        os.makedirs(f"{base}/objects/{i:02x}")
    ref = b'{"oid": "%s"}' % (b"0" * 64)
    started = time.perf_counter()
    for i, content in enumerate(contents):
        if objects:
            digest = hashlib.sha256(content).hexdigest()
            durable_write(f"{base}/objects/{digest[:2]}", digest[2:], content)
        durable_write(refs, key_of(i), ref)
    return time.perf_counter() - started


def run_writes(write: Callable[..., Any], contents: list[bytes]) -> float:
    started = time.perf_counter()
    for i, content in enumerate(contents):
        write(key_of(i), content, _sync=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep bench/.work/block_write")
    args = parser.parse_args()

    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    from prefect.filesystems import LocalFileSystem

    from uncool_prefect.blocks import ContentAddressedStorage

    kinds = ["blob-distinct", "blob-repeated", "record-distinct", "record-repeated"]
    data = {kind: payloads(kind, args.writes) for kind in kinds}
    results: dict[str, dict[str, list[float]]] = {
        k: {"prefect": [], "ours": [], "floor": []} for k in kinds
    }
    counter = 0

    def fresh(label: str) -> str:
        nonlocal counter
        counter += 1
        return str(WORK / f"{label}-{counter}")

    try:
        # Warm-up (imports, first-call paths): not measured.
        LocalFileSystem(basepath=fresh("warm")).write_path("warm", b"x", _sync=True)
        ContentAddressedStorage(basepath=fresh("warm")).write_path("warm", b"x", _sync=True)

        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        load_at_start = loadavg()
        for _ in range(args.repeat):
            for kind in kinds:
                os.sync()
                time.sleep(0.5)
                prefect_block = LocalFileSystem(basepath=fresh("prefect"))
                elapsed = run_writes(prefect_block.write_path, data[kind])
                results[kind]["prefect"].append(elapsed / args.writes)
                os.sync()
                time.sleep(0.5)
                ours_block = ContentAddressedStorage(basepath=fresh("ours"))
                elapsed = run_writes(ours_block.write_path, data[kind])
                results[kind]["ours"].append(elapsed / args.writes)
                os.sync()
                time.sleep(0.5)
                elapsed = floor_writes(fresh("floor"), data[kind], kind.endswith("distinct"))
                results[kind]["floor"].append(elapsed / args.writes)
                # Spot-check what was written reads back (outside the clock).
                # (ours gives a record back as equal JSON, not the same bytes)
                last = args.writes - 1
                back = ours_block.read_path(key_of(last), _sync=True)
                if kind.startswith("record"):
                    assert json.loads(back) == json.loads(data[kind][last])
                else:
                    assert back == data[kind][last]
                assert prefect_block.read_path(key_of(last), _sync=True) == data[kind][last]
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)

    if CONNECTS:
        sys.exit(f"block_write.py: writes tried to reach the network: {CONNECTS[:5]}")

    import prefect

    sizes = {kind: statistics.mean(len(c) for c in data[kind]) for kind in kinds}
    print(f"block_write.py  started {started}  prefect {prefect.__version__}  "
          f"python {sys.version.split()[0]}  cpus {os.cpu_count()}")
    print(f"load average (1/5/15 min) before the timed part {load_at_start} (above ~0.3: "
          f"something else was running), after it {loadavg()} (this benchmark's own included)")
    print(f"{args.writes} writes per round, distinct keys, median of {args.repeat} rounds; "
          "us per write; samples in brackets")
    print(f"network connections attempted: {len(CONNECTS)} (PREFECT_API_URL at a closed "
          "port, socket.connect refused and counted)")
    print()
    print(f"{'payload':24} {'bytes':>5} {'Prefect LocalFS':>15} {'ours':>8} {'ratio':>6}"
          f"   {'goal':18} {'durable floor':>13}")
    for kind in kinds:
        p = statistics.median(results[kind]["prefect"]) * 1e6
        o = statistics.median(results[kind]["ours"]) * 1e6
        f = statistics.median(results[kind]["floor"]) * 1e6
        ratio = o / p
        verdict = "met" if ratio <= GOAL_RATIO else "MISSED"
        label = kind.replace("blob-", "1 KiB blob, ").replace("record-", "ResultRecord, ")
        n = 2 if kind.endswith("distinct") else 1
        print(f"{label:24} {sizes[kind]:5.0f} {p:13.0f}us {o:6.0f}us {ratio:5.2f}x"
              f"   <= {GOAL_RATIO}x: {verdict:6} {f:9.0f}us ({n}x)")
        print(f"{'':31} samples: prefect {[round(x * 1e6) for x in results[kind]['prefect']]} "
              f"ours {[round(x * 1e6) for x in results[kind]['ours']]} "
              f"floor {[round(x * 1e6) for x in results[kind]['floor']]}")
    print()
    print("durable floor: per write, the bare os.open/write/fsync/rename/fsync(folder) that an")
    print("atomic durable file needs, done (Nx) as often as ours must: object + ref for a new")
    print("content, the ref alone for a repeated one; no hashing, JSON or Prefect code.")


if __name__ == "__main__":
    main()
