"""Record packs: many settled run records of a remote store in one object, shared by every reader.

A first look at a store on S3 (no per-machine cache yet) costs a GET per run
record. A pack holds many records, each with the size and modification time the
listing of ``runs/`` gave for it when it was packed; a reader takes a record
from a pack only when the listing it has just made gives the same pair, and
reads the others one by one. Like restic's index files, packs are derived
data: a deleted, vanished or damaged pack costs the next look its reads, never
a wrong record.

Layout: ``run-packs/<sha256 of the content>.json``, holding
``{"version": 1, "records": {"<name under runs/>": [size, mtime, record], ...}}``
with the names sorted, so that two readers packing the same records write the
same object. When and what to pack is :mod:`reading`'s business.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..store import StoreError
from ..store.backends import FileStat, FsspecBackend, LocalBackend
from ..store.objects import RUN_PACKS_DIR, RUNS_DIR

logger = logging.getLogger("uncool.records")

PACK_VERSION = 1
# NOTE: a writer deletes the packs listed before its new one, so a store holds one
# pack, or a few while writers race or where deletes are denied; a reader
# looks at no more than this many, newest first.
MAX_PACKS_READ = 3
_PACK_NAME = re.compile(rf"{RUN_PACKS_DIR}/([0-9a-f]{{64}})\.json")

Backend = LocalBackend | FsspecBackend
# A packed record: the size and mtime its object had when packed, and the record.
Entry = tuple[int, float, dict[str, Any]]

_logged: set[str] = set()


@dataclass(frozen=True)
class Pack:
    """One pack as read: its path in the store and its entries, keyed by record path (``runs/...``)."""

    rel: str
    entries: dict[str, Entry]


def list_packs(backend: Backend) -> list[tuple[str, FileStat]]:
    """The store's packs, newest first; none where they cannot be listed (the records can be)."""
    try:
        listed = [(rel, stat) for rel, stat in backend.list(RUN_PACKS_DIR) if _PACK_NAME.fullmatch(rel)]
    except (StoreError, OSError) as exc:
        _log_once("list", logging.DEBUG, "cannot list the record packs of %s (%s); reading the "
                  "records one by one", backend.describe(), exc)
        return []
    return sorted(listed, key=lambda item: (item[1].mtime, item[0]), reverse=True)


class DamagedPackError(ValueError):
    """A pack that is not whole or not well formed: of no use to anyone, so the next writer deletes it."""


def read_pack(backend: Backend, rel: str) -> Pack | None:
    """The pack at ``rel``, or None if it vanished or cannot be read.

    Raises:
        DamagedPackError: it does not hash to its name, or is not a pack (logged as a warning).
    """
    try:
        data = backend.read_bytes(rel)
    except FileNotFoundError:
        # NOTE: a reader that wrote a pack covering this one deleted it since
        # the listing; the records it held are still in runs/.
        return None
    except (StoreError, OSError) as exc:
        _log_once(rel, logging.DEBUG, "cannot read the record pack %s (%s); reading its records "
                  "one by one", backend.url_for(rel), exc)
        return None
    try:
        return Pack(rel, decode_pack(rel, data))
    except _OtherVersionError as exc:
        _log_once(rel, logging.DEBUG, "skipping the record pack %s: %s", backend.url_for(rel), exc)
        return None
    except ValueError as exc:
        _log_once(rel, logging.WARNING, "skipping the malformed record pack %s (%s); its records "
                  "are read one by one, and the next pack written replaces it",
                  backend.url_for(rel), exc)
        raise DamagedPackError(str(exc)) from exc


class PackReader:
    """The packs of one look at a store: listed once, each read at most once.

    :meth:`prefetch` may run in another thread while the records are listed;
    wait for it before calling :meth:`take`.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._listed: list[tuple[str, FileStat]] | None = None
        self._read: dict[str, Pack | None] = {}

    def listed(self) -> list[tuple[str, FileStat]]:
        if self._listed is None:
            self._listed = list_packs(self.backend)
        return self._listed

    def read(self, rel: str) -> Pack | None:
        """The pack at ``rel`` (see :func:`read_pack`); None if it vanished or is damaged."""
        if rel not in self._read:
            try:
                self._read[rel] = read_pack(self.backend, rel)
            except DamagedPackError:
                self._read[rel] = None
        return self._read[rel]

    def prefetch(self) -> None:
        """List the packs and read the newest: what a look with nothing cached needs first."""
        if self.listed():
            self.read(self.listed()[0][0])

    def take(self, wanted: dict[str, FileStat], racy_s: float) -> dict[str, dict[str, Any]]:
        """The records of ``wanted`` (path -> its stat in the listing just made) that packs hold unchanged.

        An entry is taken only if the listing gives its size and mtime, and
        that mtime is ``racy_s`` older than the pack (by the store's clock,
        which gives both: a writer whose clock runs ahead may have packed a
        record still racy). Packs are read newest first, and only while some
        record still wanted is old enough for an older pack to hold it.
        """
        left = dict(wanted)
        found: dict[str, dict[str, Any]] = {}
        for rel, stat in self.listed()[:MAX_PACKS_READ]:
            settled_before = stat.mtime - racy_s
            if not any(wanted_stat.mtime < settled_before for wanted_stat in left.values()):
                break  # nor can an older pack hold any of them
            pack = self.read(rel)
            if pack is None:
                continue
            for name, (size, mtime, record) in pack.entries.items():
                listed = left.get(name)
                if (listed is not None and listed.size == size and listed.mtime == mtime
                        and mtime < settled_before):
                    found[name] = record
                    del left[name]
            if not left:
                break
        return found


def write_pack(backend: Backend, entries: dict[str, Entry]) -> str | None:
    """Store a pack of ``entries`` (by record path); its path, or None if it could not be written.

    A failure is logged (once a process) and is no error: without the pack the
    next first look reads the records one by one, as this one did.
    """
    rel, data = encode_pack(entries)
    try:
        # NOTE: named by its content, so a pack already there is this very pack.
        backend.write_bytes(rel, data, overwrite=False)
    except (StoreError, OSError) as exc:
        # Read-only credentials are a normal way to look at a shared store.
        level = logging.DEBUG if isinstance(exc, PermissionError) else logging.WARNING
        _log_once("write", level, "could not write a record pack to %s (%s); the next first look "
                  "reads the records one by one again", backend.describe(), exc)
        return None
    return rel


def delete_packs(backend: Backend, rels: Iterable[str]) -> None:
    """Delete packs a newer one replaces; stop quietly at the first that cannot be deleted."""
    for rel in rels:
        try:
            backend.delete(rel)
        except (StoreError, OSError) as exc:
            _log_once("delete", logging.DEBUG, "could not delete the record pack %s (%s)",
                      backend.url_for(rel), exc)
            return


def encode_pack(entries: dict[str, Entry]) -> tuple[str, bytes]:
    """The path and bytes of the pack of ``entries``: the same records always give the same pack."""
    strip = len(RUNS_DIR) + 1
    records = {rel[strip:]: [size, mtime, record] for rel, (size, mtime, record) in sorted(entries.items())}
    data = json.dumps({"version": PACK_VERSION, "records": records}, separators=(",", ":")).encode()
    return f"{RUN_PACKS_DIR}/{hashlib.sha256(data).hexdigest()}.json", data


class _OtherVersionError(ValueError):
    """A pack in a format this version does not read (a newer uncool wrote it): no damage."""


def decode_pack(rel: str, data: bytes) -> dict[str, Entry]:
    """The entries of the pack at ``rel`` (by record path); ValueError unless it is whole and well formed."""
    name = _PACK_NAME.fullmatch(rel)
    if name is None or hashlib.sha256(data).hexdigest() != name.group(1):
        raise ValueError("its content does not hash to its name")
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    version = document.get("version")
    if type(version) is not int:
        raise ValueError("no version number")
    if version != PACK_VERSION:
        raise _OtherVersionError(f"version {version}, not {PACK_VERSION}")
    if not isinstance(document.get("records"), dict):
        raise ValueError("no 'records' object")
    entries: dict[str, Entry] = {}
    for name_under_runs, entry in document["records"].items():
        if not (isinstance(entry, list) and len(entry) == 3 and type(entry[0]) is int
                and isinstance(entry[1], int | float) and not isinstance(entry[1], bool)
                and isinstance(entry[2], dict)):
            raise ValueError(f"the entry of {name_under_runs!r} is not [size, mtime, record]")
        entries[f"{RUNS_DIR}/{name_under_runs}"] = (entry[0], float(entry[1]), entry[2])
    return entries


def _log_once(key: str, level: int, message: str, *args: object) -> None:
    """Log ``message`` the first time ``key`` comes up in this process."""
    if key in _logged:
        return
    _logged.add(key)
    logger.log(level, message, *args)
