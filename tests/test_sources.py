"""Data sources: the sample generator, the folder loader, and folder snapshots (local, S3).

The GitHub source has its own file, ``test_sources_github.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from conftest import s3_options

from uncool_prefect.sources import (
    DEFAULT_LABELS,
    DataError,
    Example,
    load_examples,
    snapshot_folder,
    write_examples,
    write_sample,
    write_sample_day,
)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def day_examples(root: Path, day: int) -> list[Example]:
    return [e for e in load_examples(root) if e.id.startswith(f"d{day:03d}-")]


# --- sample -----------------------------------------------------------------------------------


def test_sample_is_the_same_bytes_every_run_and_differs_by_seed(tmp_path: Path) -> None:
    write_sample(tmp_path / "a", days=3, seed=7)
    write_sample(tmp_path / "b", days=3, seed=7)
    write_sample(tmp_path / "c", days=3, seed=8)
    a, b, c = (tree(tmp_path / name) for name in "abc")
    assert len(a) == 180 and a == b
    assert a != c
    assert set(p.split("/")[0] for p in a) == set(DEFAULT_LABELS)
    text = next(iter(a.values())).decode("utf-8")
    assert text.endswith("\n") and text.count("\n") == 1 and text.strip()


def test_sample_days_accumulate_without_touching_earlier_days(tmp_path: Path) -> None:
    first = write_sample_day(tmp_path, day=1)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first}
    second = write_sample_day(tmp_path, day=2)
    assert len(first) == len(second) == 60
    assert not set(first) & set(second)
    assert all(p.name.startswith("d002-") for p in second)
    again = write_sample_day(tmp_path, day=1)  # same bytes: nothing rewritten
    assert again == first
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first} == before
    assert len(load_examples(tmp_path)) == 120


def test_sample_drift_brings_new_terms(tmp_path: Path) -> None:
    write_sample(tmp_path, days=5)
    words = {day: {w.lower() for e in day_examples(tmp_path, day) for w in e.text.split()}
             for day in (1, 5)}
    assert len(words[5] - words[1]) >= 10


def test_sample_gives_a_realistic_not_perfect_accuracy(tmp_path: Path) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    write_sample(tmp_path, days=4, seed=0)
    train = [e for day in (1, 2, 3) for e in day_examples(tmp_path, day)]
    test = day_examples(tmp_path, 4)
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(max_iter=1000))
    model.fit([e.text for e in train], [e.label for e in train])
    accuracy = model.score([e.text for e in test], [e.label for e in test])
    assert 0.6 < accuracy < 0.98, accuracy


def test_sample_with_other_labels_uses_their_words(tmp_path: Path) -> None:
    write_sample(tmp_path, days=2, labels=["bug", "docs", "data-sync"], per_day=30)
    examples = load_examples(tmp_path, labels=["bug", "docs", "data-sync"])
    assert {e.label for e in examples} == {"bug", "docs", "data-sync"}
    assert sum("docs" in e.text.lower() for e in examples if e.label == "docs") >= 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"day": 0}, "day must be an integer >= 1 (day 1 is the first day of data), got 0"),
        ({"day": 1, "per_day": 0}, "per_day must be an integer from 1 to 9999, got 0"),
        ({"day": 1, "labels": ["plots"]},
         "labels ['plots'] name fewer than two labels; a classifier needs at least two"),
        ({"day": 1, "labels": ["plots", "plots"]}, "labels ['plots', 'plots'] contain duplicates"),
        ({"day": 1, "labels": ["plots", "../x"]}, "label '../x' cannot be used as a file or folder name"),
    ],
)
def test_sample_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError) as caught:
        write_sample_day(tmp_path, **kwargs)
    assert str(caught.value).startswith(message)
    assert not any(tmp_path.iterdir())


# --- folder loader ----------------------------------------------------------------------------


def make_mixed(root: Path) -> None:
    (root / "data-sync").mkdir(parents=True)
    (root / "data-sync" / "10.txt").write_text("  dvc pull fails with S3 remote  \n", encoding="utf-8")
    (root / "plots").mkdir()
    (root / "plots" / "9.txt").write_text("vega template renders empty axis\n", encoding="utf-8")
    (root / "tables" / "deep").mkdir(parents=True)
    (root / "tables" / "a.csv").write_text(
        'id,label,text\nx1,experiments,"exp show hides params, sometimes"\n,plots,"ROC plot"\n',
        encoding="utf-8")
    (root / "tables" / "deep" / "b.jsonl").write_text(
        '{"text": " queued experiments lost ", "label": "experiments", "id": 3}\n\n'
        '{"text": "dvc push is slow", "label": "data-sync"}\n', encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "x.txt").write_text("ignored", encoding="utf-8")
    (root / "README.md").write_text("ignored", encoding="utf-8")


def test_load_examples_reads_label_folders_csv_and_jsonl(tmp_path: Path) -> None:
    make_mixed(tmp_path)
    examples = load_examples(tmp_path, labels=DEFAULT_LABELS)
    assert examples == [
        Example("queued experiments lost", "experiments", "3"),
        Example("vega template renders empty axis", "plots", "9"),
        Example("dvc pull fails with S3 remote", "data-sync", "10"),
        Example("ROC plot", "plots", "tables/a.csv:2"),
        Example("dvc push is slow", "data-sync", "tables/deep/b.jsonl:3"),
        Example("exp show hides params, sometimes", "experiments", "x1"),
    ]
    assert load_examples(tmp_path) == examples  # labels=None accepts what is there


def test_write_examples_round_trips_and_replaces_the_folder(tmp_path: Path) -> None:
    examples = [Example("a title", "plots", "2"), Example("another", "data-sync", "11")]
    (tmp_path / "out" / "plots").mkdir(parents=True)
    (tmp_path / "out" / "plots" / "old.txt").write_text("stale\n")
    write_examples(examples, tmp_path / "out")
    assert load_examples(tmp_path / "out") == examples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left
    with pytest.raises(DataError, match=r"no examples to write to .*; it was left unchanged"):
        write_examples([], tmp_path / "out")
    assert load_examples(tmp_path / "out") == examples


def test_empty_texts_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_examples([Example("a", "plots", "1"), Example("b", "data-sync", "2")], tmp_path)
    (tmp_path / "plots" / "3.txt").write_text("  \n")
    with caplog.at_level(logging.WARNING):
        assert [e.id for e in load_examples(tmp_path)] == ["1", "2"]
    assert "skipped 1 example(s) with empty text" in caplog.text and "plots/3.txt" in caplog.text


def write(root: Path, rel: str, data: bytes | str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


GOOD = {"plots/1.txt": "vega axis", "data-sync/2.txt": "dvc pull"}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"plots/3.txt": b"caf\xe9 plot\n"},
         "plots/3.txt is not valid UTF-8 (bad byte at offset 3); re-save it as UTF-8"),
        ({"bugs/4.txt": "crash"},
         "unknown label 'bugs' in bugs/4.txt; valid labels are ['data-sync', 'experiments', 'plots']"),
        ({"t.csv": "title,label\nx,plots\n"},
         "t.csv lacks the columns ['text']; it needs 'text' and 'label' (optional 'id'), "
         "found ['title', 'label']"),
        ({"t.csv": b""}, "t.csv lacks the columns ['text', 'label']; it needs 'text' and 'label' "
         "(optional 'id'), found []"),
        ({"t.csv": "text,label\na,b,plots\n"},
         "row 1 of t.csv has 3 fields, the header has 2; quote texts that contain commas"),
        ({"t.csv": "text,label\nx,\n"}, "row 1 of t.csv has an empty label"),
        ({"t.jsonl": '{"text": "x", "labels": "plots"}\n'},
         "line 1 of t.jsonl lacks the fields ['label']; it needs 'text' and 'label' (optional 'id'), "
         "found ['text', 'labels']"),
        ({"t.jsonl": "{oops\n"}, "line 1 of t.jsonl is not valid JSON: Expecting property name"),
        ({"t.jsonl": '{"text": "x", "label": "plots", "id": 1}\n'},
         "duplicate id '1': in line 1 of t.jsonl and in plots/1.txt; each example needs a unique id"),
    ],
)
def test_load_examples_errors_name_the_file(tmp_path: Path, files: dict, message: str) -> None:
    for rel, data in {**GOOD, **files}.items():
        write(tmp_path, rel, data)
    with pytest.raises(DataError) as caught:
        load_examples(tmp_path, labels=DEFAULT_LABELS)
    assert str(caught.value).startswith(message), str(caught.value)


def test_load_examples_needs_data_and_two_labels(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset folder .*missing does not exist; run get-data first"):
        load_examples(tmp_path / "missing")
    write(tmp_path, "notes.txt", "not an example")
    with pytest.raises(DataError) as caught:
        load_examples(tmp_path)
    assert str(caught.value) == (
        f"dataset is empty: no examples under {tmp_path}; expected <label>/<id>.txt files, "
        "or .csv/.jsonl files with text and label"
    )
    write(tmp_path, "plots/1.txt", "a")
    write(tmp_path, "plots/2.txt", "b")
    with pytest.raises(DataError) as caught:
        load_examples(tmp_path)
    assert str(caught.value) == (
        f"dataset under {tmp_path} has only one label ('plots', 2 examples); "
        "a classifier needs examples of at least two labels"
    )


# --- snapshots --------------------------------------------------------------------------------


def test_snapshot_of_a_local_folder_is_the_folder_itself(tmp_path: Path) -> None:
    write_sample_day(tmp_path / "data", day=1, per_day=5)
    dest = tmp_path / "dest"
    assert snapshot_folder(str(tmp_path / "data"), dest) == tmp_path / "data"
    assert snapshot_folder(f"file://{tmp_path / 'data'}", dest) == tmp_path / "data"
    assert not dest.exists()
    with pytest.raises(DataError) as caught:
        snapshot_folder(str(tmp_path / "nope"), dest)
    assert str(caught.value) == (
        f"dataset folder {tmp_path / 'nope'} does not exist; check the path or create it first"
    )


def upload(local: Path, fs: object, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{prefix}/{path.relative_to(local).as_posix()}")  # type: ignore[attr-defined]


def test_snapshot_from_s3_copies_then_mirrors(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(s3_endpoint))
    write_sample(tmp_path / "local", days=2, per_day=10)
    upload(tmp_path / "local", fs, f"{s3_bucket}/issues")
    url = f"s3://{s3_bucket}/issues"
    dest = tmp_path / "snap"
    assert snapshot_folder(url, dest, storage_options=s3_options(s3_endpoint)) == dest
    assert tree(dest) == tree(tmp_path / "local")

    gone = next(p for p in fs.find(f"{s3_bucket}/issues") if "d001-" in p)
    fs.rm(gone)
    fs.pipe(f"{s3_bucket}/issues/plots/d003-0001.txt", b"new plot issue\n")
    snapshot_folder(url, dest, storage_options=s3_options(s3_endpoint))
    assert "plots/d003-0001.txt" in tree(dest)
    assert gone.split("/issues/")[1] not in tree(dest)
    # No temp folder is left behind; the listing beside the copy is kept.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snap.listing.json", "local", "snap"]


def test_snapshot_from_s3_fetches_only_what_changed(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(s3_endpoint))
    write_sample(tmp_path / "local", days=1, per_day=10)
    upload(tmp_path / "local", fs, f"{s3_bucket}/issues")
    url, dest, options = f"s3://{s3_bucket}/issues", tmp_path / "snap", s3_options(s3_endpoint)

    def snapshot() -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="uncool_prefect.sources.folder"):
            snapshot_folder(url, dest, storage_options=options)
        return next(r.getMessage() for r in caplog.records if "snapshot of" in r.getMessage())

    assert "10 file(s) copied, 0 unchanged kept" in snapshot()
    first = sorted(fs.find(f"{s3_bucket}/issues"))[0]
    rel = first.split("/issues/")[1]
    fs.pipe(f"{s3_bucket}/issues/plots/d002-0001.txt", b"a new plot issue\n")
    assert "1 file(s) copied, 10 unchanged kept" in snapshot()

    # Same size, other bytes: the ETag says so, and the new bytes are fetched.
    same_size = bytes(reversed(fs.cat(first)))
    fs.pipe(first, same_size)
    assert "1 file(s) copied, 10 unchanged kept" in snapshot()
    assert (dest / rel).read_bytes() == same_size

    # A local copy edited by hand is not trusted: fetched again, whatever its size.
    for edit in (b"edited\n", bytes(reversed(same_size))):
        (dest / rel).write_bytes(edit)
        assert "1 file(s) copied, 10 unchanged kept" in snapshot()
        assert (dest / rel).read_bytes() == same_size
    assert tree(dest) == {p.split("/issues/")[1]: fs.cat(p) for p in fs.find(f"{s3_bucket}/issues")}


def test_snapshot_from_s3_errors_name_the_url(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    with pytest.raises(DataError) as caught:
        snapshot_folder(f"s3://{s3_bucket}/nothing", tmp_path / "d", storage_options=s3_options(s3_endpoint))
    assert str(caught.value) == (
        f"no folder at s3://{s3_bucket}/nothing: the bucket or prefix does not exist or is empty; "
        "check the URL, or upload the data there first"
    )
    assert not (tmp_path / "d").exists()

    closed = {**s3_options("http://127.0.0.1:9"), "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(DataError) as caught:
        snapshot_folder("s3://bucket/data", tmp_path / "d", storage_options=closed)
    assert str(caught.value).startswith(
        "cannot reach s3://bucket/data (endpoint http://127.0.0.1:9): Could not connect"
    )
    assert "testing" not in str(caught.value)  # the credentials are not echoed
    assert sorted(os.listdir(tmp_path)) == []


def test_sources_do_not_import_prefect() -> None:
    import subprocess
    import sys

    code = ("import sys, uncool_prefect.sources\n"
            "print(sorted(m for m in sys.modules if m.startswith('prefect')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
