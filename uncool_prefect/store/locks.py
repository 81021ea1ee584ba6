"""Lease locks that live in the store, beside the results they guard.

A lock is one small JSON file, ``locks/<key>``, naming its holder, host, pid
and when its lease expires. Whoever creates the file holds the lock; nobody
else can create it while it exists:

- on a local folder, by ``open(O_CREAT | O_EXCL)``;
- on S3, by a ``PutObject`` with ``If-None-Match: *`` (412 when it exists).

A lease bounds how long a lock outlives its holder: a holder killed with
SIGKILL never releases, and once its lease has expired the next waiter takes
the lock over. A live holder keeps its lease fresh (a heartbeat thread
rewrites the expiry every third of the lease), so a stage that runs longer
than the lease keeps its lock. Taking over an expired lease lets exactly one
waiter win:

- local: the waiter takes a guard file (``<lock>.breaking``, ``O_EXCL``),
  checks that the lock is still the very version it judged expired (inode
  and content), deletes it, drops the guard, and creates the lock again with
  ``O_EXCL``, where it may still lose to a newcomer; a waiter that checks
  after it finds the winner's new lock and leaves it;
- S3: the waiter overwrites the expired lock with ``If-Match: <its ETag>``;
  the first overwrite changes the ETag, so every other waiter gets 412.
  Renewal and release are conditional on the holder's own ETag in the same
  way, so a holder whose lease was taken over cannot touch the new lock.

Clocks: expiry times are written by the holder's clock and read by the
waiter's; machines sharing a store need clocks within a small part of the
lease (NTP keeps them within milliseconds).

Example:
    >>> import tempfile
    >>> locks = StoreLocks(LocalBackend(tempfile.mkdtemp()), lease_s=30)
    >>> locks.acquire("stage-key", "run-1", timeout=0)
    True
    >>> locks.acquire("stage-key", "run-2", timeout=0), locks.holder_of("stage-key").holder
    (False, 'run-1')
    >>> locks.release("stage-key", "run-1"); locks.is_locked("stage-key")
    False
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import quote

from .backends import FsspecBackend, LocalBackend, _oserror_to_store_error
from .errors import LockNotHeldError, StoreError, StorePermissionError, StoreUnavailableError
from .keys import normalize_key

LOCKS_DIR = "locks"
DEFAULT_LEASE_S = 60.0
# A waiter breaking an expired lease holds <lock>.breaking for microseconds; one
# older than this was left by a killed process. The holder's release waits this
# long at most for a breaker to finish.
_GUARD_STALE_S = 5.0
_GUARD_WAIT_S = 5.0
_BODY_BLOCK = 512  # local bodies are padded to a multiple: a renewal rewrites them in place
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock, as its file says."""

    key: str
    holder: str
    host: str
    pid: int
    expires: float  # seconds since the epoch, by the holder's clock
    token: str  # unique per acquisition
    lease_s: float

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


class _Place(Protocol):
    """Where lock files live: a folder or a bucket. ``ident`` tells one version of a file
    from another (an inode, an ETag)."""

    where: str

    def create(self, rel: str, body: bytes) -> Any | None: ...
    def read(self, rel: str) -> tuple[bytes, Any, float] | None: ...
    def take_over(self, rel: str, ident: Any, body: bytes) -> Any | None: ...
    def renew(self, rel: str, handle: Any, body: bytes) -> Any | None: ...
    def delete(self, rel: str, ident: Any) -> bool: ...
    def ident(self, handle: Any) -> Any: ...
    def forget(self, handle: Any) -> None: ...


class _Folder:
    """Lock files in a local folder; a handle is ``(fd, inode)``, kept open while held."""

    def __init__(self, backend: LocalBackend) -> None:
        self.root = str(backend.root)
        self.where = backend.describe()

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    @contextlib.contextmanager
    def _errors(self, rel: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise _oserror_to_store_error(exc, f"lock file {self._path(rel)}") from exc

    def create(self, rel: str, body: bytes) -> tuple[int, int] | None:
        path = self._path(rel)
        with self._errors(rel):
            for _ in range(2):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return None
                except FileNotFoundError:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    continue
                try:
                    os.write(fd, body)
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    raise
                return fd, os.fstat(fd).st_ino
        return None

    def _read_file(self, rel: str) -> tuple[bytes, os.stat_result] | None:
        """The lock file's bytes and stat, from one open; None if there is none."""
        try:
            fd = os.open(self._path(rel), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            return os.read(fd, max(st.st_size, _BODY_BLOCK) + _BODY_BLOCK), st
        finally:
            os.close(fd)

    def read(self, rel: str) -> tuple[bytes, tuple[int, bytes | None], float] | None:
        with self._errors(rel):
            found = self._read_file(rel)
        if found is None:
            return None
        data, st = found
        # NOTE: an inode number alone does not name one version of a lock: once a
        # dead holder's file is gone, the next lock file may get the same number.
        # The content (a token unique per acquisition, the expiry) does.
        return data, (st.st_ino, hashlib.sha256(data).digest()), st.st_mtime

    def _remove_if_same(self, rel: str, ident: tuple[int, bytes | None], *, wait: bool) -> bool:
        """Delete ``rel`` if it is still the version ``ident``; True if this call removed it.

        ``ident`` is ``(inode, digest of the content)`` as read, or ``(inode, None)``
        from the holder itself, whose open file keeps its inode number from reuse.

        NOTE: check and delete happen under a guard file (``<lock>.breaking``,
        O_EXCL), so of several callers that judged the same version expired, one
        deletes it and the others, checking after it, find another version (the
        winner's new lock) and leave it alone. An earlier design renamed the lock
        aside to check it, which for a moment removed a live lock a newcomer could
        then also create. A guard left by a caller killed in these few
        microseconds is cleared after _GUARD_STALE_S. The holder releasing its own
        lock (``wait``) waits for the guard instead of giving up.
        """
        ino, digest = ident
        path = self._path(rel)
        guard = path + ".breaking"
        deadline = time.monotonic() + _GUARD_WAIT_S
        with self._errors(rel):
            while True:
                try:
                    guard_fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    break
                except FileExistsError:
                    with contextlib.suppress(FileNotFoundError):
                        if time.time() - os.stat(guard).st_mtime > _GUARD_STALE_S:
                            os.unlink(guard)
                            continue
                    if not wait or time.monotonic() > deadline:
                        return False
                    time.sleep(0.001)
            try:
                found = self._read_file(rel)
                if found is None:
                    return False
                data, st = found
                if st.st_ino != ino or (digest is not None
                                        and hashlib.sha256(data).digest() != digest):
                    return False
                os.unlink(path)
                return True
            finally:
                os.close(guard_fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(guard)

    def take_over(self, rel: str, ident: tuple[int, bytes | None], body: bytes) -> tuple[int, int] | None:
        return self.create(rel, body) if self._remove_if_same(rel, ident, wait=False) else None

    def renew(self, rel: str, handle: tuple[int, int], body: bytes) -> tuple[int, int] | None:
        fd, ino = handle
        with self._errors(rel):
            try:
                if os.stat(self._path(rel)).st_ino != ino:
                    return None
            except FileNotFoundError:
                return None
            # NOTE: same length, one write at offset 0: never a shorter file, and the
            # inode (what a waiter compares) stays the same.
            os.pwrite(fd, body, 0)
        return handle

    def delete(self, rel: str, ident: tuple[int, bytes | None]) -> bool:
        return self._remove_if_same(rel, ident, wait=True)

    def ident(self, handle: tuple[int, int]) -> tuple[int, None]:
        return handle[1], None

    def forget(self, handle: tuple[int, int]) -> None:
        with contextlib.suppress(OSError):
            os.close(handle[0])


class _Bucket:
    """Lock objects on S3, written with conditional requests; a handle is the ETag."""

    def __init__(self, backend: FsspecBackend) -> None:
        if backend.protocol not in ("s3", "s3a"):
            raise StoreError(
                f"locks need a local folder or S3; the store at {backend.describe()} is "
                f"{backend.protocol}://, which has no conditional writes"
            )
        self.backend = backend
        self.fs: Any = backend.fs
        self.where = backend.describe()

    def _split(self, rel: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(f"{self.backend.root}/{rel}")
        return bucket, key

    def _call(self, rel: str, method: str, **kwargs: Any) -> dict[str, Any] | None:
        """``method`` on the lock object (a body read too); None where a condition failed
        or the object is gone."""
        import fsspec.asyn

        bucket, key = self._split(rel)

        async def call() -> dict[str, Any]:
            done = dict(await self.fs._call_s3(method, Bucket=bucket, Key=key, **kwargs))
            if "Body" in done:
                async with done["Body"] as stream:
                    done["Body"] = await stream.read()
            return done

        try:
            return dict(fsspec.asyn.sync(self.fs.loop, call))
        except (FileNotFoundError, FileExistsError):
            return None  # 404, or 412 on If-None-Match (s3fs translates both)
        except OSError as exc:
            code = _s3_code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"):
                return None
            what = f"{method} of lock {self.backend.url_for(rel)} at {self.where}"
            if isinstance(exc, PermissionError) or code in ("AccessDenied", "403"):
                raise StorePermissionError(f"{what} was refused: {exc}") from exc
            raise StoreUnavailableError(f"{what} failed: {exc}") from exc

    def create(self, rel: str, body: bytes) -> str | None:
        done = self._call(rel, "put_object", Body=body, IfNoneMatch="*")
        return None if done is None else str(done["ETag"])

    def read(self, rel: str) -> tuple[bytes, str, float] | None:
        done = self._call(rel, "get_object")
        if done is None:
            return None
        return bytes(done["Body"]), str(done["ETag"]), done["LastModified"].timestamp()

    def take_over(self, rel: str, ident: str, body: bytes) -> str | None:
        done = self._call(rel, "put_object", Body=body, IfMatch=ident)
        return None if done is None else str(done["ETag"])

    def renew(self, rel: str, handle: str, body: bytes) -> str | None:
        return self.take_over(rel, handle, body)

    def delete(self, rel: str, ident: str) -> bool:
        return self._call(rel, "delete_object", IfMatch=ident) is not None

    def ident(self, handle: str) -> str:
        return handle

    def forget(self, handle: str) -> None:
        pass


def _s3_code(exc: BaseException) -> str | None:
    for err in (exc, exc.__cause__, exc.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return None


@dataclass
class _Held:
    """A lock this process holds: what renews it, and what proves it is still ours."""

    place: _Place
    rel: str
    info: LockInfo
    handle: Any
    size: int
    renew: bool


class StoreLocks:
    """Acquire, renew and release lease locks under ``locks/`` of a store.

    Args:
        backend: the store's backend (``ObjectStore.backend``): a local folder or S3.
        lease_s: how long a lock outlives a holder that stopped renewing it.
        poll_s: the longest wait between two looks at a lock held by someone else.
    """

    def __init__(self, backend: LocalBackend | FsspecBackend, *, lease_s: float = DEFAULT_LEASE_S,
                 poll_s: float | None = None) -> None:
        if lease_s <= 0:
            raise StoreError(f"a lock lease must be positive, not {lease_s!r} seconds")
        self.place: _Place = _Folder(backend) if isinstance(backend, LocalBackend) else _Bucket(backend)
        self.url = backend.url
        self.lease_s = float(lease_s)
        self.poll_s = poll_s if poll_s is not None else (0.25 if isinstance(backend, LocalBackend) else 1.0)

    def _rel(self, key: str) -> str:
        name = quote(normalize_key(key, "lock key"), safe="")
        if len(name) > 200:  # a file name has 255 bytes at most
            name = hashlib.sha256(name.encode("utf-8")).hexdigest()
        return f"{LOCKS_DIR}/{name}"

    # -- reading -----------------------------------------------------------
    def _read(self, key: str) -> tuple[LockInfo, Any] | None:
        found = self.place.read(self._rel(key))
        if found is None:
            return None
        data, ident, mtime = found
        try:
            doc = json.loads(data)
            info = LockInfo(key=str(doc["key"]), holder=str(doc["holder"]), host=str(doc["host"]),
                            pid=int(doc["pid"]), expires=float(doc["expires"]),
                            token=str(doc["token"]), lease_s=float(doc["lease_s"]))
        except (ValueError, KeyError, TypeError):
            # NOTE: a file caught between create and write (or torn by a crash):
            # held, by nobody we can name, for one lease from its last change.
            info = LockInfo(key=key, holder="?", host="?", pid=0, expires=mtime + self.lease_s,
                            token="?", lease_s=self.lease_s)
        return info, ident

    def holder_of(self, key: str) -> LockInfo | None:
        """Who holds ``key``'s lock now; None when it is free or its lease has expired."""
        held = _registry.get(self.url, self._rel(key))
        if held is not None and not held.info.expired():
            # NOTE: held by this process and renewed by it: no request needed. A
            # lease taken over while this process stalled drops out at the next beat.
            return held.info
        found = self._read(key)
        return None if found is None or found[0].expired() else found[0]

    def is_locked(self, key: str) -> bool:
        return self.holder_of(key) is not None

    # -- acquiring -----------------------------------------------------------
    def try_acquire(self, key: str, holder: str, *, lease_s: float | None = None,
                    renew: bool = True) -> bool:
        """One attempt: True if ``holder`` holds ``key``'s lock now (it may have already)."""
        rel = self._rel(key)
        held = _registry.get(self.url, rel)
        if held is not None and held.info.holder == holder:
            return True
        lease = float(lease_s) if lease_s is not None else self.lease_s
        token = uuid.uuid4().hex
        for _ in range(3):  # a lock released between our create and our read: try again
            info = LockInfo(key=key, holder=str(holder), host=socket.gethostname(), pid=os.getpid(),
                            expires=time.time() + lease, token=token, lease_s=lease)
            body, size = _body(info)
            handle = self.place.create(rel, body)
            if handle is None:
                found = self._read(key)
                if found is None:
                    continue
                current, ident = found
                if current.token == token:  # our own create, answered 412 on a retry
                    handle = ident
                elif not current.expired():
                    return False
                else:
                    handle = self.place.take_over(rel, ident, body)
                    if handle is None:
                        return False
                    logger.warning("lock %s: took over the expired lease of %s (host %s, pid %d)",
                                   key, current.holder, current.host, current.pid)
            _registry.add(self.url, rel, _Held(self.place, rel, info, handle, size, renew))
            return True
        return False

    def acquire(self, key: str, holder: str, *, timeout: float | None = None,
                lease_s: float | None = None, renew: bool = True) -> bool:
        """Wait up to ``timeout`` seconds (None: for as long as it takes) for ``key``'s lock.

        Args:
            key: what the lock guards (a cache key, a model name).
            holder: who asks; only the same holder can release it.
            timeout: 0 tries once.
            lease_s: this lock's lease (default: the store's).
            renew: keep the lease fresh while this process lives (default); False
                lets it lapse after ``lease_s`` even if never released.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = min(0.02, self.poll_s)
        while not self.try_acquire(key, holder, lease_s=lease_s, renew=renew):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            wait = pause * random.uniform(0.8, 1.2)
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            time.sleep(wait)
            pause = min(pause * 2, self.poll_s)
        return True

    def wait(self, key: str, timeout: float | None = None) -> bool:
        """Wait until ``key``'s lock is free (released or expired); False after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = min(0.02, self.poll_s)
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, self.poll_s)
        return True

    # -- releasing -----------------------------------------------------------
    def release(self, key: str, holder: str) -> None:
        """Release ``key``'s lock held by ``holder``.

        Raises:
            LockNotHeldError: ``holder`` does not hold it (another does, nobody
                does, or its lease expired and was taken over).
        """
        rel = self._rel(key)
        held = _registry.get(self.url, rel)
        if held is not None and held.info.holder == holder:
            _registry.remove(self.url, rel, held)
            place = held.place
            try:
                if place.delete(rel, place.ident(held.handle)):
                    return
            finally:
                place.forget(held.handle)
        found = self._read(key)
        if found is not None and found[0].holder == holder and not found[0].expired():
            if self.place.delete(rel, found[1]):  # a holder in another process, by name
                return
            found = self._read(key)
        current = None if found is None or found[0].expired() else found[0]
        raise LockNotHeldError(key, holder, self.url, current)


def _body(info: LockInfo) -> tuple[bytes, int]:
    text = json.dumps({"key": info.key, "holder": info.holder, "host": info.host, "pid": info.pid,
                       "expires": round(info.expires, 3), "lease_s": info.lease_s,
                       "token": info.token, "version": 1})
    size = -(-(len(text) + 1) // _BODY_BLOCK) * _BODY_BLOCK
    return _padded(text, size), size


def _padded(text: str, size: int) -> bytes:
    return (text + " " * (size - len(text) - 1) + "\n").encode("utf-8")


class _Registry:
    """Every lock this process holds, renewed by one daemon thread."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], _Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def get(self, url: str, rel: str) -> _Held | None:
        with self._lock:
            return self._held.get((url, rel))

    def add(self, url: str, rel: str, held: _Held) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a forked child holds none of its parent's locks
                self._held, self._thread, self._pid = {}, None, os.getpid()
            self._held[(url, rel)] = held
            if held.renew and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._heartbeat, name="uncool-lock-lease",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def remove(self, url: str, rel: str, held: _Held) -> None:
        with self._lock:
            if self._held.get((url, rel)) is held:
                del self._held[(url, rel)]

    def _heartbeat(self) -> None:
        while True:
            with self._lock:
                items = list(self._held.items())
            now = time.time()
            due = [(k, h) for k, h in items if h.renew and h.info.expires - now <= h.info.lease_s * 2 / 3]
            for (url, rel), held in due:
                self._renew(url, rel, held)
            with self._lock:
                waits = [h.info.expires - h.info.lease_s * 2 / 3 - time.time()
                         for h in self._held.values() if h.renew]
            self._wake.clear()
            self._wake.wait(max(0.05, min(waits, default=60.0)))

    def _renew(self, url: str, rel: str, held: _Held) -> None:
        info = replace(held.info, expires=time.time() + held.info.lease_s)
        body, _ = _body(info)
        try:
            handle = held.place.renew(rel, held.handle, _padded(body.decode().rstrip(), held.size))
        except StoreError as exc:  # the next beat tries again; the lease allows two misses
            logger.warning("lock %s on %s: could not renew its lease: %s", info.key, url, exc)
            return
        with self._lock:
            if self._held.get((url, rel)) is not held:
                return  # released meanwhile
            if handle is None:
                del self._held[(url, rel)]
            else:
                held.info, held.handle = info, handle
        if handle is None:
            held.place.forget(held.handle)
            logger.error("lock %s on %s: lost: its lease expired and another holder took it "
                         "over; this holder was stalled longer than the lease (%.0f s)",
                         info.key, url, info.lease_s)


_registry = _Registry()

