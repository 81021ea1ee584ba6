"""The store's lease locks, on a local folder and on S3 (moto over HTTP).

One holder at a time among threads and among processes; a holder killed with
SIGKILL blocks others only until its lease runs out; a live holder keeps its
lock past the lease; of many waiters on an expired lease exactly one wins; only
the holder can release. Then the same through Prefect's LockManager protocol.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.locking.protocol import LockManager
from serial_moto import serial_moto

from uncool_prefect.locking import StoreLockManager
from uncool_prefect.store import InvalidKeyError, ObjectStore
from uncool_prefect.store.errors import LockNotHeldError
from uncool_prefect.store.locks import StoreLocks

BUCKET = "uncool-locks"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with serial_moto(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store: a local folder, or a prefix of its own in the bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # children and this process alike
    request.addfinalizer(lambda: os.environ.pop("AWS_ENDPOINT_URL", None))
    return f"s3://{BUCKET}/{tmp_path.name}"


def _locks(url: str, tmp_path: Path, lease_s: float = 60.0) -> StoreLocks:
    store = ObjectStore(url, state_dir=tmp_path / f"state-{os.getpid()}")
    return StoreLocks(store.backend, lease_s=lease_s, poll_s=0.1)


# A process that takes the lock ROUNDS times, writing "enter"/"leave" lines
# around a short critical section, then exits.
_CONTENDER = textwrap.dedent("""
    import os, sys, time
    from uncool_prefect.store import ObjectStore
    from uncool_prefect.store.locks import StoreLocks
    url, log, rounds, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    locks = StoreLocks(ObjectStore(url, state_dir=log + "." + name).backend, poll_s=0.05)
    for i in range(rounds):
        assert locks.acquire("train-key", f"{name}-{i}")
        with open(log, "a") as f:
            f.write(f"enter {name}\\n")
        time.sleep(0.01)
        with open(log, "a") as f:
            f.write(f"leave {name}\\n")
        locks.release("train-key", f"{name}-{i}")
""")

# A process that takes the lock with a short lease, says so, then hangs.
_HOLDER = textwrap.dedent("""
    import sys, time
    from uncool_prefect.store import ObjectStore
    from uncool_prefect.store.locks import StoreLocks
    url, state, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
    locks = StoreLocks(ObjectStore(url, state_dir=state).backend, lease_s=lease)
    assert locks.acquire("train-key", "doomed", timeout=0)
    print("held", flush=True)
    time.sleep(600)
""")


def test_one_holder_at_a_time_among_threads(store_url: str, tmp_path: Path) -> None:
    locks = _locks(store_url, tmp_path)
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    done: list[str] = []

    def contend(name: str) -> None:
        for i in range(5):
            assert locks.acquire("train-key", f"{name}-{i}")
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            time.sleep(0.002)
            inside.remove(name)
            locks.release("train-key", f"{name}-{i}")
        done.append(name)

    threads = [threading.Thread(target=contend, args=(f"t{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert sorted(done) == [f"t{n}" for n in range(6)]
    assert not locks.is_locked("train-key")


def test_one_holder_at_a_time_among_processes(store_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.touch()
    children = [subprocess.Popen([sys.executable, "-c", _CONTENDER, store_url, str(log), "4", f"p{n}"])
                for n in range(3)]
    for child in children:
        assert child.wait(timeout=240) == 0
    lines = log.read_text().split()
    events = list(zip(lines[0::2], lines[1::2], strict=True))
    assert len(events) == 3 * 4 * 2
    # Strictly enter/leave pairs of one process each: nobody entered while another was inside.
    for enter, leave in zip(events[0::2], events[1::2], strict=True):
        assert enter[0] == "enter" and leave == ("leave", enter[1]), events


def test_a_killed_holder_blocks_only_until_its_lease_expires(store_url: str, tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, store_url, str(tmp_path / "s"), "2"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        locks = _locks(store_url, tmp_path)
        info = locks.holder_of("train-key")
        assert info is not None and (info.holder, info.pid) == ("doomed", holder.pid)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        # Dead, yet held: nobody can tell a dead holder from a slow one before its lease ends.
        assert locks.acquire("train-key", "next", timeout=0) is False
        assert locks.acquire("train-key", "next", timeout=60) is True
        info = locks.holder_of("train-key")
        assert info is not None and (info.holder, info.pid) == ("next", os.getpid())
        locks.release("train-key", "next")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_live_holder_keeps_its_lock_past_the_lease(store_url: str, tmp_path: Path) -> None:
    locks = _locks(store_url, tmp_path, lease_s=1.0)
    assert locks.acquire("train-key", "long-stage", timeout=0)
    time.sleep(3.0)  # three leases: renewed in the background meanwhile
    other = _locks(store_url, tmp_path, lease_s=1.0)
    assert other.acquire("train-key", "waiter", timeout=0) is False
    info = other.holder_of("train-key")
    assert info is not None and info.holder == "long-stage"
    locks.release("train-key", "long-stage")
    assert other.acquire("train-key", "waiter", timeout=0) is True
    other.release("train-key", "waiter")


def test_of_many_waiters_on_an_expired_lease_exactly_one_wins(store_url: str, tmp_path: Path) -> None:
    locks = _locks(store_url, tmp_path)
    for trial in range(10):
        key = f"stale-{trial}"
        assert locks.acquire(key, "gone", timeout=0, lease_s=0.2, renew=False)
        time.sleep(0.3)
        start = threading.Barrier(8)
        winners: list[str] = []

        def wait_and_take(name: str, key: str = key, start: threading.Barrier = start,
                          winners: list[str] = winners) -> None:
            start.wait()
            if locks.try_acquire(key, name):
                winners.append(name)

        threads = [threading.Thread(target=wait_and_take, args=(f"w{n}",)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(winners) == 1, winners
        info = locks.holder_of(key)
        assert info is not None and info.holder == winners[0]
        locks.release(key, winners[0])


def test_only_the_holder_can_release(store_url: str, tmp_path: Path) -> None:
    locks = _locks(store_url, tmp_path)
    assert locks.acquire("train-key", "run-a", timeout=0)
    with pytest.raises(LockNotHeldError) as refused:
        locks.release("train-key", "run-b")
    assert str(refused.value) == (
        f"cannot release lock 'train-key' in the store at {locks.url} for run-b: "
        f"it is held by run-a (host {os.uname().nodename}, pid {os.getpid()})")
    assert isinstance(refused.value, ValueError)  # as Prefect's own lock managers raise
    assert locks.holder_of("train-key").holder == "run-a"  # type: ignore[union-attr]
    locks.release("train-key", "run-a")
    with pytest.raises(LockNotHeldError, match="nobody holds it"):
        locks.release("train-key", "run-a")


def test_the_lock_file_names_its_holder(tmp_path: Path) -> None:
    locks = _locks(str(tmp_path / "store"), tmp_path, lease_s=30)
    assert locks.acquire("ab/cd", "run-a", timeout=0)
    (lock_file,) = (tmp_path / "store" / "locks").iterdir()
    body = json.loads(lock_file.read_text())
    assert (body["key"], body["holder"], body["pid"], body["host"]) == \
        ("ab/cd", "run-a", os.getpid(), os.uname().nodename)
    assert body["lease_s"] == 30 and body["expires"] > time.time()
    locks.release("ab/cd", "run-a")
    assert list((tmp_path / "store" / "locks").iterdir()) == []
    with pytest.raises(InvalidKeyError, match=re.escape("'../x' is not allowed")):
        locks.acquire("../x", "run-a", timeout=0)


def test_prefect_lock_manager_protocol_and_pickling(store_url: str, tmp_path: Path) -> None:
    store = ObjectStore(store_url, state_dir=tmp_path / "state")
    manager = StoreLockManager(store, lease_s=30)
    assert isinstance(manager, LockManager)
    assert manager.acquire_lock("k", "a", acquire_timeout=0)
    assert manager.acquire_lock("k", "a", acquire_timeout=0)  # re-entrant for its holder
    assert manager.is_locked("k") and manager.is_lock_holder("k", "a")
    assert not manager.is_lock_holder("k", "b")
    assert manager.acquire_lock("k", "b", acquire_timeout=0.2) is False
    assert manager.wait_for_lock("k", timeout=0.2) is False
    # Dask ships the manager pickled; the copy reopens the store by URL and
    # can release what the original holds in this process.
    copy = pickle.loads(pickle.dumps(manager))
    assert copy == manager and copy.store is not None and copy.store.url == store.url
    copy.release_lock("k", "a")
    assert not manager.is_locked("k")
    assert manager.wait_for_lock("k", timeout=0)

    import asyncio

    async def both() -> tuple[bool, bool, bool]:
        first = await manager.aacquire_lock("k2", "x", acquire_timeout=0)
        second = await manager.aacquire_lock("k2", "y", acquire_timeout=0.2)
        manager.release_lock("k2", "x")
        return first, second, await manager.await_for_lock("k2", timeout=0)

    assert asyncio.run(both()) == (True, False, True)
