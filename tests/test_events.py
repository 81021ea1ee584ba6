"""The dataset watcher on its own: what it announces, when, and what it never announces twice.

The events go to a list here; tests/test_automation.py sends them to a real
Prefect server that starts a real deployment.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import s3_options

from uncool_prefect.events import DatasetWatcher, WatchError, content_key, is_dataset_file
from uncool_prefect.sources import write_sample_day
from uncool_prefect.store import ObjectStore


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, name: str, payload: dict[str, Any]) -> str:
        self.events.append({"name": name, **payload})
        return f"event-{len(self.events)}"


@pytest.fixture
def local(tmp_path: Path) -> tuple[Path, ObjectStore, Recorder]:
    data = tmp_path / "issues"
    write_sample_day(data, 1, per_day=12)
    return data, ObjectStore(tmp_path / "store", state_dir=tmp_path / "state"), Recorder()


def test_first_check_announces_the_dataset_as_stored(local: tuple[Path, ObjectStore, Recorder]) -> None:
    data, store, events = local
    result = DatasetWatcher(str(data), "issues", store, emit=events).check()
    assert result.emitted
    (event,) = events.events
    assert event["dataset"] == store.hash_path(data) == result.dataset
    assert store.has(event["dataset"])  # the pipeline can read exactly this snapshot
    assert event["files"] == 12 and event["added_count"] == 12 and event["removed"] == []
    assert event["name"] == "issues" and event["url"] == str(data)


def test_same_content_is_never_announced_twice(local: tuple[Path, ObjectStore, Recorder],
                                               tmp_path: Path) -> None:
    data, store, events = local
    DatasetWatcher(str(data), "issues", store, emit=events).check()
    # A restart (a new watcher on the same store) re-reads the folder: nothing new.
    restarted = DatasetWatcher(str(data), "issues", store, emit=events)
    assert not restarted.check().emitted
    # A copy of a file under a new name in the same label folder is not new data.
    some = sorted((data / "plots").glob("*.txt"))[0]
    shutil.copy(some, some.with_name("copy-of-" + some.name))
    result = restarted.check()
    assert not result.emitted and result.reason == "same content as the last announcement"
    # Touching a file changes nothing either.
    some.touch()
    assert not restarted.check().emitted
    assert len(events.events) == 1


def test_new_files_are_announced_with_what_changed(local: tuple[Path, ObjectStore, Recorder]) -> None:
    data, store, events = local
    watcher = DatasetWatcher(str(data), "issues", store, emit=events)
    watcher.check()
    day2 = write_sample_day(data, 2, per_day=5)
    gone = sorted((data / "plots").glob("*.txt"))[0]
    gone.unlink()
    result = watcher.check()
    assert result.emitted
    event = events.events[-1]
    assert event["added"] == sorted(p.relative_to(data).as_posix() for p in day2)
    assert event["removed"] == [gone.relative_to(data).as_posix()]
    assert event["previous"] == events.events[0]["dataset"]
    assert event["dataset"] == store.hash_path(data)


def test_moving_a_file_to_another_label_is_new_data(local: tuple[Path, ObjectStore, Recorder]) -> None:
    data, store, events = local
    watcher = DatasetWatcher(str(data), "issues", store, emit=events)
    watcher.check()
    first = watcher.last_announced()
    assert first is not None
    moved = sorted((data / "plots").glob("*.txt"))[0]
    moved.rename(data / "experiments" / moved.name)
    assert watcher.check().emitted
    assert content_key(store, events.events[-1]["dataset"]) != first["content"]


def test_temporary_and_hidden_files_are_not_data(local: tuple[Path, ObjectStore, Recorder]) -> None:
    data, store, events = local
    watcher = DatasetWatcher(str(data), "issues", store, emit=events)
    watcher.check()
    (data / "plots" / "123.txt.part").write_text("half a tit")
    (data / "plots" / ".~lock.124.txt#").write_text("x")
    (data / ".staging").mkdir()
    (data / ".staging" / "125.txt").write_text("soon")
    assert not watcher.check().emitted
    assert not is_dataset_file("plots/123.txt.part") and is_dataset_file("plots/123.txt")


def test_a_file_written_while_the_folder_is_read_means_wait(
        local: tuple[Path, ObjectStore, Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    data, store, events = local
    watcher = DatasetWatcher(str(data), "issues", store, emit=events)
    real_put_dir = store.put_dir

    def put_dir_while_a_writer_appends(*args: Any, **kwargs: Any) -> Any:
        ref = real_put_dir(*args, **kwargs)
        with open(data / "plots" / "late.txt", "a") as late:
            late.write("a title still being written\n")
        return ref

    monkeypatch.setattr(store, "put_dir", put_dir_while_a_writer_appends)
    result = watcher.check()
    assert result.retry and not result.emitted and events.events == []
    monkeypatch.setattr(store, "put_dir", real_put_dir)
    settled = watcher.check()  # the next quiet window: the whole file is read
    assert settled.emitted and "plots/late.txt" in events.events[0]["added"]


def test_empty_folder_announces_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    events = Recorder()
    result = DatasetWatcher(str(tmp_path / "empty"), "issues", ObjectStore(tmp_path / "s"),
                            emit=events).check()
    assert not result.emitted and "no data files" in result.reason and events.events == []


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s")
    with pytest.raises(WatchError, match="no such folder"):
        DatasetWatcher(str(tmp_path / "missing"), "issues", store)
    with pytest.raises(WatchError, match="dataset name"):
        DatasetWatcher(str(tmp_path), "has space", store)


def test_the_loop_waits_for_quiet_then_announces_once(local: tuple[Path, ObjectStore, Recorder]) -> None:
    """Files arriving in a burst give one announcement, after the burst."""
    data, store, events = local
    watcher = DatasetWatcher(str(data), "issues", store, emit=events, debounce=0.3)
    stop = threading.Event()
    results: list[Any] = []
    thread = threading.Thread(target=watcher.run, args=(stop, results.append), daemon=True)
    thread.start()
    try:
        _wait_for(lambda: len(events.events) == 1)  # what was there at the start
        for day in (2, 3):  # two days, written 0.1 s apart: one quiet window after both
            write_sample_day(data, day, per_day=4)
            time.sleep(0.1)
        _wait_for(lambda: len(events.events) == 2)
        time.sleep(1.0)
        assert len(events.events) == 2
        assert events.events[1]["added_count"] == 8
        assert events.events[1]["dataset"] == store.hash_path(data)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_s3_prefix_is_polled_and_announced_once(s3_endpoint: str, s3_bucket: str,
                                                tmp_path: Path) -> None:
    import fsspec

    options = s3_options(s3_endpoint)
    fs = fsspec.filesystem("s3", **options)
    local = tmp_path / "issues"
    write_sample_day(local, 1, per_day=6)
    fs.put(str(local) + "/", f"{s3_bucket}/issues/", recursive=True)
    events = Recorder()
    store = ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    url = f"s3://{s3_bucket}/issues"
    watcher = DatasetWatcher(url, "issues", store, emit=events, storage_options=options,
                             debounce=0.2, poll_interval=0.2)
    assert watcher.check().emitted
    assert events.events[0]["dataset"] == store.hash_path(local)
    assert not watcher.check().emitted  # listing unchanged: no download, no event
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        write_sample_day(local, 2, per_day=3)
        fs.put(str(local) + "/", f"{s3_bucket}/issues/", recursive=True)
        _wait_for(lambda: len(events.events) == 2)
        assert events.events[1]["added_count"] == 3
        assert events.events[1]["dataset"] == store.hash_path(local)
    finally:
        stop.set()
        thread.join(timeout=10)


def _wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
