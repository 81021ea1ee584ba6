"""Folders of many files: what put_dir promises at scale, checked on a few thousand files.

The timing goals (200,000 files) live in ``bench/scale.py``; here only results:
the same ids as the plain encoding, the stat cache found by its range scan, no
file read twice, lost objects written again, few new files made durable
without syncfs, and memory per file bounded.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from uncool_prefect.store import Manifest, ManifestEntry, ObjectStore
from uncool_prefect.store import objects as objects_module
from uncool_prefect.store.hashing import MANIFEST_VERSION, FileKey, hash_bytes, walk_files

ODD_NAMES = ["a", "b/c", 'q"uote', "back\\slash", "tab\tx", "nl\nx", "é/ü", "日本/語",
             "\x7f", "\u2028", "emoji😀", "ctrl\x01", "a.b", "a-b", "a0", "a/b"]


def _plain_json(manifest: Manifest) -> bytes:
    """The encoding manifests had from the start: ids must never change."""
    document = {
        "version": MANIFEST_VERSION,
        "algorithm": manifest.algorithm,
        "entries": [{"path": e.path, "hash": e.oid, "size": e.size}
                    for e in sorted(manifest.entries, key=lambda e: e.path)],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _make_tree(root: Path, count: int, per_folder: int = 250) -> None:
    then = time.time_ns() - 60 * 10**9  # outside the stat cache's racy window
    for i in range(count):
        path = root / f"d{i // per_folder:03d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"file %d\n" % i)
        os.utime(path, ns=(then, then))


@pytest.mark.parametrize("count", [0, 1, 5000])
def test_manifest_bytes_are_the_plain_json_encoding(count: int) -> None:
    entries = [ManifestEntry(f"d{i % 7}/f{i}.bin", f"{i:064x}", i * 13) for i in range(count)]
    entries += [ManifestEntry(name, f"{len(name):064x}", 1) for name in ODD_NAMES]
    entries.reverse()  # unsorted on purpose
    manifest = Manifest("sha256", tuple(entries))
    assert manifest.to_bytes() == _plain_json(manifest)


def test_manifest_entries_keep_no_dict_per_file() -> None:
    entry = ManifestEntry("a", "0" * 64, 1)
    assert not hasattr(entry, "__dict__")
    with pytest.raises(AttributeError):
        entry.size = 2  # type: ignore[misc]


def test_walk_files_yields_sorted_stat_keys(tmp_path: Path) -> None:
    _make_tree(tmp_path, 600)
    found = list(walk_files(tmp_path))
    assert [rel for rel, _ in found] == sorted(rel for rel, _ in found)
    rel, key = found[0]
    st = os.stat(tmp_path / rel)
    assert isinstance(key, FileKey)
    assert key == (st.st_ino, st.st_mtime_ns, st.st_size)
    assert (key.st_ino, key.st_mtime_ns, key.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)


def test_lookup_tree_agrees_with_lookup_many(tmp_path: Path) -> None:
    """The range scan finds exactly what the per-path lookup finds, whatever the names."""
    data = tmp_path / "data"
    sibling = tmp_path / "data2"  # shares the prefix "data": must not be mistaken for it
    then = time.time_ns() - 60 * 10**9
    # Names a folder may hold, whose order differs between bytes and naive guesses.
    names = ['q"uote', "b/c", "é/ü", "日本/語", "emoji😀", "a.b", "a-b", "a0", "a/b",
             "Z", "~tilde", "sp ace", "\u2028"]
    for root in (data, sibling):
        for name in names + [f"many/{i:04d}" for i in range(200)]:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(name.encode())
            os.utime(path, ns=(then, then))
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    store.put_dir(data)
    store.put_dir(sibling)
    changed = data / "many" / "0007"
    changed.write_bytes(b"changed")
    files = list(walk_files(data))
    base = str(data.absolute()) + "/"
    tree = store.stat_cache.lookup_tree(base, files, "sha256")
    many = store.stat_cache.lookup_many(((base + rel, st) for rel, st in files), "sha256")
    assert tree == [many.get(base + rel) for rel, _ in files]
    missed = [rel for (rel, _), oid in zip(files, tree, strict=True) if oid is None]
    assert missed == ["many/0007"]
    assert tree[[rel for rel, _ in files].index("q\"uote")] == hash_bytes(b'q"uote')


def test_unchanged_folder_is_not_read_again_and_gives_the_same_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    _make_tree(data, 3000)
    first = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state").put_dir(data)
    assert first.nfiles == 3000

    reads: list[str] = []
    original = objects_module._read_small

    def counted(path: str) -> bytes | None:
        reads.append(path)
        return original(path)

    monkeypatch.setattr(objects_module, "_read_small", counted)
    again = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")  # a second process
    assert again.put_dir(data) == first
    assert reads == []
    assert again.hash_path(data) == first.name
    manifest = again.read_manifest(first.name)
    assert len(manifest.entries) == 3000
    assert manifest.entries[5].oid == hash_bytes(b"file 5\n")


def test_a_lost_object_is_written_again_and_reused_ones_are_freshened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _make_tree(data, 300)
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    ref = store.put_dir(data)
    kept, lost = hash_bytes(b"file 1\n"), hash_bytes(b"file 2\n")
    past = time.time() - 7200
    os.utime(store.url_of(kept), (past, past))  # as gc would see an object put long ago
    os.chmod(store.url_of(lost), 0o644)
    os.unlink(store.url_of(lost))

    again = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    assert again.put_dir(data) == ref
    assert again.get_bytes(lost) == b"file 2\n"
    assert os.stat(store.url_of(kept)).st_mtime > time.time() - 60
    assert again.verify() == []


@pytest.mark.parametrize("added", [1, objects_module.SMALL_BATCH + 1])
def test_new_files_are_durable_with_fsync_or_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, added: int,
) -> None:
    """A few new files: fsync each and their folders, no syncfs; many: syncfs."""
    data = tmp_path / "data"
    _make_tree(data, 500)
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    store.put_dir(data)
    for i in range(added):
        (data / "d000" / f"new-{i}.bin").write_bytes(b"new %d" % i)

    calls: list[str] = []
    backend = type(store.backend)
    real_sync, real_fsync = backend.sync, backend.fsync_paths
    monkeypatch.setattr(backend, "sync", lambda self: (calls.append("syncfs"), real_sync(self)))

    def fsync_paths(self: object, paths: object) -> None:
        paths = list(paths)  # type: ignore[call-overload]
        calls.extend(str(p) for p in paths)
        real_fsync(self, paths)

    monkeypatch.setattr(backend, "fsync_paths", fsync_paths)
    again = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    ref = again.put_dir(data)
    assert ref.nfiles == 500 + added
    if added <= objects_module.SMALL_BATCH:
        assert "syncfs" not in calls
        new = again.url_of(hash_bytes(b"new 0"))
        # The temp file was fsynced under its temp name, then its folder after the rename.
        assert any("/tmp/" in c for c in calls)
        assert os.path.dirname(new) in calls
    else:
        assert calls == ["syncfs", "syncfs"]
    for i in range(added):
        assert again.get_bytes(hash_bytes(b"new %d" % i)) == b"new %d" % i


def test_memory_per_file_stays_near_a_sorted_listing(tmp_path: Path) -> None:
    """An unchanged re-put of 5,000 files: Python allocations per file, peak."""
    data = tmp_path / "data"
    _make_tree(data, 5000)
    ObjectStore(tmp_path / "store", state_dir=tmp_path / "state").put_dir(data)
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    tracemalloc.start()
    try:
        store.put_dir(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # ~700 bytes a file: the listing, each file's stat key and cached id, the
    # manifest's entries and its bytes. Before the change: ~1,960 (stat
    # results, three dicts keyed by path, a dict per entry for the JSON).
    assert peak / 5000 < 1000, f"{peak / 5000:.0f} bytes per file"
