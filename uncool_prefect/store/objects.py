"""The content-addressed object store: put/get/has/verify/du over any fsspec URL.

Layout under the store's base URL::

    objects/<algo>/ab/cdef...       immutable blobs, named by the hash of their bytes
    objects/<algo>/ab/cdef....dir   directory manifests (see :mod:`hashing`)
    refs/<key>                      named pointers to objects (JSON), e.g. Prefect results
    runs/<flow-run-id>.json         run records; every object id in them is a gc root
    run-packs/<sha256>.json         many run records in one object, for readers that have none
                                    (derived data: never a gc root, never read as an object)
    tmp/                            writers' temp files (removed by gc after the grace)

Example:
    >>> from uncool_prefect.store import ObjectStore
    >>> store = ObjectStore("memory://doctest-store")
    >>> ref = store.put_bytes(b"hello")
    >>> ref.oid[:12], ref.size
    ('2cf24dba5fb0', 5)
    >>> store.get_bytes(ref.oid)
    b'hello'
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fsspec.callbacks import Callback, NoOpCallback

from .backends import (
    DIRECT_MIN_SIZE,
    TMP_DIR,
    FsspecBackend,
    LocalBackend,
    make_backend,
    quarantined_object,
    spool_to_temp,
)
from .errors import (
    CorruptObjectError,
    InvalidKeyError,
    ObjectNotFoundError,
    StoreError,
)
from .gc import collect_garbage
from .hashing import (
    ALGORITHMS,
    CHUNK_SIZE,
    FileKey,
    Manifest,
    ManifestEntry,
    StatCache,
    hash_bytes,
    hash_file,
    new_hasher,
    walk_files,
)
from .keys import DIR_SUFFIX, parse_oid, validate_relpath

OBJECTS_DIR = "objects"
REFS_DIR = "refs"
RUNS_DIR = "runs"
# Packs of run records (see records/packs.py): not under runs/, so that listing
# the records never lists the packs, and gc and verify never look at them.
RUN_PACKS_DIR = "run-packs"
REF_VERSION = 1
# A put_dir with at most this many new objects fsyncs each (and their folders)
# instead of calling syncfs twice.
SMALL_BATCH = 64


@dataclass(frozen=True)
class ObjectRef:
    """What a put returns: the object id (hex digest) and the logical size."""

    oid: str
    size: int
    algorithm: str = "sha256"
    is_dir: bool = False
    nfiles: int = 1

    @property
    def name(self) -> str:
        """The id as printed and accepted by the CLI (``<hex>.dir`` for folders)."""
        return self.oid + DIR_SUFFIX if self.is_dir else self.oid

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    mtime: float

    @property
    def is_dir(self) -> bool:
        return self.name.endswith(DIR_SUFFIX)


@dataclass(frozen=True)
class Problem:
    """One damaged object found by :meth:`ObjectStore.verify`."""

    name: str
    url: str
    kind: str  # corrupt, missing, malformed, dangling or quarantined (see ObjectStore.verify)
    detail: str


@dataclass(frozen=True)
class Usage:
    objects: int
    directories: int
    refs: int
    stored_bytes: int
    logical_bytes: int

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclass
class _DirPlan:
    entries: list[ManifestEntry] = field(default_factory=list)
    new_objects: int = 0


def cache_dir() -> Path:
    """This machine's cache folder for uncool-prefect (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uncool-prefect"


def default_state_dir(url: str) -> Path:
    """Where machine-local state (the stat cache) lives for a store URL."""
    backend_local = "://" not in url or url.startswith("file://")
    if backend_local:
        root = url[len("file://"):] if url.startswith("file://") else url
        return Path(root).expanduser().absolute() / "state"
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return cache_dir() / "stores" / digest


class _VerifyingReader(io.RawIOBase):
    """Streams an object and checks its hash before handing over the last bytes."""

    def __init__(self, raw: IO[bytes], name: str, expected: str, algorithm: str,
                 size: int, url: str, on_corrupt: Callable[[], str | None] | None = None) -> None:
        super().__init__()
        self._on_corrupt = on_corrupt
        self._raw = raw
        self._name = name
        self._expected = expected
        self._hasher = new_hasher(algorithm)
        self._size = size
        self._pos = 0
        self._checked = False
        self._url = url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = self._raw.readinto(view)  # type: ignore[attr-defined]
        n = n or 0
        if n and self._checked:
            # More bytes than the size we saw at open: not the object we checked.
            self._fail(f"{self._expected} (more than {self._size} bytes)")
        if n:
            self._hasher.update(view[:n])
            self._pos += n
        if not self._checked and (n == 0 or self._pos >= self._size):
            actual = self._hasher.hexdigest()
            if actual != self._expected:
                self._fail(actual)
            self._checked = True
        return n

    def _fail(self, actual: str) -> None:
        error = CorruptObjectError(self._name, self._expected, actual, self._url)
        if self._on_corrupt is not None:
            moved_to = self._on_corrupt()
            if moved_to:
                error.moved_to = moved_to
                error.args = (
                    f"{error.args[0]} The damaged copy was moved aside to {moved_to}, "
                    "so the next put of the same data stores a good one.",
                )
        raise error

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()
        super().close()


class ObjectStore:
    """Content-addressed, verified, deduplicated storage on a folder or bucket.

    Args:
        url: a local path, ``file://``, ``s3://bucket/prefix``, ``memory://``,
            or any other fsspec URL.
        algorithm: ``sha256`` (default) or ``blake3``.
        storage_options: passed to fsspec (e.g. s3fs ``key``/``secret``/
            ``client_kwargs``).
        state_dir: local folder for the stat cache; by default ``state/``
            inside a local store, or a per-URL folder under ``~/.cache``.
        verify_reads: re-hash every object read (default). Turning this off
            trades safety for speed.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        algorithm: str = "sha256",
        storage_options: dict[str, Any] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        verify_reads: bool = True,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise StoreError(
                f"unknown hash algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        url = os.fspath(url)
        if not url:
            raise InvalidKeyError("store URL is empty; give a folder or an s3:// URL")
        self.algorithm = algorithm
        self.verify_reads = verify_reads
        self.backend: LocalBackend | FsspecBackend = make_backend(url, storage_options)
        self.url = self.backend.url
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(url)
        self.stat_cache = StatCache(self.state_dir / "statcache.db")

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r}, algorithm={self.algorithm!r})"

    # -- naming --------------------------------------------------------------
    def _rel(self, digest: str, is_dir: bool = False) -> str:
        suffix = DIR_SUFFIX if is_dir else ""
        return f"{OBJECTS_DIR}/{self.algorithm}/{digest[:2]}/{digest[2:]}{suffix}"

    def _resolve(self, oid: str) -> tuple[str, bool]:
        """Find ``(digest, is_dir)`` for an id given with or without ``.dir``."""
        digest, is_dir = parse_oid(oid)
        if is_dir or self.backend.stat(self._rel(digest)) is not None:
            return digest, is_dir
        if self.backend.stat(self._rel(digest, True)) is not None:
            return digest, True
        return digest, False

    def url_of(self, oid: str) -> str:
        digest, is_dir = parse_oid(oid)
        return self.backend.url_for(self._rel(digest, is_dir))

    def has(self, oid: str) -> bool:
        digest, is_dir = parse_oid(oid)
        if self.backend.stat(self._rel(digest, is_dir)) is not None:
            return True
        return not is_dir and self.backend.stat(self._rel(digest, True)) is not None

    def _not_found(self, oid: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(
            oid, self.backend.describe(),
            hint="check the id (`uncool store ls`) and that --basepath/UNCOOL_STORE "
            "points at the store that holds it",
        )

    # -- put -----------------------------------------------------------------
    def put_bytes(self, data: bytes, *, is_dir: bool = False) -> ObjectRef:
        """Store ``data``; return its ref. Existing objects are not written again."""
        digest = hash_bytes(data, self.algorithm)
        rel = self._rel(digest, is_dir)
        if not self.backend.freshen(rel):
            self.backend.write_bytes(rel, bytes(data))
        return ObjectRef(digest, len(data), self.algorithm, is_dir)

    def put(self, path: str | os.PathLike[str], callback: Callback | None = None) -> ObjectRef:
        """Store a file or a folder (as a directory manifest)."""
        if Path(path).is_dir():
            return self.put_dir(path, callback=callback)
        return self.put_file(path, callback=callback)

    def put_file(
        self, path: str | os.PathLike[str], callback: Callback | None = None
    ) -> ObjectRef:
        """Store one file, streaming it in bounded memory.

        An unchanged file (same path, inode, mtime and size as last time) is not
        read at all: its hash comes from the stat cache.
        """
        source = Path(path)
        try:
            st = os.stat(source)
        except FileNotFoundError as exc:
            raise StoreError(f"cannot put {source}: no such file") from exc
        if not source.is_file():
            with open(source, "rb") as stream:  # a FIFO or a device: stream it
                return self.put_stream(stream, callback=callback)
        key = str(source.absolute())
        cached = self.stat_cache.lookup(key, st, self.algorithm)
        if cached is not None and self.backend.freshen(self._rel(cached)):
            return ObjectRef(cached, st.st_size, self.algorithm)
        started = time.time_ns()
        ref = self._ingest_file(source, st.st_size, callback)
        after = os.stat(source)
        if (after.st_ino, after.st_mtime_ns, after.st_size) == (
            st.st_ino, st.st_mtime_ns, st.st_size,
        ):
            self.stat_cache.record(key, st, ref.oid, self.algorithm, started)
        return ref

    def _ingest_file(self, source: Path, size: int, callback: Callback | None) -> ObjectRef:
        callback = callback or NoOpCallback()
        callback.set_size(size)
        if isinstance(self.backend, LocalBackend):
            if size < DIRECT_MIN_SIZE:
                # NOTE: hash first, copy only if new: a file this small is
                # read again from the page cache for nearly nothing, and a
                # re-put of a present object (no stat cache: another path, a
                # rebuilt cache) then writes and fsyncs no temp copy at all.
                digest, _ = hash_file(source, self.algorithm)
                if self.backend.freshen(self._rel(digest)):
                    callback.relative_update(size)
                    return ObjectRef(digest, size, self.algorithm)
            # Larger files: one pass that hashes what it copies. Hashing first
            # would read them twice and double a cold put (measured: 1 GiB
            # 0.51 s -> 1.1 s), to save a re-put without a stat cache ~0.1 s.
            with open(source, "rb", buffering=0) as stream:
                return self._ingest_local(stream, callback, size_hint=size)
        digest, _ = hash_file(source, self.algorithm, on_bytes=callback.relative_update)
        rel = self._rel(digest)
        if not self.backend.freshen(rel):
            self.backend.put_local_file(source, rel)
        return ObjectRef(digest, size, self.algorithm)

    def _ingest_local(self, stream: IO[bytes], callback: Callback,
                      size_hint: int = 0) -> ObjectRef:
        """One pass over the source: hash and copy to a temp file, then rename."""
        assert isinstance(self.backend, LocalBackend)
        temp, digest, size = self._copy_to_temp(stream, callback, durable=True,
                                                size_hint=size_hint)
        self.backend.commit(temp, self._rel(digest))
        return ObjectRef(digest, size, self.algorithm)

    def _copy_to_temp(self, stream: IO[bytes], callback: Callback,
                      *, durable: bool, size_hint: int = 0) -> tuple[Path, str, int]:
        """Hash and copy ``stream`` into a temp file, reading every byte once.

        A regular file of more than one chunk (``size_hint`` from its stat) goes
        through the backend's pipelined copy: hashing in one thread overlaps
        reading and writing in others. Anything else is read, hashed and
        written chunk by chunk here.
        """
        assert isinstance(self.backend, LocalBackend)
        hasher = new_hasher(self.algorithm)
        if size_hint > CHUNK_SIZE and isinstance(stream, io.FileIO):
            temp, size = self.backend.copy_to_temp(
                stream.fileno(), hasher.update, callback.relative_update,
                durable=durable, size_hint=size_hint,
            )
            return temp, hasher.hexdigest(), size
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)

        def chunks() -> Iterator[memoryview]:
            while n := stream.readinto(buffer):  # type: ignore[attr-defined]
                hasher.update(view[:n])
                callback.relative_update(n)
                yield view[:n]

        temp, size = self.backend.write_temp(chunks(), durable=durable)
        return temp, hasher.hexdigest(), size

    def put_stream(self, stream: IO[bytes], callback: Callback | None = None) -> ObjectRef:
        """Store everything readable from ``stream`` (no size needed up front)."""
        callback = callback or NoOpCallback()
        if isinstance(self.backend, LocalBackend):
            return self._ingest_local(stream, callback)
        hasher = new_hasher(self.algorithm)
        spool = spool_to_temp(stream, self.state_dir / "spool", hasher.update)
        try:
            digest = hasher.hexdigest()
            size = spool.stat().st_size
            rel = self._rel(digest)
            if not self.backend.freshen(rel):
                self.backend.put_local_file(spool, rel, callback)
            return ObjectRef(digest, size, self.algorithm)
        finally:
            spool.unlink(missing_ok=True)

    def put_dir(
        self, path: str | os.PathLike[str], callback: Callback | None = None,
        include: Callable[[str], bool] | None = None,
    ) -> ObjectRef:
        """Store a folder: every file as an object, then its manifest (``.dir``).

        The manifest is written last, so a manifest in the store always lists
        objects that are in the store too. ``include`` (relative posix path ->
        bool) leaves files out, e.g. a writer's temporary files.
        """
        root = Path(path)
        if not root.is_dir():
            raise StoreError(f"cannot put {root}: not a folder")
        files = [item for item in walk_files(root) if include is None or include(item[0])]
        for rel, _ in files:
            _check_manifest_path(root, rel)
        callback = callback or NoOpCallback()
        callback.set_size(sum(st.st_size for _, st in files))
        # NOTE: the stat cache's keys are put_file's str(path.absolute()),
        # here base + rel (rel is a clean relative path from walk_files). They
        # are built where needed, not kept: a dict of 200,000 paths is ~40 MiB.
        base = _dir_key(root)
        cached = self.stat_cache.lookup_tree(base, files, self.algorithm)
        started = time.time_ns()
        if isinstance(self.backend, LocalBackend):
            plan = self._put_dir_local(base, files, cached, callback)
        else:
            plan = self._put_dir_remote(root, files, cached, callback)
        self.stat_cache.record_many(
            (
                (base + e.path, st, e.oid)
                for e, (_, st), known in zip(plan.entries, files, cached, strict=True)
                if known != e.oid
            ),
            self.algorithm,
            started,
        )
        manifest = Manifest(self.algorithm, tuple(plan.entries))
        manifest_ref = self.put_bytes(manifest.to_bytes(), is_dir=True)
        return ObjectRef(
            manifest_ref.oid, manifest.size, self.algorithm, is_dir=True, nfiles=len(files)
        )

    def _put_dir_local(self, base: str, files: list[tuple[str, FileKey]],
                       cached: list[str | None], callback: Callback) -> _DirPlan:
        assert isinstance(self.backend, LocalBackend)
        backend = self.backend
        plan = _DirPlan()
        entries = plan.entries
        pending: list[tuple[str | Path, str]] = []  # (temp file, final rel)
        pending_rels: set[str] = set()
        rel_of = self._rel
        # NOTE: fsspec's Callback.relative_update costs ~1 us even on a
        # NoOpCallback: a tenth of what an unchanged file costs here otherwise.
        progress = _no_progress if type(callback) is NoOpCallback else callback.relative_update
        try:
            for (rel, st), oid in zip(files, cached, strict=True):
                if oid is not None and backend.freshen(rel_of(oid)):
                    progress(st.st_size)
                    entries.append(ManifestEntry(rel, oid, st.st_size))
                    continue
                # NOTE: temps are written without a per-file fsync; one syncfs
                # below makes the whole batch durable *before* any of them gets
                # its final name. 20k fsyncs would cost more than the hashing.
                source = base + rel
                data = _read_small(source) if st.st_size < CHUNK_SIZE else None
                temp: str | Path | None = None
                if data is not None:
                    # A small file: read whole, hashed, and only written if new.
                    oid, size = hash_bytes(data, self.algorithm), len(data)
                    progress(size)
                else:
                    with open(source, "rb", buffering=0) as stream:
                        temp, oid, size = self._copy_to_temp(
                            stream, callback, durable=False, size_hint=st.st_size
                        )
                final = rel_of(oid)
                if final in pending_rels or backend.freshen(final):
                    if temp is not None:
                        os.unlink(temp)
                else:
                    if temp is None:
                        assert data is not None
                        temp = backend.write_temp_bytes(data, durable=False)
                    pending.append((temp, final))
                    pending_rels.add(final)
                entries.append(ManifestEntry(rel, oid, size))
            if pending:
                # NOTE: syncfs flushes everything dirty on the file system,
                # other writers' data and the inodes our freshens touched
                # included: 0.2-0.4 s per call measured next to a 200k-file
                # re-put. A few new files are cheaper to fsync one by one.
                few = len(pending) <= SMALL_BATCH
                folders = sorted({backend.url_for(f.rpartition("/")[0]) for f in pending_rels})
                if few:
                    backend.fsync_paths(temp for temp, _ in pending)
                else:
                    backend.sync()
                backend.ensure_dirs(folders)
                for temp, final in pending:
                    backend.commit(temp, final, durable=False)
                plan.new_objects = len(pending)
                if few:
                    backend.fsync_paths(folders)
                else:
                    backend.sync()
        except BaseException:
            for temp, _ in pending:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise
        return plan

    def _put_dir_remote(self, root: Path, files: list[tuple[str, FileKey]],
                        cached: list[str | None], callback: Callback) -> _DirPlan:
        backend = self.backend
        assert isinstance(backend, FsspecBackend)

        def one(item: tuple[tuple[str, FileKey], str | None]) -> ManifestEntry:
            (rel, st), oid = item
            if oid is None:
                oid, _ = hash_file(root / rel, self.algorithm)
            if not backend.freshen(self._rel(oid)):
                backend.put_local_file(root / rel, self._rel(oid))
            callback.relative_update(st.st_size)
            return ManifestEntry(rel, oid, st.st_size)

        # NOTE: remote round trips dominate; overlap them, as s3fs does for parts.
        with ThreadPoolExecutor(max_workers=16) as pool:
            entries = list(pool.map(one, zip(files, cached, strict=True)))
        return _DirPlan(entries=entries, new_objects=len(entries))

    # -- get -----------------------------------------------------------------
    def open(self, oid: str, *, verify_first: bool = False, quarantine: bool = True) -> IO[bytes]:
        """Open an object for reading, verified against its id.

        Two modes, both raising :class:`CorruptObjectError` for damaged bytes:

        - streaming (the default): bytes are handed over as they arrive and
          hashed on the way; the read that reaches the end raises instead of
          returning the last chunk. Everything before that chunk has been
          handed over unverified, so a consumer that writes what it reads
          somewhere must only keep it after that read (as :meth:`get_file`
          does, writing beside the destination and renaming).
        - ``verify_first=True``: the whole object is checked before the first
          byte is returned (a local object is hashed in place, a remote one
          spooled to a temporary file while it is hashed), so no unverified
          byte ever reaches the caller. What ``uncool store cat`` uses.

        With ``quarantine`` (the default) a corrupt object is also moved aside
        to ``tmp/``: puts skip objects that exist, so leaving it in place would
        keep the damage forever, while moving it lets the next put of the same
        data (a cache miss recomputing it, say) heal the store.
        """
        if not verify_first or not self.verify_reads:
            return self._open_streaming(oid, quarantine=quarantine)
        if self.backend.is_local:
            with self._open_streaming(oid, quarantine=quarantine) as check:
                while check.read(CHUNK_SIZE):
                    pass  # raises at the end if the bytes do not match
            # NOTE: stored objects are read-only; the stream is verified again anyway.
            return self._open_streaming(oid, quarantine=quarantine)
        spool_dir = cache_dir() / "spool"
        spool_dir.mkdir(parents=True, exist_ok=True)
        spool = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 - handed to the caller, who closes it
        try:
            with self._open_streaming(oid, quarantine=quarantine) as stream:
                shutil.copyfileobj(stream, spool, CHUNK_SIZE)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool

    def _open_streaming(self, oid: str, *, quarantine: bool) -> IO[bytes]:
        digest, is_dir = self._resolve(oid)
        rel = self._rel(digest, is_dir)
        stat = self.backend.stat(rel)
        if stat is None:
            raise self._not_found(oid)
        try:
            raw = self.backend.open_read(rel)
        except FileNotFoundError as exc:
            raise self._not_found(oid) from exc
        if not self.verify_reads:
            return raw
        name = digest + (DIR_SUFFIX if is_dir else "")
        reader = _VerifyingReader(
            raw, name, digest, self.algorithm, stat.size, self.backend.url_for(rel),
            on_corrupt=(lambda: self.backend.quarantine(rel)) if quarantine else None,
        )
        return io.BufferedReader(reader, buffer_size=CHUNK_SIZE)

    def get_bytes(self, oid: str) -> bytes:
        """Return an object's bytes, verified."""
        with self.open(oid) as stream:
            return stream.read()

    def read_manifest(self, oid: str) -> Manifest:
        digest, _ = parse_oid(oid)
        data = self.get_bytes(digest + DIR_SUFFIX)
        return Manifest.from_bytes(data, where=f"manifest {digest}{DIR_SUFFIX}")

    def get_file(self, oid: str, dest: str | os.PathLike[str],
                 callback: Callback | None = None) -> Path:
        """Write an object to ``dest``; nothing appears there unless it verified."""
        digest, is_dir = self._resolve(oid)
        if is_dir:
            return self.get_dir(digest + DIR_SUFFIX, dest, callback=callback)
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: not derived from the name: a 255-byte name plus a suffix is too long.
        temp = target.parent / f".{uuid.uuid4().hex[:16]}.uncool-tmp"
        callback = callback or NoOpCallback()
        try:
            with self.open(digest) as stream, open(temp, "wb") as out:
                while chunk := stream.read(CHUNK_SIZE):
                    out.write(chunk)
                    callback.relative_update(len(chunk))
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return target

    def get_dir(self, oid: str, dest: str | os.PathLike[str],
                callback: Callback | None = None) -> Path:
        """Materialize a directory manifest into a new (or empty) folder ``dest``."""
        manifest = self.read_manifest(oid)
        target = Path(dest)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise StoreError(
                f"{target} already exists and is not an empty folder; "
                "choose a new destination or remove it first"
            )
        callback = callback or NoOpCallback()
        callback.set_size(manifest.size)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{uuid.uuid4().hex[:16]}.uncool-tmp"
        try:
            staging.mkdir()
            for entry in manifest.entries:
                self.get_file(entry.oid, staging / entry.path)
                callback.relative_update(entry.size)
            if target.exists():
                target.rmdir()
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    # -- refs ----------------------------------------------------------------
    def set_ref(self, key: str, ref: ObjectRef, **extra: Any) -> dict[str, Any]:
        """Point ``refs/<key>`` at an object (atomically replacing any old ref)."""
        validate_relpath(key, "ref key")
        document = {
            "version": REF_VERSION,
            "oid": ref.name,
            "algorithm": ref.algorithm,
            "size": ref.size,
            "created": time.time(),
            **extra,
        }
        data = json.dumps(document, sort_keys=True).encode("utf-8")
        self.backend.write_bytes(f"{REFS_DIR}/{key}", data, overwrite=True)
        return document

    def get_ref(self, key: str) -> dict[str, Any]:
        validate_relpath(key, "ref key")
        rel = f"{REFS_DIR}/{key}"
        try:
            data = self.backend.read_bytes(rel)
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"ref {key}", self.backend.describe()) from exc
        try:
            document: dict[str, Any] = json.loads(data)
            parse_oid(document["oid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"ref {key} at {self.backend.url_for(rel)} is unreadable ({exc}); "
                "delete it and run the producer again"
            ) from exc
        return document

    def iter_refs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for rel, _ in self.backend.list(REFS_DIR):
            key = rel[len(REFS_DIR) + 1:]
            try:
                yield key, self.get_ref(key)
            except (StoreError, FileNotFoundError):
                continue

    def put_run_record(self, run_id: str, document: dict[str, Any]) -> str:
        """Write ``runs/<run_id>.json`` atomically (replacing an older one)."""
        validate_relpath(run_id, "run id")
        if "/" in run_id:
            raise InvalidKeyError(f"run id {run_id!r} must not contain '/'")
        rel = f"{RUNS_DIR}/{run_id}.json"
        # NOTE: key order is kept: a record's stages are in call order.
        data = json.dumps(document, indent=1).encode("utf-8")
        self.backend.write_bytes(rel, data, overwrite=True)
        return self.backend.url_for(rel)

    def get_run_record(self, run_id: str) -> dict[str, Any]:
        validate_relpath(run_id, "run id")
        rel = f"{RUNS_DIR}/{run_id}.json"
        try:
            document: dict[str, Any] = json.loads(self.backend.read_bytes(rel))
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"run {run_id}", self.backend.describe(),
                                      hint="list runs with `uncool exp show`") from exc
        except ValueError as exc:
            raise StoreError(f"run record {run_id} is not valid JSON ({exc})") from exc
        return document

    def iter_run_records(self) -> Iterator[tuple[str, bytes]]:
        for rel, _ in self.backend.list(RUNS_DIR):
            with contextlib.suppress(FileNotFoundError):
                yield rel, self.backend.read_bytes(rel)

    # -- inspection ----------------------------------------------------------
    def ls(self) -> Iterator[ObjectInfo]:
        """Every object in the store (blobs and ``.dir`` manifests)."""
        prefix = f"{OBJECTS_DIR}/{self.algorithm}"
        for rel, stat in self.backend.list(prefix):
            parts = rel.split("/")
            if len(parts) != 4:
                continue
            name = parts[2] + parts[3]
            try:
                parse_oid(name)
            except InvalidKeyError:
                continue
            yield ObjectInfo(name, stat.size, stat.mtime)

    def du(self) -> Usage:
        """Count objects and bytes; logical bytes count every reference in full.

        Logical bytes are what the store would hold without deduplication: each
        ref counts its object, each directory snapshot counts all its files,
        and an object nothing points at counts once.
        """
        objects = {info.name: info for info in self.ls()}
        uses: Counter[str] = Counter()
        refs = 0
        for _key, document in self.iter_refs():
            refs += 1
            uses[document["oid"]] += 1
        logical = 0
        directories = 0
        for name, info in objects.items():
            if not info.is_dir:
                continue
            directories += 1
            copies = max(1, uses[name])
            try:
                manifest = self.read_manifest(name)
            except (StoreError, FileNotFoundError):
                continue
            for entry in manifest.entries:
                uses[entry.oid] += copies
            logical += info.size
        for name, info in objects.items():
            if not info.is_dir:
                logical += info.size * max(1, uses[name])
        stored = sum(info.size for info in objects.values())
        return Usage(len(objects), directories, refs, stored, logical)

    def verify(self, callback: Callback | None = None, names: Iterable[str] | None = None,
               *, repair: bool = False) -> list[Problem]:
        """Re-hash objects (all by default); return every problem found.

        Kinds: ``corrupt`` (the bytes do not match the id), ``missing`` (a
        folder lists it, or it was asked for, and it is not there),
        ``malformed`` (a manifest that hashes right but cannot be read as one:
        its files are not checked), ``dangling`` (a ref names an object that is
        not there) and ``quarantined`` (a damaged copy moved aside earlier, and
        the object not put again since). With ``repair``, corrupt objects are
        moved aside too (as reads do), so that putting the original data again
        stores a good copy; without, nothing is changed.
        """
        callback = callback or NoOpCallback()
        everything = names is None
        infos = list(self.ls()) if everything else [ObjectInfo(n, 0, 0.0) for n in names or ()]
        callback.set_size(sum(i.size for i in infos))
        problems: list[Problem] = []
        for info in infos:
            url = self.url_of(info.name)
            try:
                with self.open(info.name, quarantine=repair) as stream:
                    while chunk := stream.read(CHUNK_SIZE):
                        callback.relative_update(len(chunk))
                if info.is_dir:
                    for entry in self.read_manifest(info.name).entries:
                        if not self.has(entry.oid):
                            problems.append(Problem(
                                entry.oid, self.url_of(entry.oid), "missing",
                                f"listed as {entry.path!r} in {info.name}",
                            ))
            except CorruptObjectError as exc:
                moved = f"; moved aside to {exc.moved_to}" if exc.moved_to else ""
                problems.append(Problem(
                    info.name, url, "corrupt", f"content hashes to {exc.actual}{moved}"
                ))
            except ObjectNotFoundError:
                problems.append(Problem(info.name, url, "missing", "not in the store"))
            except StoreError as exc:  # a manifest whose content is not one
                problems.append(Problem(info.name, url, "malformed", f"{exc}; its files are not checked"))
        if everything:
            problems.extend(self._dangling_refs())
            reported = {problem.name for problem in problems}  # moved aside just now: said above
            problems.extend(p for p in self._quarantined() if p.name not in reported)
        return problems

    def _dangling_refs(self) -> list[Problem]:
        found = []
        for key, document in self.iter_refs():
            for oid in (document["oid"], *document.get("links", ())):
                if not self.has(oid):
                    found.append(Problem(oid, self.url_of(oid), "dangling",
                                         f"refs/{key} names it and it is not in the store"))
        return found

    def _quarantined(self) -> list[Problem]:
        """Damaged copies moved aside earlier whose object is still not back in the store."""
        found = []
        for rel, _mtime in self.tmp_files():
            name = quarantined_object(rel)
            if name is not None and not self.has(name):
                found.append(Problem(name, self.backend.url_for(rel), "quarantined",
                                     "a damaged copy was moved aside here; put the original data "
                                     "again to restore it"))
        return found

    def gc(self, grace: float = 3600.0, keep: Iterable[str] = (),
           dry_run: bool = False) -> Any:
        """Delete what no ref, run record or ``keep`` id reaches; see :mod:`gc`."""
        return collect_garbage(self, grace=grace, keep=keep, dry_run=dry_run)

    def hash_path(self, path: str | os.PathLike[str]) -> str:
        """The id a put of ``path`` would give, without storing anything.

        Files already hashed (stat cache) are not read again, so this is cheap
        for unchanged data: what cache keys and change detection need.
        """
        source = Path(path)
        if source.is_dir():
            files = list(walk_files(source))
            base = _dir_key(source)
            known = self.stat_cache.lookup_tree(base, files, self.algorithm)
            started = time.time_ns()
            entries, fresh = [], []
            for (rel, stat_key), cached_oid in zip(files, known, strict=True):
                oid = cached_oid
                if oid is None:
                    oid, _ = hash_file(base + rel, self.algorithm)
                    fresh.append((base + rel, stat_key, oid))
                entries.append(ManifestEntry(rel, oid, stat_key.st_size))
            self.stat_cache.record_many(fresh, self.algorithm, started)
            manifest = Manifest(self.algorithm, tuple(entries))
            return hash_bytes(manifest.to_bytes(), self.algorithm) + DIR_SUFFIX
        try:
            st = os.stat(source)
        except FileNotFoundError as exc:
            raise StoreError(f"cannot hash {source}: no such file or folder") from exc
        key = str(source.absolute())
        cached = self.stat_cache.lookup(key, st, self.algorithm)
        if cached is not None:
            return cached
        started = time.time_ns()
        oid, _ = hash_file(source, self.algorithm)
        self.stat_cache.record(key, st, oid, self.algorithm, started)
        return oid

    def tmp_files(self) -> Iterator[tuple[str, float]]:
        for rel, stat in self.backend.list(TMP_DIR):
            yield rel, stat.mtime


def _no_progress(_n: int) -> None:
    pass


def _dir_key(root: Path) -> str:
    """The stat-cache key prefix of the files under ``root``: its absolute path and ``/``."""
    base = str(root.absolute())
    return base if base.endswith("/") else base + "/"


def _read_small(path: str) -> bytes | None:
    """The whole content of a file of at most one chunk; None if it is bigger."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts: list[bytes] = []
        total = 0
        while part := os.read(fd, CHUNK_SIZE + 1 - total):
            parts.append(part)
            total += len(part)
            if total > CHUNK_SIZE:
                return None  # it grew since its stat: stream it instead
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# Paths made only of [A-Za-z0-9_-] words joined by single dots, parts joined by
# "/": nothing validate_relpath could object to (no empty, "." or ".." part, no
# "%", ":", backslash or control character), so the full check can be skipped.
_PLAIN_RELPATH = re.compile(r"[\w-]+(?:\.[\w-]+)*(?:/[\w-]+(?:\.[\w-]+)*)*", re.ASCII)


def _check_manifest_path(root: Path, rel: str) -> None:
    if _PLAIN_RELPATH.fullmatch(rel):
        return
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StoreError(
            f"cannot put {root}: the file name {rel!r} is not valid UTF-8; "
            "rename it (manifests are UTF-8 JSON)"
        ) from exc
    validate_relpath(rel, f"file {rel!r} in {root}")
