"""``uncool store``: put, get, inspect, verify and clean the object store."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import cyclopts
from cyclopts import Parameter
from rich.table import Table

from ..progress import RichCallback
from ..store import Problem, StoreError
from .common import Basepath, app, err, human, open_cli_store, out, parse_duration

store_app = cyclopts.App(name="store", help="Put, get, inspect and clean the object store.")
app.command(store_app)


@store_app.command
def put(path: Path, /, *, basepath: Basepath = None) -> None:
    """Store a file or a folder; print its object id (folders end in .dir).

    Parameters
    ----------
    path
        File or folder to store. Unchanged files are not read again.
    """
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    store = open_cli_store(basepath)
    with RichCallback(f"put {path.name}") as progress:
        ref = store.put(path, callback=progress)
    out.print(ref.name)


@store_app.command
def get(oid: str, dest: Path, /, *, basepath: Basepath = None) -> None:
    """Write an object (file) or a .dir object (folder) to DEST, verified.

    Parameters
    ----------
    oid
        Object id as printed by `uncool store put`.
    dest
        Destination file, or a new or empty folder for a .dir object.
    """
    store = open_cli_store(basepath)
    with RichCallback(f"get {oid[:12]}") as progress:
        store.get_file(oid, dest, callback=progress)
    out.print(str(dest))


@store_app.command
def cat(oid: str, /, *, basepath: Basepath = None) -> None:
    """Write an object's bytes to stdout, verified before the first byte (a .dir prints its manifest).

    Parameters
    ----------
    oid
        Object id as printed by `uncool store put`.
    """
    store = open_cli_store(basepath)
    # NOTE: the whole object is verified before its first byte is written:
    # a damaged one writes nothing and ends with the error.
    with store.open(oid, verify_first=True) as stream:
        while chunk := stream.read(1 << 20):
            sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


@store_app.command(name="ls")
def ls_(*, basepath: Basepath = None, json_output: Annotated[bool, Parameter(name="--json")] = False) -> None:
    """List the objects in the store."""
    store = open_cli_store(basepath)
    infos = sorted(store.ls(), key=lambda i: i.name)
    if json_output:
        out.print(json.dumps([{"oid": i.name, "size": i.size, "mtime": i.mtime} for i in infos]))
        return
    for info in infos:
        out.print(f"{info.name}  {human(info.size):>10}")


@store_app.command
def du(*, basepath: Basepath = None, json_output: Annotated[bool, Parameter(name="--json")] = False) -> None:
    """Show objects, stored bytes, logical bytes and the deduplication ratio.

    Logical bytes count every ref and every file of every folder snapshot in
    full: what the store would hold without deduplication.
    """
    store = open_cli_store(basepath)
    usage = store.du()
    if json_output:
        out.print(json.dumps({
            "objects": usage.objects, "directories": usage.directories, "refs": usage.refs,
            "stored_bytes": usage.stored_bytes, "logical_bytes": usage.logical_bytes,
            "dedup_ratio": round(usage.dedup_ratio, 3),
        }))
        return
    table = Table(title=f"store {store.url}", show_header=False)
    table.add_row("objects", f"{usage.objects} ({usage.directories} folders)")
    table.add_row("refs", str(usage.refs))
    table.add_row("stored bytes", human(usage.stored_bytes))
    table.add_row("logical bytes", human(usage.logical_bytes))
    table.add_row("dedup ratio", f"{usage.dedup_ratio:.2f}x")
    out.print(table)


@store_app.command
def verify(
    *,
    basepath: Basepath = None,
    repair: Annotated[bool, Parameter(
        help="Move corrupt objects aside, so that putting the original data again (or the "
             "cache miss that recomputes a result) stores a good copy.")] = False,
) -> int:
    """Re-hash every object and check every ref and run record; exit 1 and list each problem.

    Kinds: corrupt (the bytes do not match the id), missing (listed by a folder
    or named by a run record, not there), malformed (a manifest that is not
    one), dangling (a ref names an object that is not there), quarantined (a
    damaged copy moved aside earlier, its object not put again since).
    """
    from ..records.reading import read_records
    from ..records.targets import named_objects

    store = open_cli_store(basepath)
    with RichCallback("verify") as progress:
        problems = store.verify(callback=progress, repair=repair)
    for record in read_records(store):
        for oid in sorted(named_objects(record)):
            name = oid if store.has(oid) else oid + ".dir"
            if not store.has(name):
                problems.append(Problem(oid, store.url_of(oid), "missing",
                                        f"run record {record.get('flow_run_id')} names it"))
    if not problems:
        out.print(f"all objects in {store.url} verified")
        return 0
    for problem in problems:
        out.print(f"{problem.kind}: {problem.name} at {problem.url}: {problem.detail}", markup=False)
    # One missing object listed by several folders is one object to repair.
    damaged = len({problem.name for problem in problems})
    corrupt_left = any(p.kind == "corrupt" and "moved aside" not in p.detail for p in problems)
    advice = ("run `uncool store verify --repair` to move the corrupt ones aside, then put the "
              "original data again" if corrupt_left else "put the original data again to repair")
    err.print(f"{damaged} damaged object(s); {advice}")
    return 1


@store_app.command
def gc(
    *,
    basepath: Basepath = None,
    grace: Annotated[str, Parameter(help="Spare anything younger than this (e.g. 30m, 1h, 0).")] = "1h",
    keep: Annotated[tuple[str, ...], Parameter(help="Object ids to keep besides refs and runs.")] = (),
    dry_run: Annotated[bool, Parameter(help="List what would be removed; delete nothing.")] = False,
) -> None:
    """Delete objects no ref, run record or --keep id reaches, older than --grace."""
    store = open_cli_store(basepath)
    report = store.gc(grace=parse_duration(grace), keep=keep, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    out.print(
        f"{verb} {len(report.removed)} object(s), {human(report.removed_bytes)}; "
        f"kept {report.reachable} reachable, spared {report.spared_young} younger than {grace}; "
        f"{verb} {report.removed_temp} stale temp file(s)"
    )
    if report.aborted_uploads:
        out.print(f"{'would abort' if dry_run else 'aborted'} {len(report.aborted_uploads)} "
                  f"unfinished multipart upload(s) older than {grace}, left by writers that died")
    for name in report.dangling:
        err.print(f"warning: a ref or run names {name}, which is not in the store")


