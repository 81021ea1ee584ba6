"""New data in, a Prefect event out: the dataset watcher.

Prefect starts deployments from events, but nothing in it notices new files.
:class:`DatasetWatcher` does: a local folder through filesystem notifications
(watchfiles: inotify, FSEvents), an ``s3://`` prefix through short polls of a
cheap listing fingerprint (names, sizes, ETags). When the data changed and has
then been quiet for ``debounce`` seconds, it stores a snapshot of the dataset
(only new files are read: the stat cache knows the rest) and emits

    uncool.dataset.updated   resource uncool.dataset.<name>
    payload: dataset (the snapshot's object id), url, files, added, removed

once per content: the last content it announced is a ref in the store
(``refs/watch/<name>``), so a restart, a touched file or a copy of a file under
a new name emits nothing. A deployment trigger on that event runs the pipeline
on exactly the snapshot that was announced, whatever lands in the folder later.

    uncool watch data/NAME                # as a long-running process
    prefect deployment run uncool-watch/<deployment> -p url=...   # as a flow run
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .store import ObjectRef, ObjectStore, StoreError
from .store.errors import ObjectNotFoundError

EVENT = "uncool.dataset.updated"
RESOURCE_PREFIX = "uncool.dataset."
STATE_PREFIX = "watch"
# Names that editors, downloaders and copy tools give files being written.
_TEMPORARY = re.compile(r"(\.(tmp|temp|part|partial|crdownload|download|swp|swx)|~)$", re.I)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# The payload names at most this many files; the counts are always exact.
MAX_LISTED = 100

logger = logging.getLogger("uncool.watch")


class WatchError(ValueError):
    """A watcher that cannot start: the message says what to fix."""


def is_dataset_file(rel: str) -> bool:
    """Whether a file belongs to the dataset: not hidden, not a temporary file."""
    parts = PurePosixPath(rel).parts
    return bool(parts) and not any(p.startswith(".") for p in parts) and not _TEMPORARY.search(parts[-1])


def last_announced(store: ObjectStore, name: str) -> dict[str, Any] | None:
    """The state ref of the watcher of ``name`` (its ``oid`` is the dataset), or None."""
    try:
        return store.get_ref(f"{STATE_PREFIX}/{name}")
    except ObjectNotFoundError:
        return None


def content_key(store: ObjectStore, dataset: str) -> str:
    """What the dataset holds, whatever its files are called.

    A digest over the set of (folder, content) pairs: renaming a file, or
    copying it under a new name in the same folder, keeps the key; moving a
    file to another label's folder, or new content, changes it.
    """
    return _content_key(_files(store, dataset))


def _files(store: ObjectStore, dataset: str) -> dict[str, str]:
    """path -> object id of every file of a stored folder."""
    return {e.path: e.oid for e in store.read_manifest(dataset).entries}


def _content_key(files: dict[str, str]) -> str:
    pairs = sorted({(str(PurePosixPath(path).parent), oid) for path, oid in files.items()})
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


@dataclass
class Announcement:
    """What one check of the dataset decided."""

    dataset: str | None
    emitted: bool
    reason: str
    payload: dict[str, Any] = field(default_factory=dict)
    retry: bool = False  # the data changed while it was read: check again after a quiet window


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    listing: dict[str, tuple[int, int]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if not is_dataset_file(rel):
                continue
            try:
                st = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            listing[rel] = (st.st_size, st.st_mtime_ns)
    return listing


def emit_dataset_event(name: str, payload: dict[str, Any]) -> str:
    """Send ``uncool.dataset.updated`` to the Prefect API and wait until it is sent."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event.model_validate({
        "event": EVENT,
        "resource": {"prefect.resource.id": f"{RESOURCE_PREFIX}{name}",
                     "prefect.resource.name": name, "uncool.url": str(payload.get("url", ""))},
        "payload": payload,
    })

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(send())
    return str(event.id)


class DatasetWatcher:
    """Watches one dataset (a local folder or an s3:// prefix) and announces new content.

    Args:
        url: The dataset: a local folder, or ``s3://bucket/prefix``.
        name: The dataset's name: the event's resource is ``uncool.dataset.<name>``.
        store: Where snapshots and the watcher's state go (the pipeline's store).
        debounce: Seconds the data must stay unchanged before it is read.
        poll_interval: Seconds between listings of a remote prefix.
        emit: Sends the event (default: to the Prefect API); returns its id.
    """

    def __init__(self, url: str, name: str, store: ObjectStore, *, debounce: float = 0.5,
                 poll_interval: float = 2.0,
                 emit: Callable[[str, dict[str, Any]], str] = emit_dataset_event,
                 storage_options: dict[str, Any] | None = None) -> None:
        if not _NAME.match(name):
            raise WatchError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-'")
        if debounce < 0 or poll_interval <= 0:
            raise WatchError("debounce must be >= 0 and poll_interval > 0 seconds")
        self.url, self.name, self.store = url, name, store
        self.debounce, self.poll_interval = debounce, poll_interval
        self.emit = emit
        self.storage_options = storage_options
        remote = "://" in url and not url.startswith("file://")
        self.root = None if remote else Path(url.removeprefix("file://")).absolute()
        if self.root is not None and not self.root.is_dir():
            raise WatchError(f"cannot watch {self.root}: no such folder; create it, or check the path")
        self.state_key = f"{STATE_PREFIX}/{name}"

    # -- state ---------------------------------------------------------------
    def last_announced(self) -> dict[str, Any] | None:
        return last_announced(self.store, self.name)

    # -- one check -----------------------------------------------------------
    def check(self) -> Announcement:
        """Snapshot the dataset now and announce it if its content is new.

        Returns an announcement with ``dataset=None`` when the data was still
        being written (it changed while it was read): the next quiet window
        checks again.
        """
        if self.root is None:
            return self._check_remote()
        before = _listing(self.root)
        if not before:
            return Announcement(None, False, f"{self.url} holds no data files yet")
        ref = self.store.put_dir(self.root, include=is_dataset_file)
        if _listing(self.root) != before:
            return Announcement(None, False, "files changed while they were read; waiting", retry=True)
        return self._announce(ref, self.last_announced())

    def _check_remote(self) -> Announcement:
        from .sources import snapshot_folder

        fingerprint = self.remote_fingerprint()
        state = self.last_announced()
        if state and state.get("fingerprint") == fingerprint:
            return Announcement(state["oid"], False, "listing unchanged since the last announcement")
        cache = Path(tempfile.gettempdir()) / "uncool-watch" / self.name
        folder = snapshot_folder(self.url, cache, storage_options=self.storage_options)
        if self.remote_fingerprint() != fingerprint:
            return Announcement(None, False, "objects changed while they were read; waiting",
                                retry=True)
        if not _listing(folder):
            return Announcement(None, False, f"{self.url} holds no data files yet")
        return self._announce(self.store.put_dir(folder, include=is_dataset_file), state, fingerprint)

    def _announce(self, ref: ObjectRef, state: dict[str, Any] | None,
                  fingerprint: str | None = None) -> Announcement:
        files = _files(self.store, ref.name)
        key = _content_key(files)
        if state and state.get("content") == key:
            reason = ("same content as the last announcement" if state["oid"] != ref.name
                      else "unchanged since the last announcement")
            # Remember the listing, so an unchanged remote prefix is not read again.
            if fingerprint and state.get("fingerprint") != fingerprint:
                self.store.set_ref(self.state_key, ref, **{**_extra(state), "fingerprint": fingerprint})
            return Announcement(ref.name, False, reason)
        added, removed = self._changes(state, files)
        payload = {
            "dataset": ref.name, "name": self.name, "url": self.url,
            "files": ref.nfiles, "added_count": len(added), "removed_count": len(removed),
            "added": added[:MAX_LISTED], "removed": removed[:MAX_LISTED],
            "previous": state["oid"] if state else None,
        }
        event_id = self.emit(self.name, payload)
        # NOTE: recorded after the event was sent: a crash in between announces
        # the same content once more, and the pipeline's cache makes that run a
        # no-op; the other order could lose an announcement for good.
        self.store.set_ref(self.state_key, ref, content=key, url=self.url, event_id=event_id,
                           announced=time.time(), fingerprint=fingerprint)
        return Announcement(ref.name, True, f"announced {ref.name} ({ref.nfiles} files, "
                            f"{len(added)} added, {len(removed)} removed)", payload)

    def _changes(self, state: dict[str, Any] | None, now: dict[str, str]) -> tuple[list[str], list[str]]:
        old: dict[str, str] = {}
        if state:
            try:
                old = _files(self.store, state["oid"])
            except (StoreError, FileNotFoundError):
                old = {}
        added = sorted(p for p, oid in now.items() if old.get(p) != oid)
        removed = sorted(p for p in old if p not in now)
        return added, removed

    def remote_fingerprint(self) -> str:
        """A digest of the prefix's listing: names, sizes and ETags (one LIST, no reads)."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.url, **(self.storage_options or {}))
        try:
            listing = fs.find(path, detail=True, withdirs=False)
        except FileNotFoundError:
            listing = {}
        fs.invalidate_cache()
        rows = sorted(
            (key[len(path):].lstrip("/"), info.get("size"), str(info.get("ETag") or info.get("etag")
                                                               or info.get("mtime") or ""))
            for key, info in listing.items()
            if is_dataset_file(key[len(path):].lstrip("/"))
        )
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    # -- the loop ------------------------------------------------------------
    def changes(self, stop: threading.Event) -> Iterator[None]:
        """Yield whenever the data changed and then stayed quiet for ``debounce`` seconds.

        Yields once at the start, so content that arrived while nothing watched
        is announced too.
        """
        yield
        if self.root is not None:
            yield from self._local_changes(stop)
        else:
            yield from self._remote_changes(stop)

    def _local_changes(self, stop: threading.Event) -> Iterator[None]:
        import watchfiles

        assert self.root is not None

        def relevant(_change: Any, path: str) -> bool:
            assert self.root is not None  # for mypy, inside the closure
            rel = os.path.relpath(path, self.root).replace(os.sep, "/")
            return rel == "." or is_dataset_file(rel) or os.path.isdir(path)

        # step: quiet time before a batch is yielded (the debounce window);
        # debounce: the longest a continuous stream of writes is grouped.
        for batch in watchfiles.watch(
            self.root, watch_filter=relevant, step=max(1, int(self.debounce * 1000)),
            debounce=max(60_000, int(self.debounce * 2000)), rust_timeout=1000,
            yield_on_timeout=True, stop_event=stop, raise_interrupt=False,
        ):
            if batch:
                yield

    def _remote_changes(self, stop: threading.Event) -> Iterator[None]:
        last = self.remote_fingerprint()
        changed_at: float | None = None
        while not stop.wait(self.poll_interval):
            now = self.remote_fingerprint()
            if now != last:
                last, changed_at = now, time.monotonic()
            elif changed_at is not None and time.monotonic() - changed_at >= self.debounce:
                changed_at = None
                yield

    def run(self, stop: threading.Event | None = None,
            on_result: Callable[[Announcement], None] | None = None) -> None:
        """Watch until ``stop`` is set (or forever), checking after each quiet change."""
        stop = stop or threading.Event()
        report = on_result or (lambda a: logger.info("%s: %s", self.name, a.reason))
        pending = False
        for _ in self.changes(stop):
            pending = True
            while pending and not stop.is_set():
                result = self.check()
                report(result)
                pending = result.retry
                if pending:
                    stop.wait(max(self.debounce, 0.2))


def _extra(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in {"version", "oid", "algorithm", "size", "created"}}
