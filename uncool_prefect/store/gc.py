"""Mark-and-sweep garbage collection with a grace period for running writers.

Roots are every ref, every object id mentioned in a run record, and an
explicit keep list. Directory manifests reached from a root keep their files.

Safety against concurrent writers rests on two rules:

* nothing younger than the grace period is deleted (objects and temp files of
  a writer still at work survive);
* a writer that reuses an existing object first *freshens* it (updates its
  mtime), and the sweep re-reads the mtime at the moment of deletion
  (see ``LocalBackend.delete``), so an object reused during the sweep survives.

Only unreachable objects are deleted, manifests before the files they list, so
a gc killed at any point leaves no ref pointing at a missing object.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ObjectNotFoundError, StoreError
from .keys import DIR_SUFFIX, parse_oid

if TYPE_CHECKING:
    from .objects import ObjectStore

_OID_IN_TEXT = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?:\.dir)?(?![0-9a-f])")
_OID_IN_BYTES = re.compile(rb"(?<![0-9a-f])[0-9a-f]{64}(?:\.dir)?(?![0-9a-f])")


def find_object_ids(data: bytes) -> set[str]:
    """Every object id written out in ``data`` (JSON, pickle, plain text)."""
    return {match.decode("ascii") for match in _OID_IN_BYTES.findall(data)}


@dataclass
class GcReport:
    reachable: int = 0
    removed: list[str] = field(default_factory=list)
    removed_bytes: int = 0
    spared_young: int = 0
    removed_temp: int = 0
    # Unfinished multipart uploads (S3) older than the grace: aborted, or listed on a dry run.
    aborted_uploads: list[str] = field(default_factory=list)
    dangling: list[str] = field(default_factory=list)
    dry_run: bool = False


def _roots(store: ObjectStore, keep: Iterable[str]) -> tuple[set[str], set[str]]:
    """``(roots, mentions)``: ids that must exist, and ids run records mention.

    Run records are free-form JSON (see lineage): any id-shaped string in them
    is kept if it names an object, and ignored if not (a params hash, say).
    Scanning the text keeps gc independent of their schema.
    """
    roots: set[str] = set()
    for name in keep:
        digest, is_dir = parse_oid(name)
        roots.add(digest + (DIR_SUFFIX if is_dir else ""))
    for _key, document in store.iter_refs():
        roots.add(document["oid"])
        # A result that names other objects (a dataset id, a model id) keeps them.
        roots.update(document.get("links", ()))
    mentions: set[str] = set()
    for _rel, data in store.iter_run_records():
        mentions.update(_OID_IN_TEXT.findall(data.decode("utf-8", errors="replace")))
    return roots, mentions


def _mark(store: ObjectStore, roots: set[str], mentions: set[str], existing: set[str],
          report: GcReport) -> set[str]:
    reachable: set[str] = set()
    for name in sorted(roots | mentions):
        digest, is_dir = parse_oid(name)
        if not is_dir and name not in existing and digest + DIR_SUFFIX in existing:
            name, is_dir = digest + DIR_SUFFIX, True
        if name not in existing:
            # NOTE: the listing came first; a writer may have added the object
            # and its ref since. Only one still missing is worth a warning.
            if name in roots and not store.has(name):
                report.dangling.append(name)
            continue
        reachable.add(name)
        if is_dir:
            try:
                manifest = store.read_manifest(name)
            except (StoreError, ObjectNotFoundError) as exc:
                # A damaged manifest keeps what it can't list: never sweep on doubt.
                raise StoreError(
                    f"gc stopped: manifest {name} is unreadable ({exc}); "
                    "run `uncool store verify` and repair it first"
                ) from exc
            reachable.update(entry.oid for entry in manifest.entries)
    return reachable


def collect_garbage(store: ObjectStore, *, grace: float = 3600.0,
                    keep: Iterable[str] = (), dry_run: bool = False) -> GcReport:
    """Delete unreachable objects and stale temp files older than ``grace`` seconds."""
    if grace < 0:
        raise StoreError("grace must be zero or more seconds")
    report = GcReport(dry_run=dry_run)
    started = time.time()
    cutoff = started - grace
    # List first, then mark: an object written after the listing is not a
    # candidate at all, whatever the marking sees.
    objects = {info.name: info for info in store.ls()}
    roots, mentions = _roots(store, keep)
    reachable = _mark(store, roots, mentions, set(objects), report)
    report.reachable = len(reachable)
    garbage = [info for name, info in objects.items() if name not in reachable]
    # Manifests first: a half-finished sweep never leaves a manifest without its files.
    garbage.sort(key=lambda info: (not info.is_dir, info.name))
    for info in garbage:
        if info.mtime > cutoff:
            report.spared_young += 1
            continue
        if dry_run:
            report.removed.append(info.name)
            report.removed_bytes += info.size
            continue
        digest, is_dir = parse_oid(info.name)
        if store.backend.delete(store._rel(digest, is_dir), unless_newer_than=cutoff):
            report.removed.append(info.name)
            report.removed_bytes += info.size
        else:
            report.spared_young += 1
    for rel, mtime in list(store.tmp_files()):
        if mtime <= cutoff:
            if not dry_run:
                store.backend.delete(rel)
            report.removed_temp += 1
    for key, upload_id in store.backend.stale_uploads(started_before=cutoff):
        if not dry_run:
            store.backend.abort_upload(key, upload_id)
        report.aborted_uploads.append(key)
    return report
