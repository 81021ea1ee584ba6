"""Reading every run record of a store: one listing, a per-machine cache, shared packs, parallel reads.

The one way the records package reads all records (``exp show``, lineage,
targets, ``store verify``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..store import ObjectStore
from ..store.backends import FileStat, FsspecBackend, LocalBackend
from ..store.objects import RUNS_DIR
from . import packs

# NOTE: records are a few KB, so reading them is all round trips; 8 in flight
# hide most of them (more only add thread switches: measured on moto).
READ_WORKERS = 8
RECORD_CACHE = "run-records.json"
RECORD_CACHE_VERSION = 1
# Records younger than this (by the store's clock) are read again next time.
RACY_S = 60.0
# NOTE: with fewer records to read than this, two rounds of parallel GETs
# take about what listing the packs and fetching one would.
PACK_LOOKUP_MIN = 2 * READ_WORKERS
# NOTE: a pack is rewritten whole (one PUT of every settled record, ~6 MB at
# 1,000 records) and saves each later first look a GET per record it adds; at
# this many records read one by one the rewrite costs about what they did, and
# a first look never reads more than this many before the next pack comes.
PACK_MIN_RECORDS = 64


def read_records(store: ObjectStore) -> list[dict[str, Any]]:
    """Every run record in the store, oldest first: one listing, then the reads.

    On a remote store (S3) records already read on this machine come from a
    cache in the store's ``state_dir`` (see :class:`_RecordCache`): a second
    look costs the listing. Records not in it come from the store's record
    packs (see :mod:`packs`) where a pack holds them unchanged, and the rest
    from their own objects, :data:`READ_WORKERS` at a time; a reader that had
    to read :data:`PACK_MIN_RECORDS` or more that way packs every settled
    record it knows, for the next first look anywhere. A record deleted since
    the listing, or not JSON, is left out.
    """
    backend = store.backend
    if backend.is_local:
        # NOTE: no cache and no packs: a local read costs about what a lookup would.
        return _oldest_first(_read_record(backend, rel) for rel, _stat in backend.list(RUNS_DIR))
    cache = _RecordCache(Path(store.state_dir) / RECORD_CACHE)
    pack_reader = packs.PackReader(backend)
    with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="uncool-records") as pool:
        # NOTE: nothing cached here (a first look on this machine): the packs
        # will be wanted, and the newest comes while runs/ is listed (a third
        # of a second for 1,000 records on moto).
        ahead = pool.submit(pack_reader.prefetch) if not cache.entries else None
        listing = list(backend.list(RUNS_DIR))
        if ahead is not None:
            ahead.result()
        found: dict[str, dict[str, Any] | None] = {}
        missing: dict[str, FileStat] = {}
        for rel, stat in listing:
            found[rel] = cache.get(rel, stat.size, stat.mtime)
            if found[rel] is None:
                missing[rel] = stat
        if len(missing) >= PACK_LOOKUP_MIN:
            from_packs = pack_reader.take(missing, RACY_S)
            found.update(from_packs)
            for rel in from_packs:
                del missing[rel]
        found.update(zip(missing, pool.map(lambda rel: _read_record(backend, rel), missing),
                         strict=True))
    cache.update({rel: (stat.size, stat.mtime, found[rel]) for rel, stat in listing})
    # NOTE: the cache's rule (see _RecordCache): a record younger than RACY_S
    # may be rewritten within its mtime's second, so it is not packed either
    # (and readers check that again by the store's clock: PackReader.take).
    settled_before = time.time() - RACY_S
    read_one_by_one = sum(1 for rel, stat in missing.items()
                          if found[rel] is not None and stat.mtime < settled_before)
    if read_one_by_one >= PACK_MIN_RECORDS:
        _repack(store, dict(listing), found, [rel for rel, _ in pack_reader.listed()], settled_before)
    return _oldest_first(found.values())


def _read_record(backend: LocalBackend | FsspecBackend, rel: str) -> dict[str, Any] | None:
    try:
        document = json.loads(backend.read_bytes(rel))
    except (FileNotFoundError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _oldest_first(found: Iterable[dict[str, Any] | None]) -> list[dict[str, Any]]:
    records = [r for r in found if r is not None]
    return sorted(records, key=lambda r: (r.get("started", 0), r.get("flow_run_id", "")))


def _repack(store: ObjectStore, listing: dict[str, FileStat], found: dict[str, dict[str, Any] | None],
            listed_packs: list[str], settled_before: float) -> None:
    """Write a pack of every settled record known; then delete the packs listed before it."""
    entries: dict[str, packs.Entry] = {}
    for rel, stat in listing.items():
        record = found.get(rel)
        if record is not None and stat.mtime < settled_before:
            entries[rel] = (stat.size, stat.mtime, record)
    written = packs.write_pack(store.backend, entries)
    if written is not None:
        # NOTE: every pack listed before this look, not only those it read and
        # this one covers: packs are derived data, so one this look never read
        # (a racing writer's, one past MAX_PACKS_READ, a damaged one) would
        # otherwise stay forever; deleting one costs a later look some reads.
        packs.delete_packs(store.backend, [rel for rel in listed_packs if rel != written])


class _RecordCache:
    """Run records of a remote store already read here, keyed by name, size and modification time.

    NOTE: a record is written once at the end of its run (``uncool reproduce``
    rewrites its new run's once, right after). A rewrite changes the object's
    modification time, but S3 keeps it to the second and clocks differ, so a
    record is cached only once it is :data:`RACY_S` old (as git's index does
    for files changed within its timestamp's resolution): a rewrite later than
    that has another time. The cache is machine-local and disposable: an
    unreadable one is started afresh.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        try:
            document = json.loads(path.read_bytes())
            if document.get("version") == RECORD_CACHE_VERSION:
                self.entries = dict(document["records"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.entries = {}

    def get(self, rel: str, size: int, mtime: float) -> dict[str, Any] | None:
        entry = self.entries.get(rel)
        if entry and entry[0] == size and entry[1] == mtime and isinstance(entry[2], dict):
            return entry[2]
        return None

    def update(self, listing: dict[str, tuple[int, float, dict[str, Any] | None]]) -> None:
        """Keep exactly the listed records that are old enough; write the file if that changed."""
        settled = time.time() - RACY_S
        entries = {rel: [size, mtime, record] for rel, (size, mtime, record) in listing.items()
                   if record is not None and mtime < settled}
        if entries.keys() == self.entries.keys() and all(
                self.entries[rel][:2] == entry[:2] for rel, entry in entries.items()):
            return
        data = json.dumps({"version": RECORD_CACHE_VERSION, "records": entries}).encode("utf-8")
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        # NOTE: a failed write costs the next look its reads, nothing more.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp.write_bytes(data)
            os.replace(temp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                temp.unlink()
