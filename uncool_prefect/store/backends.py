"""Where the bytes go: a local folder, or any fsspec filesystem (S3 first).

Both backends speak in paths relative to the store's root (``objects/...``,
``refs/...``) and translate every low-level failure into the store's exception
set, so :mod:`objects` never sees a botocore or errno detail.

Local writes follow restic's ``Save``: temp file on the same file system,
write, check the byte count, fsync, rename, fsync the folder. Disk full and
permission errors are permanent: one attempt, temp removed, clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import io
import itertools
import mmap
import os
import queue
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import fsspec.asyn
from fsspec.callbacks import Callback, NoOpCallback

from .errors import (
    StoreError,
    StoreFullError,
    StorePermissionError,
    StoreUnavailableError,
)

TMP_DIR = "tmp"
# Object stores where one PUT (or a completed multipart upload) is atomic.
ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}
S3_PART_SIZE = 8 << 20
S3_PARTS_IN_FLIGHT = 4  # 32 MiB of parts in memory at most
S3_MAX_PARTS = 10_000  # S3's limit; bigger files get bigger parts
# NOTE: botocore's connect and read timeouts do not cover a request body that
# stops moving (a peer that no longer reads): every request that sends a body
# gets a deadline of its own, SEND_BASE_S plus the time its bytes take at
# SEND_MIN_RATE, and SEND_ATTEMPTS tries. Both can be set for slow links.
SEND_BASE_S = float(os.environ.get("UNCOOL_S3_SEND_TIMEOUT", "30"))
SEND_MIN_RATE = float(os.environ.get("UNCOOL_S3_MIN_RATE", str(256 << 10)))  # bytes per second
SEND_ATTEMPTS = 3

# Local ingest of big files: read, write and hash overlap in three threads
# over a few 1 MiB buffers (8 MiB in memory at most, whatever the file size).
COPY_CHUNK = 1 << 20
COPY_BUFFERS = 8
# From this size on a temp file is written with O_DIRECT (still fsynced):
# the bytes must reach the disk before the rename anyway, and going around
# the page cache saves a copy and a flush that would otherwise come last.
DIRECT_MIN_SIZE = 8 << 20
_DIRECT_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime: float  # seconds since the epoch


def _oserror_to_store_error(exc: OSError, where: str) -> StoreError:
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return StoreFullError(
            f"no space left on the device holding {where}; free some space "
            "(`uncool store gc` removes unreferenced objects) or move the store"
        )
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorePermissionError(
            f"permission denied writing or reading {where} ({exc.strerror}); "
            "check the folder's owner and mode, or point --basepath/UNCOOL_STORE "
            "at a folder you can write"
        )
    return StoreError(f"I/O error on {where}: {exc}")


@contextlib.contextmanager
def _local_errors(where: str) -> Iterator[None]:
    try:
        yield
    except StoreError:
        raise
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _oserror_to_store_error(exc, where) from exc


def _syncfs(path: Path) -> None:
    """Flush every dirty page of the file system holding ``path``, in one call."""
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if hasattr(libc, "syncfs") and libc.syncfs(fd) == 0:
            return
        os.sync()
    finally:
        os.close(fd)


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False where the file system refuses."""
    if not _O_DIRECT:
        return False
    import fcntl

    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
    except OSError:
        return False
    return True


class _Writer:
    """``os.write`` until done, with O_DIRECT while the file system takes it."""

    def __init__(self, fd: int, direct: bool) -> None:
        self.fd = fd
        self.direct = direct and _set_direct(fd, True)

    def write(self, view: memoryview) -> None:
        while view:
            if self.direct and len(view) % _DIRECT_ALIGN:
                self._buffered()  # the unaligned tail (the last chunk) goes buffered
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                if self.direct and exc.errno == errno.EINVAL:
                    self._buffered()  # alignment the device does not take: retry buffered
                    continue
                raise
            view = view[n:]

    def _buffered(self) -> None:
        _set_direct(self.fd, False)
        self.direct = False


def _join_all(threads: list[threading.Thread]) -> None:
    """Join every thread, even across a KeyboardInterrupt (re-raised after)."""
    interrupted: BaseException | None = None
    for thread in threads:
        while thread.is_alive():
            try:
                thread.join()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                interrupted = exc
    if interrupted is not None:
        raise interrupted


def _copy_pipelined(source: int, target: int, digest: Callable[[memoryview], object],
                    progress: Callable[[int], object] | None, direct: bool) -> int:
    """Copy ``source`` to ``target`` in 1 MiB chunks, feeding each to ``digest``.

    The calling thread reads; one thread writes and one hashes, in order, each
    chunk read once into one of a few shared buffers that go back to the reader
    only when both are done. hashlib and os.write release the GIL, so on two
    cores the copy costs little more than the hash. Any error stops all three
    and is raised here, after both threads have finished.
    """
    free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    for _ in range(COPY_BUFFERS):
        free.put(mmap.mmap(-1, COPY_CHUNK))  # page-aligned, as O_DIRECT wants
    to_write: queue.SimpleQueue[tuple[mmap.mmap, int] | None] = queue.SimpleQueue()
    to_hash: queue.SimpleQueue[tuple[mmap.mmap, int] | None] = queue.SimpleQueue()
    errors: list[BaseException] = []
    writer = _Writer(target, direct)

    def write_stage() -> None:
        while (item := to_write.get()) is not None:
            if not errors:
                try:
                    writer.write(memoryview(item[0])[: item[1]])
                except BaseException as exc:  # noqa: BLE001 - raised by the reader
                    errors.append(exc)
            to_hash.put(item)
        to_hash.put(None)

    def hash_stage() -> None:
        while (item := to_hash.get()) is not None:
            if not errors:
                try:
                    digest(memoryview(item[0])[: item[1]])
                except BaseException as exc:  # noqa: BLE001 - raised by the reader
                    errors.append(exc)
            free.put(item[0])

    threads = [threading.Thread(target=write_stage, name="uncool-write", daemon=True),
               threading.Thread(target=hash_stage, name="uncool-hash", daemon=True)]
    for thread in threads:
        thread.start()
    total = 0
    try:
        while not errors:
            buffer = free.get()
            n = os.readv(source, [buffer])
            if not n:
                break
            total += n
            to_write.put((buffer, n))
            if progress is not None:
                progress(n)
    finally:
        to_write.put(None)
        _join_all(threads)
    if errors:
        raise errors[0]
    return total


class LocalBackend:
    """A store in a local folder: atomic, durable, read-only objects."""

    is_local = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        # NOTE: hot paths (thousands of small files) use plain strings, not Path.
        self._root_s = self.url.rstrip("/") + "/"
        self._tmp_s = self._root_s + TMP_DIR
        # Folders known to exist *durably* (created with their parent fsynced).
        self._made_dirs: set[str] = set()
        self._temp_prefix = uuid.uuid4().hex[:16]
        self._temp_counter = itertools.count()

    def describe(self) -> str:
        return self.url

    def url_for(self, rel: str) -> str:
        return str(self.root / rel)

    # -- reading -----------------------------------------------------------
    def stat(self, rel: str) -> FileStat | None:
        try:
            st = os.stat(self.root / rel)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _oserror_to_store_error(exc, self.url_for(rel)) from exc
        return FileStat(st.st_size, st.st_mtime)

    def open_read(self, rel: str) -> IO[bytes]:
        with _local_errors(self.url_for(rel)):
            return open(self.root / rel, "rb", buffering=0)

    def read_bytes(self, rel: str) -> bytes:
        with _local_errors(self.url_for(rel)):
            return (self.root / rel).read_bytes()

    def list(self, prefix: str) -> Iterator[tuple[str, FileStat]]:
        base = self.root / prefix
        if not base.exists():
            return
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                full = Path(dirpath) / name
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue
                yield full.relative_to(self.root).as_posix(), FileStat(st.st_size, st.st_mtime)

    # -- writing -----------------------------------------------------------
    def _ensure_dir(self, directory: str | os.PathLike[str]) -> None:
        self.ensure_dirs([directory])

    def ensure_dirs(self, directories: Iterable[str | os.PathLike[str]]) -> None:
        """Create missing folders durably, fsyncing each parent folder once.

        NOTE: a new folder is durable only once its parent is fsynced; the 256
        fan-out folders of a fresh store share one parent, so a batch costs one
        fsync there instead of 256.
        """
        to_sync: set[str] = set()
        created: list[str] = []
        for directory in directories:
            key = os.fspath(directory)
            if key in self._made_dirs:
                continue
            if not os.path.isdir(key):
                probe = key
                missing = []
                while not os.path.exists(probe) and probe != os.path.dirname(probe):
                    missing.append(probe)
                    probe = os.path.dirname(probe)
                os.makedirs(key, exist_ok=True)
                to_sync.update(os.path.dirname(m) for m in missing)
            created.append(key)
        # Parents first, so that each level is durable before the one below it.
        for parent in sorted(to_sync, key=len):
            _fsync_dir(parent)
        self._made_dirs.update(created)

    def _new_temp(self) -> tuple[str, int]:
        """Create an exclusive temp file in tmp/; return (path, fd)."""
        with _local_errors(self._tmp_s):
            if self._tmp_s not in self._made_dirs:
                self._ensure_dir(self._tmp_s)
            # NOTE: random per backend, the pid for a forked child that
            # inherits both, a counter within the process; O_EXCL in any case.
            path = (f"{self._tmp_s}/{self._temp_prefix}-{os.getpid()}"
                    f"-{next(self._temp_counter)}.tmp")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return path, fd

    @contextlib.contextmanager
    def _temp_file(self, durable: bool) -> Iterator[tuple[str, int]]:
        """A new temp file to fill: made read-only (and fsynced if ``durable``)
        when the block ends, removed if anything in it fails."""
        path, fd = self._new_temp()
        try:
            with _local_errors(path):
                yield path, fd
                os.fchmod(fd, 0o444)
                if durable:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)

    def write_temp_bytes(self, data: bytes | memoryview, *, durable: bool = True) -> str:
        """Write ``data`` to a new read-only temp file; return its path."""
        with self._temp_file(durable) as (path, fd):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        return path

    def copy_to_temp(
        self,
        source: int,
        digest: Callable[[memoryview], object],
        progress: Callable[[int], object] | None = None,
        *,
        durable: bool = True,
        size_hint: int = 0,
    ) -> tuple[Path, int]:
        """Copy everything readable from file descriptor ``source`` to a new temp file.

        Every byte written is handed to ``digest`` too, in order, from one
        read: what the temp file holds is exactly what was hashed. Reading,
        writing and hashing overlap (see :func:`_copy_pipelined`); files of
        ``DIRECT_MIN_SIZE`` or more are written with O_DIRECT. Returns the temp
        file (read-only, fsynced if ``durable``) and its size; removes it if
        anything fails.
        """
        with self._temp_file(durable) as (path, fd):
            size = _copy_pipelined(source, fd, digest, progress,
                                   direct=size_hint >= DIRECT_MIN_SIZE)
        return Path(path), size

    def write_temp(
        self,
        chunks: Iterator[bytes | memoryview],
        *,
        durable: bool = True,
    ) -> tuple[Path, int]:
        """Write ``chunks`` to a new temp file; return its path and size.

        The temp file is removed if anything fails, including the iterator.
        """
        written = 0
        with self._temp_file(durable) as (path, fd):
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    written += n
        return Path(path), written

    def commit(self, temp: str | os.PathLike[str], rel: str, *, durable: bool = True) -> bool:
        """Move a finished temp file to ``rel``; False if it was already there.

        With ``durable=False`` the rename is not fsynced: the caller makes a
        whole batch durable with one :meth:`sync` afterwards. Missing folders
        are always created durably (see :meth:`ensure_dirs`).
        """
        final = self._root_s + rel
        parent = final.rpartition("/")[0]
        with _local_errors(final):
            try:
                # NOTE: freshen, not exists: an object a gc takes between the
                # check and here must be written again, not counted as present.
                if self.freshen(rel):
                    os.unlink(temp)
                    return False
                if parent not in self._made_dirs:
                    self._ensure_dir(parent)
                os.replace(temp, final)
                if durable:
                    _fsync_dir(parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
        return True

    def sync(self) -> None:
        """Make every write so far durable (one ``syncfs`` for a whole batch)."""
        with _local_errors(self.url):
            _syncfs(self.root)

    def fsync_paths(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """fsync each file or folder given (a small batch's alternative to :meth:`sync`)."""
        for path in paths:
            with _local_errors(os.fspath(path)):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def write_bytes(self, rel: str, data: bytes, *, overwrite: bool = False) -> bool:
        temp = Path(self.write_temp_bytes(data))
        if overwrite:
            final = self.root / rel
            with _local_errors(str(final)):
                try:
                    self._ensure_dir(final.parent)
                    os.replace(temp, final)
                    _fsync_dir(final.parent)
                except BaseException:
                    with contextlib.suppress(OSError):
                        temp.unlink()
                    raise
            return True
        return self.commit(temp, rel)

    def freshen(self, rel: str) -> bool:
        """Mark an existing object as just used, so a running gc spares it.

        Returns False if the object vanished (a gc took it): write it again.
        """
        # NOTE: one utime, not a stat and then a utime if the object is older
        # than a second: the utime fails on a missing object just the same,
        # and a re-put of unchanged data finds objects days old, so it paid
        # for both calls on every file (200,000 objects on this VM, busy: both
        # 3.4-4.9 s, the utime alone 2.4-2.6 s).
        try:
            os.utime(self._root_s + rel)
        except FileNotFoundError:
            return False
        except PermissionError:
            pass  # someone else's object: its age is theirs to manage
        return True

    def delete(self, rel: str, *, unless_newer_than: float | None = None) -> bool:
        """Remove ``rel``; with ``unless_newer_than``, spare it if touched since.

        NOTE: the object is first renamed into tmp/ and its mtime read again
        there, so a writer that freshened it a moment ago (or is about to, and
        then finds it gone and rewrites it) never ends up with a dangling ref.
        """
        path = self.root / rel
        if unless_newer_than is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                return True
            return False
        trash = self.root / TMP_DIR / f"gc-{uuid.uuid4().hex}.trash"
        with _local_errors(str(path)):
            self._ensure_dir(trash.parent)
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return False
            if os.stat(trash).st_mtime > unless_newer_than:
                if not path.exists():
                    os.rename(trash, path)
                else:
                    trash.unlink()
                return False
            trash.unlink()
        return True

    def quarantine(self, rel: str) -> str | None:
        """Move a corrupt object out of the way (into tmp/); return where to."""
        target = self.root / quarantine_rel(rel)
        try:
            self._ensure_dir(target.parent)
            os.rename(self.root / rel, target)
        except OSError:
            return None
        return str(target)

    def make_writable(self, rel: str) -> None:
        os.chmod(self.root / rel, 0o644)

    def stale_uploads(self, started_before: float) -> tuple[tuple[str, str], ...]:
        """Unfinished multipart uploads: a local folder has none (temp files are tmp/'s)."""
        return ()

    def abort_upload(self, key: str, upload_id: str) -> None:
        raise NotImplementedError("a local folder has no multipart uploads")


class FsspecBackend:
    """A store on any fsspec filesystem; S3 gets bounded retries and multipart."""

    is_local = False
    # NOTE: freshening a remote object is a server-side copy; do it rarely.
    freshen_after_s = 15 * 60.0

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        options = dict(storage_options or {})
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("s3", "s3a"):
            options = _s3_defaults(options)
        self.fs, root = fsspec.core.url_to_fs(url, **options)
        if protocol in ("s3", "s3a"):
            # NOTE: s3fs has a retry loop of its own on top of botocore's; one
            # attempt there keeps the total the one configured in _s3_defaults,
            # not a product of the two.
            self.fs.retries = 1
        self.protocol = protocol
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self._atomic_put = protocol in ATOMIC_PUT_PROTOCOLS
        self.endpoint = _endpoint_of(self.fs)

    def describe(self) -> str:
        return f"{self.url} (endpoint {self.endpoint})" if self.endpoint else self.url

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def url_for(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    @contextlib.contextmanager
    def _errors(self, rel: str, *, reading: bool = False) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except FileNotFoundError as exc:
            if _is_missing_bucket(exc):
                raise StoreUnavailableError(
                    f"the bucket of {self.url} does not exist at {self.describe()}; "
                    "create it or fix the store URL"
                ) from exc
            if reading:
                raise
            raise StoreError(f"cannot write {self.url_for(rel)}: {exc}") from exc
        except PermissionError as exc:
            raise StorePermissionError(
                f"access denied to {self.url_for(rel)} ({exc}); check the credentials "
                "(AwsCredentials block, AWS_* variables) and the bucket policy"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM):
                raise _oserror_to_store_error(exc, self.url_for(rel)) from exc
            raise StoreUnavailableError(
                f"{self.describe()} did not answer for {rel}: {exc}"
            ) from exc
        except Exception as exc:
            if _is_connection_error(exc):
                raise StoreUnavailableError(
                    f"cannot reach {self.describe()} (after retries): {exc}. "
                    "Check that the endpoint is up and the URL is right."
                ) from exc
            raise

    def stat(self, rel: str) -> FileStat | None:
        with self._errors(rel, reading=True):
            try:
                info = self.fs.info(self._path(rel))
            except FileNotFoundError as exc:
                if _is_missing_bucket(exc):
                    raise
                return None
        if info.get("type") == "directory":
            return None
        return FileStat(int(info.get("size") or 0), _mtime_of(info))

    def open_read(self, rel: str) -> IO[bytes]:
        with self._errors(rel, reading=True):
            raw = self.fs.open(self._path(rel), "rb", block_size=4 << 20)
        # NOTE: s3fs fetches lazily: the GETs (and their errors) come with read().
        return _TranslatingReader(raw, lambda: self._errors(rel, reading=True))  # type: ignore[return-value]

    def read_bytes(self, rel: str) -> bytes:
        with self._errors(rel, reading=True):
            data: bytes = self.fs.cat_file(self._path(rel))
            return data

    def list(self, prefix: str) -> Iterator[tuple[str, FileStat]]:
        base = self._path(prefix)
        with self._errors(prefix, reading=True):
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError as exc:
                if _is_missing_bucket(exc):
                    raise
                return
        strip = len(self.root) + 1 if self.root else 0
        for path, info in sorted(found.items()):
            if info.get("type") == "directory":
                continue
            yield path[strip:], FileStat(int(info.get("size") or 0), _mtime_of(info))

    def write_bytes(self, rel: str, data: bytes, *, overwrite: bool = False) -> bool:
        if not overwrite and self.stat(rel) is not None:
            self.freshen(rel)
            return False
        with self._errors(rel):
            if self._atomic_put:
                self._send("pipe_file", (self._path(rel), data), len(data), rel)
            else:
                tmp = self._path(f"{TMP_DIR}/{uuid.uuid4().hex}.tmp")
                self._send("pipe_file", (tmp, data), len(data), rel)
                self.fs.mv(tmp, self._path(rel))
        return True

    def _send(self, method: str, args: tuple[Any, ...], size: int, rel: str, **kwargs: Any) -> None:
        """``fs.<method>(*args)`` (pipe_file, put_file) within its deadline (see SEND_BASE_S).

        Only async file systems (s3fs, gcsfs...) can be given a deadline; the
        others (memory://) write in this process and cannot stall on a peer.
        """
        if not getattr(self.fs, "async_impl", False):
            getattr(self.fs, method)(*args, **kwargs)
            return
        request = getattr(self.fs, "_" + method)
        fsspec.asyn.sync(self.fs.loop, _within_deadline,
                         lambda: request(*args, **kwargs), size,
                         f"{self.url_for(rel)} to {self.describe()}")

    def put_local_file(self, local: Path, rel: str, callback: Callback | None = None) -> None:
        """Upload a local file to ``rel``; nothing appears there unless it completes."""
        callback = callback or NoOpCallback()
        target = self._path(rel)
        with self._errors(rel):
            size = local.stat().st_size
            if self.protocol in ("s3", "s3a") and size >= 2 * S3_PART_SIZE:
                fsspec.asyn.sync(self.fs.loop, _s3_multipart_put, self.fs, local, size, target,
                                 callback)
            elif self._atomic_put:
                self._send("put_file", (str(local), target), size, rel, callback=callback)
            else:
                tmp = self._path(f"{TMP_DIR}/{uuid.uuid4().hex}.tmp")
                self._send("put_file", (str(local), tmp), size, rel, callback=callback)
                self.fs.mv(tmp, target)

    def sync(self) -> None:
        """Remote writes are durable once acknowledged."""

    def freshen(self, rel: str) -> bool:
        stat = self.stat(rel)
        if stat is None:
            return False
        if time.time() - stat.mtime > self.freshen_after_s:
            with self._errors(rel):
                # NOTE: a copy onto itself is how S3 updates LastModified.
                if self.protocol in ("s3", "s3a"):
                    bucket, key, _ = self.fs.split_path(self._path(rel))
                    self.fs.call_s3(
                        "copy_object", Bucket=bucket, Key=key,
                        CopySource={"Bucket": bucket, "Key": key},
                        MetadataDirective="REPLACE",
                    )
                else:
                    self.fs.touch(self._path(rel), truncate=False)
        return True

    def stale_uploads(self, started_before: float) -> tuple[tuple[str, str], ...]:
        """``(key, upload id)`` of multipart uploads under this store idle since before the time given.

        A writer killed mid-upload leaves one behind, its parts billed until
        aborted. Idle: begun before that time, and no part sent since.
        """
        if self.protocol not in ("s3", "s3a"):
            return ()
        bucket, prefix, _ = self.fs.split_path(self._path(""))
        found: tuple[tuple[str, str], ...] = ()
        marker: dict[str, str] = {}
        with self._errors(""):
            while True:
                page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket,
                                       Prefix=prefix.rstrip("/") + "/" if prefix else "", **marker)
                for upload in page.get("Uploads", []):
                    key, upload_id = str(upload["Key"]), str(upload["UploadId"])
                    initiated = upload.get("Initiated")
                    if initiated is not None and initiated.timestamp() >= started_before:
                        continue
                    # NOTE: a long upload begun before the cutoff may still be sending
                    # parts: its latest part says whether its writer is alive.
                    parts = self.fs.call_s3("list_parts", Bucket=bucket, Key=key,
                                            UploadId=upload_id).get("Parts", [])
                    if any(part["LastModified"].timestamp() >= started_before for part in parts):
                        continue
                    found += ((key, upload_id),)
                if not page.get("IsTruncated"):
                    return found
                marker = {"KeyMarker": page["NextKeyMarker"],
                          "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_upload(self, key: str, upload_id: str) -> None:
        bucket = self.fs.split_path(self._path(""))[0]
        with self._errors(""):
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    def quarantine(self, rel: str) -> str | None:
        """Move a corrupt object out of the way (into tmp/); return where to."""
        target = quarantine_rel(rel)
        try:
            self.fs.mv(self._path(rel), self._path(target))
        except Exception:  # noqa: BLE001 - best effort: the read error is what matters
            return None
        return self.url_for(target)

    def delete(self, rel: str, *, unless_newer_than: float | None = None) -> bool:
        if unless_newer_than is not None:
            stat = self.stat(rel)
            if stat is None or stat.mtime > unless_newer_than:
                return False
        with self._errors(rel):
            try:
                self.fs.rm_file(self._path(rel))
            except FileNotFoundError:
                return False
        return True


class _TranslatingReader(io.RawIOBase):
    """A remote file whose read errors come out as the store's exceptions."""

    def __init__(self, raw: Any,
                 errors: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        super().__init__()
        self._raw = raw
        self._errors = errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._errors():
            return int(self._raw.readinto(buffer) or 0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()
        super().close()


async def _s3_multipart_put(fs: Any, local: Path, size: int, target: str,
                            callback: Callback) -> None:
    """Upload ``local`` in parts; on any failure abort once nothing is in flight.

    NOTE: s3fs's own multipart put gathers a batch of parts and aborts as soon as
    the first one fails, while its siblings are still being sent; S3 may then
    keep a part that lands after the abort ("abort may need repeating", AWS
    docs). Here every part of a batch settles before the abort is sent.
    """
    bucket, key, _ = fs.split_path(target)
    callback.set_size(size)
    part_size = max(S3_PART_SIZE, -(-size // S3_MAX_PARTS))
    upload = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    upload_id = upload["UploadId"]

    async def send(number: int, body: bytes) -> dict[str, Any]:
        answer = await _within_deadline(
            lambda: fs._call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                                PartNumber=number, Body=body),
            len(body), f"part {number} of s3://{target}")
        callback.relative_update(len(body))
        return {"PartNumber": number, "ETag": answer["ETag"]}

    parts: list[dict[str, Any]] = []
    try:
        with open(local, "rb") as source:
            # Reads go to a thread: this loop is fsspec's, shared by every s3fs call.
            while batch := await asyncio.to_thread(_read_parts, source, part_size):
                first = len(parts) + 1
                settled = await asyncio.gather(
                    *(send(first + i, body) for i, body in enumerate(batch)),
                    return_exceptions=True,
                )
                for outcome in settled:
                    if isinstance(outcome, BaseException):
                        raise outcome
                    parts.append(outcome)
        await fs._call_s3(
            "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        # The original failure is what the user needs; a failed abort leaves an
        # upload that a bucket lifecycle rule (AbortIncompleteMultipartUpload) ends.
        with contextlib.suppress(Exception):
            # Shielded: a cancelled upload (Ctrl-C) still sends its abort.
            await asyncio.shield(fs._call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
            ))
        raise
    fs.invalidate_cache(target)


class SendStalledError(ConnectionError):
    """A request body stopped moving: the peer took no bytes within the request's deadline.

    NOTE: not a TimeoutError, which fsspec's sync turns into a bare FSTimeoutError.
    """


async def _within_deadline(request: Callable[[], Any], size: int, what: str) -> Any:
    """``await request()``, abandoned and tried again when it outlives its deadline.

    The deadline scales with the bytes sent (SEND_BASE_S + size / SEND_MIN_RATE);
    after SEND_ATTEMPTS tries the stall is an error naming what was being sent.
    """
    deadline = SEND_BASE_S + size / SEND_MIN_RATE
    for _attempt in range(SEND_ATTEMPTS):
        try:
            return await asyncio.wait_for(request(), timeout=deadline)
        except TimeoutError:
            continue
    raise SendStalledError(
        f"sending {what} stalled: {SEND_ATTEMPTS} tries of {deadline:.0f} s each did not finish "
        f"({size} bytes); the endpoint stopped taking data. Check the network or the endpoint, "
        "or raise UNCOOL_S3_SEND_TIMEOUT / lower UNCOOL_S3_MIN_RATE for a slow link")


def _read_parts(source: IO[bytes], part_size: int) -> list[bytes]:
    """The next batch of parts (at most S3_PARTS_IN_FLIGHT); empty at the end."""
    return [chunk for chunk in (source.read(part_size) for _ in range(S3_PARTS_IN_FLIGHT)) if chunk]


def _s3_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """Bounded retries with backoff, short connect timeout, no stale listings.

    NOTE: botocore's "standard" retry mode already retries exactly what should
    be retried (5xx, SlowDown/throttling, timeouts, dropped connections) with
    capped exponential backoff, and never 403 or NoSuchBucket.
    """
    options = dict(options)
    config = dict(options.pop("config_kwargs", None) or {})
    # NOTE: total_max_attempts counts the first try; max_attempts would not.
    config.setdefault("retries", {"total_max_attempts": 4, "mode": "standard"})
    config.setdefault("connect_timeout", 5)
    config.setdefault("read_timeout", 60)
    options["config_kwargs"] = config
    options.setdefault("use_listings_cache", False)
    return options


def _endpoint_of(fs: Any) -> str | None:
    """The endpoint requests go to, to name in errors: as configured, else as botocore finds it."""
    client_kwargs = getattr(fs, "client_kwargs", None) or {}
    endpoint = getattr(fs, "endpoint_url", None) or client_kwargs.get("endpoint_url")
    if endpoint:
        return str(endpoint)
    if getattr(fs, "protocol", None) and "s3" in fs.protocol:
        # NOTE: botocore reads these too (the service-specific one wins).
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    return None


def _mtime_of(info: dict[str, Any]) -> float:
    for key in ("LastModified", "mtime", "created", "last_modified"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return time.time()


def _is_missing_bucket(exc: BaseException) -> bool:
    text = str(exc)
    return "NoSuchBucket" in text or "bucket does not exist" in text.lower()


_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
    "ConnectionError", "TimeoutError",
}


def _is_connection_error(exc: BaseException | None) -> bool:
    """A network failure, or an error raised while handling one.

    NOTE: s3fs's ranged read handles an OSError by looking at ``args[0]``; the
    argument-less FSTimeoutError of a stalled download makes that an IndexError
    whose context is the timeout. The chain is followed a few links deep.
    """
    for _ in range(4):
        if exc is None:
            return False
        if {cls.__name__ for cls in type(exc).__mro__} & _CONNECTION_ERRORS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# A damaged object moved aside: tmp/corrupt-<its path, / as ->-<8 hex>.
_QUARANTINED = re.compile(r"corrupt-objects-[a-z0-9]+-([0-9a-f]{2})-([0-9a-f]+(?:\.dir)?)-[0-9a-f]{8}$")


def quarantine_rel(rel: str) -> str:
    """Where a backend moves the damaged object at ``rel`` (see :func:`quarantined_object`)."""
    return f"{TMP_DIR}/corrupt-{rel.replace('/', '-')}-{uuid.uuid4().hex[:8]}"


def quarantined_object(rel: str) -> str | None:
    """The object id a file moved aside by :func:`quarantine_rel` was, or None for other temp files."""
    match = _QUARANTINED.search(rel)
    return None if match is None else match.group(1) + match.group(2)


def make_backend(
    url: str, storage_options: dict[str, Any] | None = None
) -> LocalBackend | FsspecBackend:
    """Pick the backend for a store URL: a plain path or ``file://`` is local."""
    if "://" not in url:
        return LocalBackend(url)
    if url.startswith("file://"):
        return LocalBackend(url[len("file://"):])
    return FsspecBackend(url, storage_options)


def spool_to_temp(
    source: IO[bytes], directory: Path, on_chunk: Callable[[bytes], None]
) -> Path:
    """Copy a stream to a temp file in ``directory``, feeding each chunk to ``on_chunk``."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, suffix=".spool")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(1 << 20):
                on_chunk(chunk)
                out.write(chunk)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


