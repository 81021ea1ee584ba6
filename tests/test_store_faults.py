"""Fault injection on the local backend: real files, real processes, real failures.

Each test states the outcome a user relies on when something goes wrong: a writer
killed with SIGKILL, two writers racing, a read-only folder, a full disk, a 2 GiB
file, gc running next to a writer, odd file names, the stat cache, bad ref keys.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uncool_prefect.store import (
    InvalidKeyError,
    ObjectRef,
    ObjectStore,
    StoreError,
    StoreFullError,
)
from uncool_prefect.store import hashing as store_hashing

MiB = 1 << 20
NOBODY = 65534


# -- helpers ------------------------------------------------------------------
def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            hasher.update(chunk)
    return hasher.hexdigest()


def _temps(root: Path) -> list[Path]:
    """Everything left in the store's tmp/ folder."""
    tmp = root / "tmp"
    return sorted(p for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else []


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def _tree(root: Path) -> dict[str, bytes]:
    """``{relative posix path: content}`` of every file under ``root``."""
    found: dict[str, bytes] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            found[full.relative_to(root).as_posix()] = full.read_bytes()
    return found


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0,
              child: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child is not None and child.poll() is not None:
            _, err = child.communicate()
            pytest.fail(f"child exited ({child.returncode}) while waiting for {what}:\n"
                        f"{err.decode(errors='replace')}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _run_python(script: str, *args: str, timeout: float = 120) -> dict[str, object]:
    """Run ``script`` in a fresh interpreter; it prints one JSON object last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, timeout=timeout, check=False,
    )
    assert proc.returncode == 0, (
        f"child failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')}"
    )
    result: dict[str, object] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


# -- 1. a writer killed with SIGKILL mid-write -------------------------------
_KILLED_WRITER = """
import sys
from uncool_prefect.store import ObjectStore

root, state, fifo, method = sys.argv[1:5]
store = ObjectStore(root, state_dir=state)
if method == "put_file":
    store.put_file(fifo)  # a FIFO is streamed, as put_file documents
else:
    with open(fifo, "rb") as stream:
        store.put_stream(stream)
print("finished", flush=True)  # never reached: the test kills us before EOF
"""


def _open_fifo_for_writing(fifo: Path, child: subprocess.Popen[bytes]) -> int:
    """Open the write end once the child has opened the read end (no deadlock if it dies)."""
    fd: int | None = None

    def opened() -> bool:
        nonlocal fd
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            return False
        return True

    _wait_for(opened, "the writer to open the FIFO", child=child)
    assert fd is not None
    os.set_blocking(fd, True)
    return fd


@pytest.mark.parametrize("method", ["put_file", "put_stream"])
def test_writer_killed_mid_write_leaves_no_object_and_gc_removes_its_temp(
    tmp_path: Path, method: str
) -> None:
    root, state = tmp_path / "store", tmp_path / "state"
    fifo = tmp_path / "incoming.fifo"
    os.mkfifo(fifo)
    data = _data(4 * MiB, seed=1)
    half = len(data) // 2
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(root), str(state),
         str(fifo), method],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        fd = _open_fifo_for_writing(fifo, child)
        try:
            view = memoryview(data)[:half]
            while view:
                view = view[os.write(fd, view):]
            # The child is now blocked reading the second half, its temp file holding the first.
            _wait_for(lambda: [p.stat().st_size for p in _temps(root)] == [half],
                      "the writer to spool the first half into tmp/", child=child)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            os.close(fd)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL

    store = ObjectStore(root, state_dir=state)
    # Nothing at any final name: a reader can never see half an object.
    assert list(store.ls()) == []
    assert _files_under(root / "objects") == []
    assert not store.has(_sha256(data)) and not store.has(_sha256(data[:half]))
    # The dead writer's temp is left behind (SIGKILL runs no cleanup) ...
    [leftover] = _temps(root)
    # ... a gc within the grace period spares it (it could be a live writer's) ...
    assert store.gc(grace=3600).removed_temp == 0
    assert leftover.exists()
    # ... and a gc past the grace removes it.
    assert store.gc(grace=0).removed_temp == 1
    assert _temps(root) == []
    # Putting the complete data again just works.
    ref = store.put_bytes(data)
    assert ref.oid == _sha256(data) and ref.size == len(data)
    assert store.get_bytes(ref.oid) == data
    assert [info.name for info in store.ls()] == [ref.oid]


# -- 2. two processes put the same object at once ----------------------------
_RACER = """
import hashlib, json, random, sys
from pathlib import Path
from uncool_prefect.store import ObjectStore

root, scratch = sys.argv[1], Path(sys.argv[2])
scratch.mkdir(parents=True, exist_ok=True)
store = ObjectStore(root)  # default state dir, inside the store: shared by both racers
data = b""
print("ready", flush=True)
for line in sys.stdin:
    command, n = line.split()
    n = int(n)
    if command == "prepare":
        data = random.Random(n).randbytes(1 << 20)
        (scratch / "source.bin").write_bytes(data)
        print("prepared", n, flush=True)
        continue
    try:  # "go": both racers get this line within microseconds of each other
        if n % 2:
            ref = store.put_file(scratch / "source.bin")
        else:
            ref = store.put_bytes(data)
        print(json.dumps({"oid": ref.oid, "size": ref.size}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": repr(exc)}), flush=True)
"""


@pytest.mark.slow
def test_two_processes_putting_the_same_object_both_succeed_with_one_copy(
    tmp_path: Path,
) -> None:
    rounds = 20
    root = tmp_path / "store"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_RACER), str(root), str(tmp_path / f"r{i}")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        for i in range(2)
    ]

    def read_line(racer: subprocess.Popen[str]) -> str:
        assert racer.stdout is not None
        line = racer.stdout.readline()
        assert line, f"racer {racer.pid} exited with {racer.wait()}"
        return line.strip()

    def tell_all(line: str) -> None:
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write(line + "\n")
            racer.stdin.flush()

    try:
        assert [read_line(r) for r in racers] == ["ready", "ready"]
        store = ObjectStore(root)
        expected: list[str] = []
        for n in range(rounds):
            tell_all(f"prepare {n}")
            assert [read_line(r) for r in racers] == [f"prepared {n}"] * 2
            tell_all(f"go {n}")
            results = [json.loads(read_line(r)) for r in racers]
            oid = _sha256(random.Random(n).randbytes(MiB))
            expected.append(oid)
            assert results == [{"oid": oid, "size": MiB}] * 2, f"round {n}"
            # Exactly one copy, at its final name, and no temp file left over.
            assert sorted(info.name for info in store.ls()) == sorted(expected), f"round {n}"
            assert _temps(root) == [], f"round {n}"
    finally:
        for racer in racers:
            with contextlib.suppress(OSError):
                assert racer.stdin is not None
                racer.stdin.close()
        for racer in racers:
            try:
                racer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                racer.kill()
                racer.wait()
    assert [r.returncode for r in racers] == [0, 0]
    assert store.verify() == []
    for n, oid in enumerate(expected):
        assert store.get_bytes(oid) == random.Random(n).randbytes(MiB)


# -- 3. permission denied -------------------------------------------------------
# NOTE: the interpreter may live where nobody cannot read it (here it is
# /root/.pyenv/..., behind /root's 0700), so the child starts as root, imports
# everything a put can need, and only then drops to nobody with setgroups/
# setgid/setuid. From then on the kernel checks every access against nobody,
# exactly as for a process started as nobody.
_UNPRIVILEGED_PUT = """
import ctypes, json, os, sqlite3, sys, time, uuid  # noqa: F401 - loaded before dropping root
from pathlib import Path
from uncool_prefect.store import ObjectStore

root, source, method, state = sys.argv[1:5]
uid = int(sys.argv[5])
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
creates = []
real_open = os.open

def counting_open(path, flags, *args, **kwargs):
    if flags & os.O_CREAT:
        creates.append(os.fspath(path))
    return real_open(path, flags, *args, **kwargs)

os.open = counting_open
store = ObjectStore(root, state_dir=state or None)
payload = Path(source).read_bytes()
result = {"euid": os.geteuid()}
started = time.monotonic()
try:
    if method == "put_bytes":
        store.put_bytes(payload)
    else:
        store.put_file(source)
    result["raised"] = None
except Exception as exc:
    result["raised"] = [cls.__name__ for cls in type(exc).__mro__]
    result["message"] = str(exc)
result["seconds"] = time.monotonic() - started
result["creates"] = creates
print(json.dumps(result))
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder that user nobody can reach.

    pytest's tmp_path lives under /tmp/pytest-of-<user>/ (mode 0700), which
    nobody cannot traverse; that would fail before the store is even reached.
    """
    path = Path(tempfile.mkdtemp(prefix="uncool-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for dirpath, dirnames, _files in os.walk(path):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
        shutil.rmtree(path)


@pytest.mark.parametrize(
    ("method", "state"),
    [
        ("put_bytes", "default"),
        ("put_file", "writable"),
        ("put_file", "default"),
    ],
)
def test_read_only_store_fails_once_with_a_clear_permission_error(
    shared_dir: Path, method: str, state: str
) -> None:
    root = shared_dir / "store"
    for folder in (root / "objects" / "sha256", root / "tmp"):
        folder.mkdir(parents=True)
    source = shared_dir / "source.bin"
    source.write_bytes(_data(100_000, seed=3))
    source.chmod(0o644)
    state_dir = ""
    if state == "writable":
        writable = shared_dir / "state"
        writable.mkdir(mode=0o777)
        writable.chmod(0o777)
        state_dir = str(writable)
    # The whole store read-only: its root, objects/ and tmp/ (owned by root when root).
    for folder in (root / "objects" / "sha256", root / "objects", root / "tmp", root):
        folder.chmod(0o555)
    as_root = os.geteuid() == 0
    result = _run_python(_UNPRIVILEGED_PUT, str(root), str(source), method, state_dir,
                         str(NOBODY if as_root else -1))
    if as_root:
        assert result["euid"] == NOBODY

    mro = result["raised"]
    assert isinstance(mro, list), f"the put succeeded in a read-only store: {result}"
    assert "StorePermissionError" in mro and "PermissionError" in mro, result
    message = str(result["message"])
    assert str(root / "tmp") in message, message  # names the folder it could not write
    assert "check the folder's owner and mode" in message, message  # says what to do
    # One attempt to create the temp file, no retry loop.
    creates = result["creates"]
    assert isinstance(creates, list)
    assert [c for c in creates if c.startswith(str(root))] == creates, creates
    assert len(creates) == 1 and creates[0].startswith(str(root / "tmp")), creates
    assert float(str(result["seconds"])) < 2.0
    assert _temps(root) == []
    assert _files_under(root / "objects") == []


# -- 4. disk full -----------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real device that runs out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the disk-full test needs root")
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.parametrize("what", ["file", "dir"])
def test_disk_full_is_a_store_full_error_and_the_store_stays_usable(
    tiny_tmpfs: Path, tmp_path: Path, what: str
) -> None:
    root = tiny_tmpfs / "store"  # state (stat cache) in the store too, on the full device
    store = ObjectStore(root)
    if what == "file":
        source = tmp_path / "big.bin"
        source.write_bytes(_data(4 * MiB, seed=4))
        put: Callable[[], ObjectRef] = lambda: store.put_file(source)  # noqa: E731
    else:
        source = tmp_path / "bigdir"
        source.mkdir()
        for i in range(8):  # each fits, all together do not
            (source / f"part-{i}").write_bytes(_data(300_000, seed=40 + i))
        put = lambda: store.put_dir(source)  # noqa: E731
    used_before = shutil.disk_usage(tiny_tmpfs).used

    with pytest.raises(StoreFullError) as info:
        put()
    message = str(info.value)
    assert "no space left" in message and str(root) in message, message
    assert "uncool store gc" in message, message  # says what to do
    assert isinstance(info.value, StoreError)
    # Temps removed, nothing at any final name, the space given back.
    assert _temps(root) == []
    assert list(store.ls()) == []
    assert _files_under(root / "objects") == []
    assert shutil.disk_usage(tiny_tmpfs).used <= used_before + 64 * 1024
    # Small objects still go in and come out.
    small = store.put_bytes(b"still works")
    assert store.get_bytes(small.oid) == b"still works"
    little = tmp_path / "little.txt"
    little.write_bytes(b"x" * 10_000)
    assert store.get_bytes(store.put_file(little).oid) == b"x" * 10_000


# -- 5. a 2 GiB file in bounded memory -----------------------------------------
_BIG_FILE = """
import json, sys
from pathlib import Path
from uncool_prefect.store import ObjectStore

root, state, source, dest, warm = sys.argv[1:6]
store = ObjectStore(root, state_dir=state)
Path(warm).write_bytes(b"warm up")
store.get_file(store.put_file(warm).oid, dest + ".warm")  # load everything lazy first

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def reset_peak():
    # NOTE: ru_maxrss would not do: a child starts with its parent's peak
    # (pytest's, hundreds of MiB), hiding any growth below it. Writing 5 to
    # clear_refs resets this process's own peak (VmHWM) to its current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")

before_put = reset_peak()
ref = store.put_file(source)
after_put = status_kib("VmHWM")
before_get = reset_peak()
store.get_file(ref.oid, dest)
after_get = status_kib("VmHWM")
print(json.dumps({"oid": ref.oid, "size": ref.size, "put_growth_kib": after_put - before_put,
                  "get_growth_kib": after_get - before_get}))
"""


@pytest.mark.slow
def test_a_2_gib_file_streams_in_and_out_in_bounded_memory(tmp_path: Path) -> None:
    size = 2 << 30
    source = tmp_path / "big.bin"
    dest = tmp_path / "restored.bin"
    root = tmp_path / "store"
    try:
        # Sparse, with random blocks at the start, across a chunk boundary and at the end.
        with open(source, "wb") as f:
            f.truncate(size)
            for offset in (0, 1000 * MiB - 12345, size - MiB):
                f.seek(offset)
                f.write(_data(MiB, seed=offset))
        result = _run_python(_BIG_FILE, str(root), str(tmp_path / "state"), str(source),
                             str(dest), str(tmp_path / "warm.txt"), timeout=300)
        assert result["size"] == size
        assert result["oid"] == _sha256_file(source)
        growth_put = int(str(result["put_growth_kib"])) * 1024
        growth_get = int(str(result["get_growth_kib"])) * 1024
        assert growth_put < 64 * MiB, f"put_file grew the peak RSS by {growth_put / MiB:.1f} MiB"
        assert growth_get < 64 * MiB, f"get_file grew the peak RSS by {growth_get / MiB:.1f} MiB"
        assert dest.stat().st_size == size
        assert _sha256_file(dest) == result["oid"]
    finally:
        source.unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)  # pytest keeps old tmp_paths: free 2 GiB now


# -- 6. gc racing a writer --------------------------------------------------------
@pytest.mark.slow
def test_gc_racing_a_writer_never_leaves_a_ref_to_a_missing_object(tmp_path: Path) -> None:
    """A writer re-puts old, unreferenced content and refs it while gc sweeps.

    Either the writer's put freshens the object before gc looks at its mtime
    (gc spares it), or gc has taken it and the put writes it again. Either way
    the ref written right after the put must point at an object that exists.
    Writer and gc use separate ObjectStore instances, as two processes would.
    """
    root = tmp_path / "store"
    writer_store = ObjectStore(root, state_dir=tmp_path / "state")
    gc_store = ObjectStore(root, state_dir=tmp_path / "state")
    batches: queue.Queue[list[tuple[int, bytes]] | None] = queue.Queue()
    batch_done = threading.Event()
    refs: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            counter = 0
            while (batch := batches.get()) is not None:
                for epoch_and_index, content in batch:
                    ref = writer_store.put_bytes(content)  # old content: a freshen, or a rewrite
                    writer_store.set_ref(f"old/{epoch_and_index}", ref)
                    refs[f"old/{epoch_and_index}"] = content
                    counter += 1
                    fresh = b"new content %d" % counter
                    ref = writer_store.put_bytes(fresh)
                    writer_store.set_ref(f"new/{counter}", ref)
                    refs[f"new/{counter}"] = fresh
                batch_done.set()
        except BaseException as exc:
            errors.append(exc)  # re-raised in the main thread below
            batch_done.set()
            raise

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    past = time.time() - 7200
    all_garbage: list[str] = []
    removed: set[str] = set()
    deadline = time.monotonic() + 3.0
    epoch = 0
    try:
        while time.monotonic() < deadline and not errors:
            keepers: list[tuple[str, int, bytes]] = []
            for i in range(80):
                content = b"old %d %d" % (epoch, i)
                ref = gc_store.put_bytes(content)
                os.utime(gc_store.url_of(ref.oid), (past, past))  # put 2 h ago, unreferenced
                if i % 2:
                    all_garbage.append(ref.oid)
                else:
                    keepers.append((ref.oid, epoch * 1000 + i, content))
            # Same order as gc's sweep (by name), so the two meet.
            keepers.sort()
            batch_done.clear()
            batches.put([(key, content) for _oid, key, content in keepers])
            while True:
                removed.update(gc_store.gc(grace=60).removed)
                if batch_done.is_set():
                    break
            epoch += 1
    finally:
        batches.put(None)
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    assert epoch >= 2, "the writer was too slow for any race to happen"

    removed.update(gc_store.gc(grace=60).removed)
    store = ObjectStore(root, state_dir=tmp_path / "state")
    found = dict(store.iter_refs())
    assert set(found) == set(refs)
    for key, document in found.items():
        oid = str(document["oid"])
        assert store.has(oid), f"ref {key} points at missing object {oid}"
        assert store.get_bytes(oid) == refs[key]  # verified read
    # Unreferenced old objects are in fact removed.
    assert all(not store.has(oid) for oid in all_garbage)
    assert set(all_garbage) <= removed
    assert store.gc(grace=60).dangling == []


# -- 7. odd file names in put_dir ------------------------------------------------
_ODD_NAMES = [
    "naïve façade.txt",
    "日本語/ファイル.bin",
    "emoji 🎉 party.txt",
    " leading space",
    "trailing space ",
    "a b/c d/e f.txt",
    "-rf",
    "--help",
    "-",
    ".hidden",
    "...",
    "100% sure",
    "tab-less #1 [x] {y} (z) $HOME 'q' \"qq\" *?",
    "/".join(["deep"] * 40) + "/leaf.txt",
    "/".join(f"ünï-{i}" for i in range(12)) + "/leaf",
]
_NAME_MAX_NAMES = [
    "x" * 255,                 # the longest name ext4/tmpfs allow
    "é" * 127 + ".",           # 255 bytes of UTF-8, 128 characters
    "sub/" + "y" * 250,
]


def _round_trip(tmp_path: Path, names: list[str]) -> None:
    src = tmp_path / "src"
    for i, name in enumerate(names):
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"content {i} of {name!r}".encode())
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    ref = store.put_dir(src)
    assert ref.nfiles == len(names)
    assert sorted(e.path for e in store.read_manifest(ref.name).entries) == sorted(names)
    out = store.get_dir(ref.name, tmp_path / "restored")
    assert _tree(out) == _tree(src)


def test_put_dir_round_trips_odd_file_names(tmp_path: Path) -> None:
    _round_trip(tmp_path, _ODD_NAMES)


def test_put_dir_round_trips_file_names_of_255_bytes(tmp_path: Path) -> None:
    _round_trip(tmp_path, _NAME_MAX_NAMES)


def test_get_file_writes_a_255_byte_file_name(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    ref = store.put_bytes(b"long name")
    dest = tmp_path / ("x" * 255)
    dest.write_bytes(b"the name itself is fine here")
    store.get_file(ref.oid, dest)
    assert dest.read_bytes() == b"long name"


@pytest.mark.parametrize("bad", [b"bad\xffname.txt", b"sub\xfe/inner.txt"])
def test_put_dir_names_a_file_name_that_is_not_utf8(tmp_path: Path, bad: bytes) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "fine.txt").write_text("fine")
    full = os.fsencode(src) + b"/" + bad
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(b"undecodable name")
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    with pytest.raises(StoreError) as info:
        store.put_dir(src)
    assert not isinstance(info.value, UnicodeError)
    message = str(info.value)
    assert "not valid UTF-8" in message and "rename it" in message, message
    shown = os.fsdecode(bad)  # how Python shows the name: b"\xff" -> "\udcff"
    assert repr(shown) in message, message
    assert str(src) in message, message
    assert list(store.ls()) == []  # checked before anything is stored


# -- 8. the stat cache -----------------------------------------------------------
def test_an_unchanged_file_is_not_read_again(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    path = tmp_path / "data.bin"
    old = _data(50_000, seed=8)
    path.write_bytes(old)
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(an_hour_ago, an_hour_ago))  # well outside the racy window
    first = store.put_file(path)
    assert first.oid == _sha256(old)

    # Same inode, size and mtime_ns, different bytes: only a re-read could notice.
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(_data(50_000, seed=9))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        st.st_ino, st.st_mtime_ns, st.st_size)
    assert store.put_file(path).oid == first.oid  # the stat cache answered: not read

    with monkeypatch.context() as patch:  # the same, shown directly: no ingest at all
        def no_read(*_args: object, **_kwargs: object) -> ObjectRef:
            raise AssertionError("an unchanged file was read again")

        patch.setattr(ObjectStore, "_ingest_file", no_read)
        assert store.put_file(path).oid == first.oid

    # A genuine change (new mtime) is seen.
    new = _data(50_000, seed=10)
    path.write_bytes(new)
    os.utime(path, ns=(an_hour_ago + 10**9, an_hour_ago + 10**9))
    assert store.put_file(path).oid == _sha256(new)
    assert store.get_bytes(_sha256(new)) == new


def test_without_a_stat_cache_a_present_file_is_hashed_and_never_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another path, another machine's state dir, a rebuilt cache: no temp copy of what is there."""
    from uncool_prefect.store.backends import LocalBackend

    content = _data(3 * MiB, seed=11)
    first = tmp_path / "first.bin"
    first.write_bytes(content)
    ObjectStore(tmp_path / "store", state_dir=tmp_path / "state-a").put_file(first)
    copy = tmp_path / "copy.bin"
    copy.write_bytes(content)

    temps: list[str] = []
    real_new_temp = LocalBackend._new_temp

    def counting(self: LocalBackend, *args: object, **kwargs: object) -> tuple[str, int]:
        path, fd = real_new_temp(self, *args, **kwargs)  # type: ignore[arg-type]
        temps.append(path)
        return path, fd

    monkeypatch.setattr(LocalBackend, "_new_temp", counting)
    fresh = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state-b")
    assert fresh.put_file(copy).oid == _sha256(content)
    assert temps == []  # hashed, found present: nothing written
    other = tmp_path / "other.bin"
    other.write_bytes(_data(3 * MiB, seed=12))
    assert fresh.put_file(other).oid == _sha256(other.read_bytes())
    assert len(temps) == 1  # a new file is copied in, once
    assert fresh.get_bytes(_sha256(other.read_bytes())) == other.read_bytes()


def test_a_file_modified_within_the_racy_window_is_not_cached(tmp_path: Path) -> None:
    assert store_hashing.RACY_WINDOW_NS == 100_000_000  # 100 ms
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    path = tmp_path / "fresh.bin"
    first = _data(20_000, seed=11)
    path.write_bytes(first)  # mtime: now, so younger than 100 ms at hashing time
    st = path.stat()
    assert store.put_file(path).oid == _sha256(first)
    assert store.stat_cache.lookup(str(path.absolute()), st, "sha256") is None

    # Rewritten with the same size and mtime_ns: a cached hash would hide this.
    second = _data(20_000, seed=12)
    with open(path, "r+b") as f:
        f.write(second)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.put_file(path).oid == _sha256(second)


# -- 9. bad ref keys -------------------------------------------------------------
_BAD_KEYS = ["..", "a/../b", "/abs", "%2e%2e/x", "..%2Fx", "a\\b", "a\x00b", "",
             "a//b", "a/./b", "a/", "\n", "C:/x"]


@pytest.mark.parametrize("key", _BAD_KEYS)
def test_bad_ref_keys_are_rejected_before_any_io(tmp_path: Path, key: str) -> None:
    root = tmp_path / "store"
    store = ObjectStore(root, state_dir=tmp_path / "state")
    ref = store.put_bytes(b"target")
    store.set_ref("good/key", ref)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with pytest.raises(InvalidKeyError) as info:
        store.set_ref(key, ref)
    assert isinstance(info.value, ValueError)
    assert "ref key" in str(info.value)
    with pytest.raises(InvalidKeyError):
        store.get_ref(key)

    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert _files_under(root / "refs") == [root / "refs" / "good" / "key"]
    assert [k for k, _ in store.iter_refs()] == ["good/key"]


def test_a_manifest_with_a_file_where_a_folder_must_be_is_a_store_error(tmp_path: Path) -> None:
    """`a` and `a/b` cannot both be files: a clear StoreError, and nothing written at the destination."""
    from uncool_prefect.store import Manifest, ManifestEntry

    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    blob = store.put_bytes(b"content")
    entries = (ManifestEntry("a", blob.oid, blob.size), ManifestEntry("a/b", blob.oid, blob.size))
    broken = store.put_bytes(Manifest(store.algorithm, entries).to_bytes(), is_dir=True)
    with pytest.raises(StoreError, match="lists both the file 'a' and 'a/b'"):
        store.get_dir(broken.name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(8192))


def _smashed_pages(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[len(data) // 2:] = os.urandom(len(data) - len(data) // 2)  # the header survives
    db.write_bytes(bytes(data))


def _a_folder_in_its_place(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    (db / "not-a-database").mkdir(parents=True)


def _garbage_wal(db: Path) -> None:
    db.with_name(db.name + "-wal").write_bytes(b"\x37\x7f\x06\x82" + os.urandom(8188))


@pytest.mark.parametrize(("damage", "warned"), [
    (_garbage, True), (_smashed_pages, True), (_a_folder_in_its_place, True),
    # SQLite itself discards a -wal whose header does not check out: nothing to repair.
    (_garbage_wal, False),
], ids=["garbage", "smashed-pages", "folder", "garbage-wal"])
def test_a_damaged_stat_cache_is_moved_aside_and_rebuilt_with_one_warning(
        tmp_path: Path, damage: Callable[[Path], None], warned: bool,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Not silently off for good: the next put hashes once more, the one after reads nothing."""
    path = tmp_path / "data.bin"
    path.write_bytes(_data(300_000, seed=21))
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(an_hour_ago, an_hour_ago))  # outside the racy window
    for number in range(200):  # enough rows for pages past the header
        other = tmp_path / "others" / f"{number}.bin"
        other.parent.mkdir(exist_ok=True)
        other.write_bytes(b"%d" % number)
        os.utime(other, ns=(an_hour_ago, an_hour_ago))
    first = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    oid = first.put_file(path).oid
    first.put_dir(tmp_path / "others")
    first.stat_cache.close()  # as when that process ended
    db = tmp_path / "state" / "statcache.db"
    assert db.is_file()
    damage(db)

    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")  # a new process's view
    with caplog.at_level(logging.WARNING, logger="uncool.store"):
        store.put_dir(tmp_path / "others")  # a full scan of the cache meets every damaged page
        assert store.put_file(path).oid == oid
        assert store.put_file(path).oid == oid
        with monkeypatch.context() as patch:
            def no_read(*_args: object, **_kwargs: object) -> ObjectRef:
                raise AssertionError("an unchanged file was read again: the cache is off for good")

            patch.setattr(ObjectStore, "_ingest_file", no_read)
            assert store.put_file(path).oid == oid
    warnings = [r.getMessage() for r in caplog.records if r.name == "uncool.store"]
    moved = list((tmp_path / "state").glob("statcache.db*.damaged-*"))
    if warned:
        assert len(warnings) == 1 and "moved it aside" in warnings[0], warnings
        assert moved and db.is_file()
    else:
        assert warnings == [] and moved == []
