"""Where the bytes go: a local folder, or any fsspec filesystem (S3 first).

Both backends speak in paths relative to the store's root (``objects/...``,
``refs/...``) and translate every low-level failure into the store's exception
set, so :mod:`objects` never sees a botocore or errno detail.

Local writes follow restic's ``Save``: temp file on the same file system,
write, check the byte count, fsync, rename, fsync the folder. Disk full and
permission errors are permanent: one attempt, temp removed, clear error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend:
    """A store in a local folder: atomic, durable, read-only objects."""

    is_local = True
    # Re-touching an existing object is a cheap utime here.
    freshen_after_s = 1.0

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self._made_dirs: set[Path] = set()

    def describe(self) -> str:
        return self.url

    def url_for(self, rel: str) -> str:
        return str(self.root / rel)

    def path_for(self, rel: str) -> Path:
        return self.root / rel

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
    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._made_dirs:
            return
        if not directory.is_dir():
            missing = []
            probe = directory
            while not probe.exists() and probe != probe.parent:
                missing.append(probe)
                probe = probe.parent
            directory.mkdir(parents=True, exist_ok=True)
            # NOTE: a new folder is durable only once its parent is fsynced.
            for created in reversed(missing):
                _fsync_dir(created.parent)
        self._made_dirs.add(directory)

    def new_temp(self) -> tuple[Path, int]:
        """Create an exclusive temp file next to the objects; return (path, fd)."""
        tmp_dir = self.root / TMP_DIR
        with _local_errors(str(tmp_dir)):
            self._ensure_dir(tmp_dir)
            path = tmp_dir / f"{uuid.uuid4().hex}.tmp"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return path, fd

    def write_temp(
        self,
        chunks: Iterator[bytes | memoryview],
        *,
        durable: bool = True,
    ) -> tuple[Path, int]:
        """Write ``chunks`` to a new temp file; return its path and size.

        The temp file is removed if anything fails, including the iterator.
        """
        path, fd = self.new_temp()
        written = 0
        try:
            with _local_errors(str(path)):
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        written += n
                os.fchmod(fd, 0o444)
                if durable:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        os.close(fd)
        return path, written

    def commit(self, temp: Path, rel: str, *, durable: bool = True) -> bool:
        """Move a finished temp file to ``rel``; False if it was already there."""
        final = self.root / rel
        with _local_errors(str(final)):
            try:
                if final.exists():
                    temp.unlink()
                    self.freshen(rel)
                    return False
                self._ensure_dir(final.parent)
                os.replace(temp, final)
                if durable:
                    _fsync_dir(final.parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise
        return True

    def sync(self) -> None:
        """Make every write so far durable (one ``syncfs`` for a whole batch)."""
        with _local_errors(self.url):
            _syncfs(self.root)

    def write_bytes(self, rel: str, data: bytes, *, overwrite: bool = False) -> bool:
        temp, _ = self.write_temp(iter([data]))
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
        path = self.root / rel
        try:
            st = os.stat(path)
            if time.time() - st.st_mtime > self.freshen_after_s:
                os.utime(path)
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
        target = self.root / TMP_DIR / f"corrupt-{rel.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
        try:
            self._ensure_dir(target.parent)
            os.rename(self.root / rel, target)
        except OSError:
            return None
        return str(target)

    def make_writable(self, rel: str) -> None:
        os.chmod(self.root / rel, 0o644)


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
            return self.fs.cat_file(self._path(rel))  # type: ignore[no-any-return]

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
                self.fs.pipe_file(self._path(rel), data)
            else:
                tmp = self._path(f"{TMP_DIR}/{uuid.uuid4().hex}.tmp")
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, self._path(rel))
        return True

    def put_local_file(self, local: Path, rel: str, callback: Callback | None = None) -> None:
        """Upload a local file to ``rel``; nothing appears there unless it completes."""
        callback = callback or NoOpCallback()
        target = self._path(rel)
        with self._errors(rel):
            if self.protocol in ("s3", "s3a"):
                # s3fs aborts the multipart upload if any part fails.
                self.fs.put_file(
                    str(local), target, callback=callback,
                    chunksize=S3_PART_SIZE, max_concurrency=S3_PARTS_IN_FLIGHT,
                )
            elif self._atomic_put:
                self.fs.put_file(str(local), target, callback=callback)
            else:
                tmp = self._path(f"{TMP_DIR}/{uuid.uuid4().hex}.tmp")
                self.fs.put_file(str(local), tmp, callback=callback)
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

    def quarantine(self, rel: str) -> str | None:
        """Move a corrupt object out of the way (into tmp/); return where to."""
        target = f"{TMP_DIR}/corrupt-{rel.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
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
    client_kwargs = getattr(fs, "client_kwargs", None) or {}
    endpoint = getattr(fs, "endpoint_url", None) or client_kwargs.get("endpoint_url")
    if endpoint:
        return str(endpoint)
    if getattr(fs, "protocol", None) and "s3" in fs.protocol:
        return "AWS S3"
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


def _is_connection_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(
        names
        & {
            "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
            "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
            "ConnectionError", "TimeoutError",
        }
    )


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


