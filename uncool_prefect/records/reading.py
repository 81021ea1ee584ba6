"""Reading every run record of a store: one listing, parallel reads, a per-machine cache.

The one way the records package reads all records (``exp show``, lineage,
targets, ``store verify``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..store import ObjectStore
from ..store.objects import RUNS_DIR

# NOTE: records are a few KB, so reading them is all round trips; 8 in flight
# hide most of them (more only add thread switches: measured on moto).
READ_WORKERS = 8
RECORD_CACHE = "run-records.json"
RECORD_CACHE_VERSION = 1
# Records younger than this (by the store's clock) are read again next time.
RACY_S = 60.0


def read_records(store: ObjectStore) -> list[dict[str, Any]]:
    """Every run record in the store, oldest first: one listing, then the reads.

    On a remote store (S3) the reads go :data:`READ_WORKERS` at a time, and
    records already read on this machine come from a cache in the store's
    ``state_dir`` (see :class:`_RecordCache`): a second look costs the listing.
    A record deleted since the listing, or not JSON, is left out.
    """
    backend = store.backend
    listing = list(backend.list(RUNS_DIR))
    cache = None if backend.is_local else _RecordCache(Path(store.state_dir) / RECORD_CACHE)
    found: dict[str, dict[str, Any] | None] = {}
    missing = []
    for rel, stat in listing:
        cached = cache.get(rel, stat.size, stat.mtime) if cache else None
        if cached is None:
            missing.append(rel)
        found[rel] = cached

    def read(rel: str) -> dict[str, Any] | None:
        try:
            document = json.loads(backend.read_bytes(rel))
        except (FileNotFoundError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    if backend.is_local or len(missing) < 2:
        found.update((rel, read(rel)) for rel in missing)
    else:
        with ThreadPoolExecutor(min(READ_WORKERS, len(missing)),
                                thread_name_prefix="uncool-records") as pool:
            found.update(zip(missing, pool.map(read, missing), strict=True))
    if cache is not None:
        cache.update({rel: (stat.size, stat.mtime, found[rel]) for rel, stat in listing})
    records = [r for r in found.values() if r is not None]
    return sorted(records, key=lambda r: (r.get("started", 0), r.get("flow_run_id", "")))


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
