"""Streaming hashes, directory manifests and the stat cache.

Files are hashed in 1 MiB reads, so memory stays flat whatever their size.
A directory is hashed as its *manifest*: a canonical JSON document listing every
file's relative path, hash and size (dvc-data's ``.dir`` objects, with a version
field so the encoding can change later). The manifest is stored as an object of
its own, and its hash is the directory's version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

from .errors import InvalidKeyError, StoreError
from .keys import validate_relpath

logger = logging.getLogger("uncool.store")

CHUNK_SIZE = 1 << 20
ALGORITHMS = ("sha256", "blake3")
MANIFEST_VERSION = 1

# NOTE: a file modified within the file system's timestamp granularity after we
# stat it could keep the same mtime (the "racy git" problem). Files younger than
# this at hashing time are hashed but not remembered in the stat cache.
RACY_WINDOW_NS = 100_000_000


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str) -> Hasher:
    """Return a fresh incremental hasher for ``algorithm`` (sha256 or blake3)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        from blake3 import blake3

        # NOTE: blake3 hashes large buffers on several threads; worth it for
        # the 1 MiB chunks we feed it.
        return cast(Hasher, blake3(max_threads=blake3.AUTO))
    raise StoreError(
        f"unknown hash algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
    )


def hash_bytes(data: bytes, algorithm: str = "sha256") -> str:
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


def hash_file(
    path: str | os.PathLike[str],
    algorithm: str = "sha256",
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[str, int]:
    """Hash a file in bounded memory; return ``(hexdigest, size)``."""
    hasher = new_hasher(algorithm)
    size = 0
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return hasher.hexdigest(), size


# NOTE: slots: a manifest of 200,000 files holds 200,000 entries; without a
# per-instance __dict__ each costs 72 bytes instead of ~250.
@dataclass(frozen=True, slots=True)
class ManifestEntry:
    path: str
    oid: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The listing of one directory snapshot, sorted by path."""

    algorithm: str
    entries: tuple[ManifestEntry, ...]

    @property
    def size(self) -> int:
        """Total bytes of the files listed (the directory's logical size)."""
        return sum(entry.size for entry in self.entries)

    def to_bytes(self) -> bytes:
        """The canonical encoding: sorted entries and keys, no whitespace, UTF-8.

        The same tree always gives the same bytes, hence the same manifest id.
        The bytes are exactly ``json.dumps(document, sort_keys=True,
        separators=(",", ":"), ensure_ascii=False)`` of ``{"version",
        "algorithm", "entries": [{"path", "hash", "size"}...]}``.
        """
        # NOTE: written out entry by entry with json's own string encoder, not
        # through json.dumps of a list of dicts: for 200,000 files that list
        # alone took ~50 MiB and the encode 4x longer. Encoded to UTF-8 in
        # blocks, so the only copy that grows with the folder is the result.
        quote = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses
        entries = sorted(self.entries, key=attrgetter("path"))
        blocks = [f'{{"algorithm":{quote(self.algorithm)},"entries":['.encode()]
        for start in range(0, len(entries), 4096):
            text = ",".join(
                f'{{"hash":{quote(e.oid)},"path":{quote(e.path)},"size":{int(e.size)}}}'
                for e in entries[start:start + 4096]
            )
            blocks.append((text if start == 0 else "," + text).encode("utf-8"))
        blocks.append(f"],\"version\":{MANIFEST_VERSION}}}".encode())
        return b"".join(blocks)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> Manifest:
        try:
            document = json.loads(data)
            version = document["version"]
            if version != MANIFEST_VERSION:
                raise StoreError(
                    f"{where} has manifest version {version}; this uncool-prefect "
                    f"reads version {MANIFEST_VERSION}. Upgrade uncool-prefect."
                )
            entries = tuple(
                ManifestEntry(
                    path=validate_relpath(e["path"]), oid=e["hash"], size=int(e["size"])
                )
                for e in document["entries"]
            )
            _check_no_clashes(entries, where)
            return cls(algorithm=document["algorithm"], entries=entries)
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, InvalidKeyError):
                raise StoreError(f"{where} lists an unsafe path: {exc}") from exc
            raise StoreError(f"{where} is not a valid directory manifest: {exc}") from exc


def _check_no_clashes(entries: tuple[ManifestEntry, ...], where: str) -> None:
    """A folder cannot hold a file twice, nor a file where another one needs a folder."""
    paths = {entry.path for entry in entries}
    if len(paths) != len(entries):
        raise StoreError(f"{where} lists a path twice; it is damaged: put the folder again")
    for path in paths:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in paths:
                raise StoreError(f"{where} lists both the file {parent!r} and {path!r} inside it; "
                                 "it is damaged: put the folder again")
            parent = parent.rpartition("/")[0]


class FileKey(NamedTuple):
    """What the stat cache keys a file on; ``os.stat_result``'s names for the fields.

    NOTE: walk_files keeps one per file; an ``os.stat_result`` costs ~650
    bytes, this ~185 (a folder of 200,000 files: 35 MiB instead of 124).
    """

    st_ino: int
    st_mtime_ns: int
    st_size: int


def walk_files(root: Path) -> Iterator[tuple[str, FileKey]]:
    """Yield ``(relative posix path, FileKey)`` for every file under ``root``, sorted.

    Symlinks to files are followed (their content is what a reader sees);
    symlinked directories and special files (sockets, FIFOs) are skipped.
    """
    stack = [""]
    found: list[tuple[str, FileKey]] = []
    make = tuple.__new__  # NOTE: FileKey(...) goes through a Python-level __new__: 2x slower
    while stack:
        prefix = stack.pop()
        with os.scandir(root / prefix if prefix else root) as it:
            for entry in it:
                rel = f"{prefix}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel + "/")
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:  # dangling symlink, or removed meanwhile
                    continue
                if entry.is_file():
                    found.append((rel, make(FileKey, (st.st_ino, st.st_mtime_ns, st.st_size))))
    found.sort(key=lambda item: item[0])
    yield from found


# What the stat cache reads of a file's stat: an os.stat_result or a FileKey.
StatLike = os.stat_result | FileKey


class StatCache:
    """Remembers the hash of local files keyed on (path, inode, mtime_ns, size).

    Stored in SQLite so that every process on the machine shares it; an
    unchanged file is never read twice. A cache that cannot be opened or written
    only costs speed, never correctness. A damaged one (garbage, smashed pages,
    a folder in its place, a bad ``-wal``) is moved aside with one warning and
    rebuilt from scratch; one that cannot be written at all (a read-only or full
    disk) is turned off with one warning.
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._local = threading.local()
        self._disabled = False
        self._rebuilt = False
        self._lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS stat_cache ("
                " path TEXT NOT NULL, algorithm TEXT NOT NULL,"
                " inode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                " size INTEGER NOT NULL, oid TEXT NOT NULL,"
                " PRIMARY KEY (path, algorithm))"
            )
            conn.execute("SELECT count(*) FROM stat_cache WHERE rowid = 0").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self) -> sqlite3.Connection | None:
        if self._disabled:
            return None
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._open()
            except (sqlite3.Error, OSError) as exc:
                if not self._damaged(exc) or not self._rebuild(exc):
                    self._disable(exc)
                    return None
                try:
                    conn = self._open()
                except (sqlite3.Error, OSError) as again:
                    self._disable(again)
                    return None
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (a later use opens a new one)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _damaged(self, exc: BaseException) -> bool:
        """Damage to the cache's own files (rebuild it), not a disk that refuses writes."""
        name = str(getattr(exc, "sqlite_errorname", ""))
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR")):
            return True  # "malformed", "file is not a database", a bad -wal or -shm
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return True
        return self.db_path.is_dir()  # "unable to open database file": a folder in its place

    def _rebuild(self, exc: BaseException) -> bool:
        """Move the damaged cache aside, once per process; True if a fresh one can be tried."""
        with self._lock:
            if self._rebuilt:
                return False
            self._rebuilt = True
            stamp = time.strftime("%Y%m%dT%H%M%S")
            moved = []
            for suffix in ("", "-wal", "-shm"):
                path = self.db_path.with_name(self.db_path.name + suffix)
                if path.exists() or path.is_symlink():
                    target = path.with_name(f"{path.name}.damaged-{stamp}")
                    try:
                        path.rename(target)
                    except OSError:
                        return False
                    moved.append(target.name)
        logger.warning("the stat cache %s was damaged (%s); moved it aside (%s) and started a "
                       "new one: unchanged files are hashed once more, then remembered again",
                       self.db_path, exc, ", ".join(moved) or "nothing to move")
        return True

    def _disable(self, exc: BaseException) -> None:
        with self._lock:
            if self._disabled:
                return
            self._disabled = True
        # NOTE: a read-only store or a full disk must fail on the object write,
        # with the store's own error, not here on the cache.
        logger.warning("the stat cache %s cannot be used (%s): files are hashed on every put "
                       "until it can", self.db_path, exc)

    def _failed(self, exc: sqlite3.Error) -> None:
        """A query failed on an open cache: damaged pages are rebuilt, anything else ignored."""
        if not self._damaged(exc):
            return
        self.close()
        if not self._rebuild(exc):
            self._disable(exc)

    def __getstate__(self) -> dict[str, Any]:
        # NOTE: SQLite connections live per thread and cannot be copied or
        # pickled (Prefect deep-copies cache policies, Dask pickles tasks).
        return {"db_path": self.db_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["db_path"])  # type: ignore[misc]

    @staticmethod
    def _key(st: StatLike) -> tuple[int, int, int]:
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def lookup(self, path: str, st: StatLike, algorithm: str) -> str | None:
        return self.lookup_many([(path, st)], algorithm).get(path)

    def lookup_tree(
        self, base: str, files: Sequence[tuple[str, StatLike]], algorithm: str
    ) -> list[str | None]:
        """The cached oid of each of ``files`` (``(rel, stat)``, sorted by rel) under ``base``.

        ``base`` ends with ``/``; a file's key is ``base + rel``. Returns one
        item per file, in order: its oid, or None where its stat changed or
        it was never hashed.
        """
        # NOTE: for a folder of 200,000 files, a dict {path: stat key} (as
        # lookup_many builds) costs ~60 MiB and the scan reads every row of the
        # cache, other folders' too. Here one range scan over the primary key
        # reads this folder's rows only, already sorted by path, and walks
        # them alongside ``files`` (also sorted): no per-file dict at all.
        found: list[str | None] = [None] * len(files)
        conn = self._connect()
        if conn is None or not files:
            return found
        cut = len(base)
        # SQLite's BINARY order is UTF-8 byte order, which is code point order:
        # the order of Python's str comparison, so both sides are sorted alike.
        end = base[:-1] + chr(ord(base[-1]) + 1)
        i, count, previous = 0, len(files), ""
        try:
            rows = conn.execute(
                "SELECT path, inode, mtime_ns, size, oid FROM stat_cache"
                " WHERE path >= ? AND path < ? AND algorithm = ? ORDER BY path",
                (base, end, algorithm),
            )
            for path, inode, mtime_ns, size, oid in rows:
                rel = path[cut:]
                if rel < previous:  # never, as argued above; but never trust it blindly
                    return self._lookup_tree_by_dict(base, files, algorithm)
                previous = rel
                while i < count and files[i][0] < rel:
                    i += 1
                if i == count:
                    break
                name, st = files[i]
                if name == rel and (st.st_ino, st.st_mtime_ns, st.st_size) == (inode, mtime_ns, size):
                    found[i] = oid
        except sqlite3.Error as exc:
            self._failed(exc)
            return [None] * len(files)
        return found

    def _lookup_tree_by_dict(
        self, base: str, files: Sequence[tuple[str, StatLike]], algorithm: str
    ) -> list[str | None]:
        hits = self.lookup_many(((base + rel, st) for rel, st in files), algorithm)
        return [hits.get(base + rel) for rel, _ in files]

    def lookup_many(
        self, items: Iterable[tuple[str, StatLike]], algorithm: str
    ) -> dict[str, str]:
        """Return ``{path: oid}`` for every item whose stat still matches."""
        conn = self._connect()
        wanted = {path: self._key(st) for path, st in items}
        if conn is None or not wanted:
            return {}
        hits: dict[str, str] = {}
        try:
            if len(wanted) > 64:
                # NOTE: one scan beats thousands of point queries for big folders.
                rows = conn.execute(
                    "SELECT path, inode, mtime_ns, size, oid FROM stat_cache"
                    " WHERE algorithm = ?",
                    (algorithm,),
                )
            else:
                marks = ",".join("?" * len(wanted))
                rows = conn.execute(
                    "SELECT path, inode, mtime_ns, size, oid FROM stat_cache"
                    f" WHERE algorithm = ? AND path IN ({marks})",
                    (algorithm, *wanted),
                )
            for path, inode, mtime_ns, size, oid in rows:
                if wanted.get(path) == (inode, mtime_ns, size):
                    hits[path] = oid
        except sqlite3.Error as exc:
            self._failed(exc)
            return {}
        return hits

    def record_many(
        self,
        items: Iterable[tuple[str, StatLike, str]],
        algorithm: str,
        hashed_at_ns: int | None = None,
    ) -> None:
        """Remember ``(path, stat, oid)`` triples, skipping racily fresh files."""
        conn = self._connect()
        if conn is None:
            return
        cutoff = (hashed_at_ns or time.time_ns()) - RACY_WINDOW_NS
        rows = [
            (path, algorithm, st.st_ino, st.st_mtime_ns, st.st_size, oid)
            for path, st, oid in items
            if st.st_mtime_ns < cutoff
        ]
        if not rows:
            return
        try:
            with conn:
                conn.execute("BEGIN")
                conn.executemany(
                    "INSERT OR REPLACE INTO stat_cache VALUES (?, ?, ?, ?, ?, ?)", rows
                )
        except sqlite3.Error as exc:
            self._failed(exc)

    def record(
        self, path: str, st: StatLike, oid: str, algorithm: str, hashed_at_ns: int
    ) -> None:
        self.record_many([(path, st, oid)], algorithm, hashed_at_ns)
