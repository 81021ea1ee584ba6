"""One behaviour, every backend: the same tests on a local folder and on S3 (moto)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from uncool_prefect.store import (
    CorruptObjectError,
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectRef,
    ObjectStore,
    StoreError,
)


def _objects(store: ObjectStore) -> list[str]:
    return sorted(info.name for info in store.ls())


def test_put_bytes_names_object_by_sha256_in_fanout_layout(store: ObjectStore) -> None:
    ref = store.put_bytes(b"hello world")
    expected = hashlib.sha256(b"hello world").hexdigest()
    assert (ref.oid, ref.size) == (expected, 11)
    assert store.url_of(ref.oid).endswith(f"objects/sha256/{expected[:2]}/{expected[2:]}")
    assert store.get_bytes(ref.oid) == b"hello world"
    assert store.has(ref.oid)


def test_blake3_is_selectable(tmp_path: Path) -> None:
    from blake3 import blake3

    store = ObjectStore(tmp_path / "s", algorithm="blake3", state_dir=tmp_path / "st")
    ref = store.put_bytes(b"abc")
    assert ref.oid == blake3(b"abc").hexdigest()
    assert "/objects/blake3/" in store.url_of(ref.oid)
    assert store.get_bytes(ref.oid) == b"abc"


def test_same_content_is_stored_once(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "a.bin"
    source.write_bytes(os.urandom(300_000))
    copy = tmp_path / "b.bin"
    copy.write_bytes(source.read_bytes())
    first = store.put_file(source)
    second = store.put_file(copy)
    third = store.put_bytes(source.read_bytes())
    assert first.oid == second.oid == third.oid
    assert _objects(store) == [first.oid]


def test_put_file_and_get_file_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    payload = os.urandom(3 * (1 << 20) + 17)  # crosses chunk boundaries
    source.write_bytes(payload)
    ref = store.put_file(source)
    assert ref.size == len(payload)
    out = store.get_file(ref.oid, tmp_path / "out" / "model.bin")
    assert out.read_bytes() == payload


def test_open_streams_verified_bytes(store: ObjectStore) -> None:
    payload = os.urandom(2 * (1 << 20) + 5)
    ref = store.put_bytes(payload)
    with store.open(ref.oid) as stream:
        head = stream.read(10)
        rest = stream.read()
    assert head + rest == payload


def test_put_dir_manifest_and_get_dir(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "data"
    (src / "plots").mkdir(parents=True)
    (src / "data-sync").mkdir()
    (src / "plots" / "1.txt").write_text("vega axis is wrong")
    (src / "data-sync" / "2.txt").write_text("dvc pull fails")
    (src / "data-sync" / "3 copy é.txt").write_text("dvc pull fails")  # duplicate content
    ref = store.put_dir(src)
    assert ref.is_dir and ref.name.endswith(".dir") and ref.nfiles == 3
    manifest = store.read_manifest(ref.name)
    assert [e.path for e in manifest.entries] == [
        "data-sync/2.txt", "data-sync/3 copy é.txt", "plots/1.txt"
    ]
    assert manifest.entries[0].oid == manifest.entries[1].oid
    # 2 distinct files + the manifest
    assert len(_objects(store)) == 3
    out = store.get_dir(ref.name, tmp_path / "restored")
    assert (out / "data-sync" / "3 copy é.txt").read_text() == "dvc pull fails"
    assert (out / "plots" / "1.txt").read_text() == "vega axis is wrong"


def test_dir_hash_is_stable_and_changes_with_content(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "d"
    src.mkdir()
    (src / "a").write_text("1")
    first = store.put_dir(src)
    assert store.put_dir(src).oid == first.oid
    (src / "b").write_text("2")
    assert store.put_dir(src).oid != first.oid


def test_get_dir_refuses_a_non_empty_destination(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "d"
    src.mkdir()
    (src / "a").write_text("1")
    ref = store.put_dir(src)
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an empty folder"):
        store.get_dir(ref.name, dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_missing_object_is_a_file_not_found_error(store: ObjectStore) -> None:
    oid = "0" * 64
    assert not store.has(oid)
    with pytest.raises(ObjectNotFoundError) as info:
        store.get_bytes(oid)
    assert isinstance(info.value, FileNotFoundError)
    assert oid in str(info.value)


@pytest.mark.parametrize("bad", ["", "xyz", "0" * 63, "../" + "0" * 64, "0" * 64 + "/x"])
def test_malformed_object_ids_are_rejected(store: ObjectStore, bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.get_bytes(bad)


def test_refs_point_at_objects(store: ObjectStore) -> None:
    ref = store.put_bytes(b"result")
    store.set_ref("task/abc", ref, task_name="train")
    document = store.get_ref("task/abc")
    assert document["oid"] == ref.oid and document["task_name"] == "train"
    assert [key for key, _ in store.iter_refs()] == ["task/abc"]


def test_du_counts_dedup(store: ObjectStore) -> None:
    ref = store.put_bytes(b"x" * 1000)
    store.set_ref("a", ref)
    store.set_ref("b", ref)
    usage = store.du()
    assert (usage.objects, usage.refs, usage.stored_bytes, usage.logical_bytes) == (1, 2, 1000, 2000)
    assert usage.dedup_ratio == pytest.approx(2.0)


def _corrupt(store: ObjectStore, oid: str, data: bytes) -> None:
    backend = store.backend
    rel = store.url_of(oid)
    if hasattr(backend, "make_writable"):
        Path(rel).chmod(0o644)
        Path(rel).write_bytes(data)
    else:
        backend.fs.pipe_file(rel.replace("s3://", ""), data)


def test_flipped_byte_is_never_returned(store: ObjectStore, tmp_path: Path) -> None:
    payload = b"a" * 5000

    def put_and_flip() -> str:
        ref = store.put_bytes(payload)
        _corrupt(store, ref.oid, b"a" * 4999 + b"b")
        return ref.oid

    oid = put_and_flip()
    with pytest.raises(CorruptObjectError) as info:
        store.get_bytes(oid)
    message = str(info.value)
    assert oid in message and info.value.actual in message and "objects/sha256" in message

    oid = put_and_flip()
    dest = tmp_path / "out" / "model.bin"
    with pytest.raises(CorruptObjectError):
        store.get_file(oid, dest)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temp

    oid = put_and_flip()
    received = b""
    with pytest.raises(CorruptObjectError), store.open(oid) as stream:
        while chunk := stream.read(1000):
            received += chunk
    assert b"b" not in received  # the flipped byte sits in the last chunk: withheld


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_verify_first_hands_over_no_byte_of_a_damaged_object(store: ObjectStore, damage: str) -> None:
    """The mode `uncool store cat` uses: the error comes before the first byte, not after most."""
    payload = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB: several chunks
    ref = store.put_bytes(payload)
    _corrupt(store, ref.oid, b"X" + payload[1:] if damage == "flipped" else payload[: len(payload) // 3])
    with pytest.raises(CorruptObjectError, match=ref.oid):
        store.open(ref.oid, verify_first=True)
    good = store.put_bytes(payload)  # healed: the damaged copy was moved aside
    with store.open(good.oid, verify_first=True) as stream:
        assert stream.read() == payload


def test_verify_lists_flipped_and_truncated_objects(store: ObjectStore) -> None:
    good = store.put_bytes(b"good" * 100)
    flipped = store.put_bytes(b"flip" * 100)
    truncated = store.put_bytes(b"trunc" * 100)
    _corrupt(store, flipped.oid, b"flip" * 99 + b"FLIP")
    _corrupt(store, truncated.oid, b"trunc" * 50)
    problems = {p.name: p for p in store.verify()}
    assert set(problems) == {flipped.oid, truncated.oid}
    assert all(p.kind == "corrupt" for p in problems.values())
    assert store.get_bytes(good.oid) == b"good" * 100


def test_a_corrupt_object_is_moved_aside_and_healed_by_the_next_put(store: ObjectStore) -> None:
    ref = store.put_bytes(b"precious")
    _corrupt(store, ref.oid, b"garbage!")
    with pytest.raises(CorruptObjectError, match="moved aside") as info:
        store.get_bytes(ref.oid)
    assert info.value.moved_to is not None and "/tmp/corrupt-" in info.value.moved_to
    assert not store.has(ref.oid)  # a cache miss now, instead of an error forever
    store.put_bytes(b"precious")
    assert store.get_bytes(ref.oid) == b"precious"


def test_gc_removes_only_unreachable_objects_past_grace(store: ObjectStore, tmp_path: Path) -> None:
    kept_by_ref = store.put_bytes(b"ref")
    store.set_ref("r", kept_by_ref)
    src = tmp_path / "d"
    src.mkdir()
    (src / "f").write_text("in a kept dir")
    kept_dir = store.put_dir(src)
    kept_by_run = store.put_bytes(b"run")
    store.backend.write_bytes(
        "runs/run-1.json", f'{{"outputs": {{"model": "{kept_by_run.oid}"}}}}'.encode()
    )
    explicit = store.put_bytes(b"keep me")
    garbage = store.put_bytes(b"garbage")
    assert store.gc(grace=3600).removed == []  # everything is younger than the grace
    grace = _age(store, [kept_by_ref.oid, kept_by_run.oid, explicit.oid, garbage.oid])
    young = store.put_bytes(b"young")
    report = store.gc(grace=grace, keep=[explicit.oid, kept_dir.name])
    assert report.removed == [garbage.oid]
    assert not store.has(garbage.oid)
    assert all(store.has(o.name) for o in (kept_by_ref, kept_by_run, explicit, kept_dir, young))
    assert (src / "f").read_text() == "in a kept dir"


def test_gc_dry_run_deletes_nothing(store: ObjectStore) -> None:
    garbage = store.put_bytes(b"garbage")
    report = store.gc(grace=0, dry_run=True)
    assert report.removed == [garbage.oid]
    assert store.has(garbage.oid)


def _age(store: ObjectStore, names: list[str]) -> float:
    """Make objects older than the grace period returned."""
    import time

    if hasattr(store.backend, "make_writable"):
        past = time.time() - 7200
        for name in names:
            os.utime(store.url_of(name), (past, past))
        return 60.0
    # S3 LastModified cannot be set (and has 1 s resolution): wait past a short grace.
    time.sleep(2.5)
    return 1.5


def test_hash_path_predicts_the_put_without_storing(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("alpha")
    (src / "b.txt").write_text("beta")
    predicted_dir = store.hash_path(src)
    predicted_file = store.hash_path(src / "b.txt")
    assert _objects(store) == []
    assert store.put_dir(src).name == predicted_dir
    assert store.put_file(src / "b.txt").oid == predicted_file


def test_gc_warns_of_a_missing_object_only_if_it_is_still_missing(
        store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc lists objects before it reads refs: a writer's new object in between is no dangling ref."""
    listing = list(store.ls())  # the listing gc takes first ...
    fresh = store.put_bytes(b"written by a writer during gc")
    store.set_ref("results/fresh", fresh)  # ... then the writer's object and its ref appear
    store.set_ref("results/lost", ObjectRef(oid="0" * 64, size=1, algorithm=store.algorithm))
    monkeypatch.setattr(store, "ls", lambda: iter(listing))
    report = store.gc(grace=3600)
    assert report.dangling == ["0" * 64]  # the one really missing, and only it
    assert store.has(fresh.oid)


def test_verify_repair_moves_damage_aside_so_a_put_heals_it(store: ObjectStore) -> None:
    payload = b"weights" * 300
    ref = store.put_bytes(payload)
    _corrupt(store, ref.oid, b"weightz" * 300)
    assert [p.kind for p in store.verify()] == ["corrupt"]
    store.put_bytes(payload)  # without repair the damaged copy is "there": the put skips it
    assert [p.kind for p in store.verify()] == ["corrupt"]

    repaired = store.verify(repair=True)
    assert [p.kind for p in repaired] == ["corrupt"] and "moved aside" in repaired[0].detail
    assert [(p.kind, p.name) for p in store.verify()] == [("quarantined", ref.oid)]
    store.put_bytes(payload)  # the original data again: healed
    assert store.verify() == []
    assert store.get_bytes(ref.oid) == payload


def test_verify_lists_malformed_manifests_and_dangling_refs_and_goes_on(store: ObjectStore) -> None:
    good = store.put_bytes(b"fine")
    broken = store.put_bytes(b'{"not": "a manifest"}', is_dir=True)  # hashes right, is not one
    store.set_ref("results/lost", ObjectRef(oid="1" * 64, size=3, algorithm=store.algorithm))
    problems = {(p.kind, p.name) for p in store.verify()}
    assert problems == {("malformed", broken.name), ("dangling", "1" * 64)}
    assert store.get_bytes(good.oid) == b"fine"
