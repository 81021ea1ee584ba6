"""`uncool exp show` and `uncool diff` over three real pipeline runs, and over many records on S3.

Run 1 uses the defaults, run 2 sets ``train.C=0.5``, run 3 adds a day of data.
The runs go through `uncool run` against the test Prefect server; the
comparisons are then made in-process from the run records they wrote. The S3
tests write records shaped like those into a bucket on moto.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from project import Project

from uncool_prefect.records import exp_table, experiments, reading
from uncool_prefect.records.targets import TargetError, resolve_target
from uncool_prefect.sources import write_sample, write_sample_day
from uncool_prefect.store import ObjectStore

pytestmark = [pytest.mark.slow]



@dataclass
class Runs:
    """Three finished runs in one isolated UNCOOL_HOME."""

    home: Path
    ids: list[str]

    @property
    def store(self) -> ObjectStore:
        return ObjectStore(self.home / "store")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Runs:
    project = Project(tmp_path_factory.mktemp("experiments"), "test-experiments")
    write_sample(project.data, days=2, seed=3)
    ids = [project.run_flow()[1], project.run_flow("train.C=0.5")[1]]
    write_sample_day(project.data, 3, seed=3)
    ids.append(project.run_flow()[1])
    home = project.home
    return Runs(home=home, ids=ids)


@pytest.fixture
def settings_env(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The environment the `uncool` command would see for this project."""
    monkeypatch.setenv("UNCOOL_HOME", str(runs.home))
    monkeypatch.setenv("UNCOOL_STORE", str(runs.home / "store"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield


def test_exp_show_lists_each_run_with_what_differs_from_the_first(runs: Runs) -> None:
    table = experiments.exp_rows(runs.store, runs.home)
    rows = {row.run_id: row for row in table.rows}
    assert [row.run_id for row in table.rows] == runs.ids  # oldest first
    first, second, third = (rows[i] for i in runs.ids)
    assert table.baseline == first.run_id
    assert table.config_keys == ["train.C"]
    assert first.config == {} and second.config == {"train.C": 0.5} and third.config == {}
    assert first.data == second.data != third.data
    for row in table.rows:
        assert {"accuracy", "macro_f1"} <= set(row.metrics)
        assert 0 < row.metrics["macro_f1"] <= 1
        assert row.flow == "train-evaluate-deploy" and row.trigger == "user"
        assert row.model_version is not None
    assert sum(row.champion for row in table.rows) == 1
    champion = resolve_target(runs.store, "champion", runs.home)
    assert rows[champion["flow_run_id"]].champion
    assert first.model_version == "1"

    rendered = exp_table.render_table(table)
    assert [c.header for c in rendered.columns][5] == "train.C"
    assert _text(exp_table.render_table_fast(table)) == _text(rendered)
    document = json.loads(experiments.to_json(table))
    assert [r["run_id"] for r in document["rows"]] == runs.ids
    assert document["rows"][0]["baseline"] is True


def test_exp_show_sorts_filters_and_takes_a_baseline(runs: Runs) -> None:
    ranked = experiments.exp_rows(runs.store, runs.home, sort="macro_f1").rows
    scores = [row.metrics["macro_f1"] for row in ranked]
    assert scores == sorted(scores, reverse=True)
    by_c = experiments.exp_rows(runs.store, runs.home, sort="train.C").rows
    assert by_c[0].run_id == runs.ids[1]  # the only row with a value comes first

    against_second = experiments.exp_rows(runs.store, runs.home, baseline=runs.ids[1])
    assert {r.run_id: r.config for r in against_second.rows} == {
        runs.ids[0]: {"train.C": 4.0}, runs.ids[1]: {}, runs.ids[2]: {"train.C": 4.0}}

    assert experiments.exp_rows(runs.store, runs.home, flow="other-flow").rows == []
    assert len(experiments.exp_rows(runs.store, runs.home, since=experiments.parse_since("1d")).rows) == 3
    assert experiments.exp_rows(runs.store, runs.home, since=experiments.parse_since("2999-01-01")).rows == []

    with pytest.raises(LookupError, match=r"cannot sort by 'nope'; columns: run, started, "):
        experiments.exp_rows(runs.store, runs.home, sort="nope")
    with pytest.raises(LookupError, match=r"cannot read --since 'yesterday'"):
        experiments.parse_since("yesterday")


def test_diff_of_a_config_change_and_of_a_data_change(runs: Runs) -> None:
    first, second, third = runs.ids
    change = experiments.diff_runs(runs.store, runs.home, first, second)
    assert change.config == {"train.C": (4.0, 0.5)}
    assert not change.data_changed
    # NOTE: not code_changed: the snapshot covers the whole working tree, which
    # may be edited while the runs go.
    assert change.code_changed == (change.code_old != change.code_new)
    old, new, delta = change.metrics["macro_f1"]
    assert old is not None and new is not None and delta == pytest.approx(new - old)
    assert change.model_old == "1" and change.model_new == "2"
    document = json.loads(experiments.diff_to_json(change))
    assert document["config"] == {"train.C": {"old": 4.0, "new": 0.5}}
    assert document["data"]["changed"] is False

    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(experiments.render_diff(change))
    text = console.export_text()
    assert re.search(r"train\.C\s+│\s+4\.0\s+│\s+0\.5", text), text
    assert "data unchanged" in text and "macro_f1" in text
    assert ("code changed" if change.code_changed else "code unchanged") in text

    grown = experiments.diff_runs(runs.store, runs.home, first, third)
    assert grown.config == {} and grown.data_changed
    console = Console(record=True, width=200)
    console.print(experiments.render_diff(grown))
    assert "data changed: " in console.export_text()

    champion = experiments.diff_runs(runs.store, runs.home, first, "champion")
    assert champion.b in runs.ids
    by_prefix = experiments.diff_runs(runs.store, runs.home, first[:8], second[:8])
    assert (by_prefix.a, by_prefix.b) == (first, second)


def test_an_unknown_target_is_a_clear_error(runs: Runs) -> None:
    store = runs.store
    with pytest.raises(TargetError, match=re.escape(
            f"'no-such-run' is neither a run in {store.url} nor an object id, "
            "'champion' or models:/NAME/VERSION")):
        experiments.diff_runs(store, runs.home, runs.ids[0], "no-such-run")
    with pytest.raises(TargetError, match=r"models:/issue-labeler/99 is not in the MLflow registry"):
        experiments.exp_rows(store, runs.home, baseline="models:/issue-labeler/99")


@pytest.mark.usefixtures("settings_env")
def test_the_cli_commands(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    from uncool_prefect.cli.experiments import exp_app

    exp_app(["show", "--json", "--sort", "macro_f1"], result_action="return_value")
    document = json.loads(capsys.readouterr().out)
    assert sorted(r["run_id"] for r in document["rows"]) == sorted(runs.ids)

    exp_app(["show", "--basepath", str(runs.home / "store")], result_action="return_value")
    shown = capsys.readouterr().out
    assert "train.C" in shown and "champion" in shown and runs.ids[1][:8] in shown

    exp_app(["diff", runs.ids[0][:8], runs.ids[1]], result_action="return_value")
    shown = capsys.readouterr().out
    assert "train.C" in shown and "data unchanged" in shown

    exp_app(["diff", runs.ids[0], runs.ids[2], "--json"], result_action="return_value")
    assert json.loads(capsys.readouterr().out)["data"]["changed"] is True


def test_an_empty_store_and_a_home_without_mlflow(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    table = experiments.exp_rows(store, tmp_path)
    assert table.rows == [] and table.baseline == ""
    record = {"flow_run_id": "x", "mlflow": {"model_name": "issue-labeler", "model_version": "1"}}
    assert experiments.champion_run_ids([record], tmp_path) == set()
    assert not (tmp_path / "mlflow.db").exists()  # looking does not create a tracking store


def _text(renderable: object, width: int = 400) -> str:
    from rich.console import Console

    console = Console(record=True, width=width, force_terminal=True, color_system="standard")
    console.print(renderable)
    return console.export_text(styles=True)


def test_the_column_layout_prints_what_the_row_layout_prints(tmp_path: Path) -> None:
    """Same text and colors, markup-like values printed as they are."""
    store = ObjectStore(tmp_path / "store")
    for i, record in enumerate(_records(5)):
        record["params"]["train"]["note"] = ["[bold]x[/bold]", ":smile:", "wide " * i]
        store.put_run_record(record["flow_run_id"], record)
    table = experiments.exp_rows(store, tmp_path)
    by_rows = _text(exp_table.render_table(table))
    fast = exp_table.render_table_fast(table)
    assert isinstance(fast, exp_table.OneLineTable)
    assert _text(fast) == by_rows
    assert "[bold]x[/bold]" in by_rows and ":smile:" in by_rows


def _row(i: int, **changes: object) -> experiments.ExpRow:
    row = experiments.ExpRow(
        run_id=str(uuid.UUID(int=(i + 1) << 96)), started=1_767_225_600 + 60 * i,
        flow="train-evaluate-deploy", trigger="user", data=f"{i:064x}.dir", config={},
        metrics={"accuracy": 0.5 + i / 100, "macro_f1": 0.25 + i / 100},
        model_name="issue-labeler", model_version=str(i + 1))
    for name, value in changes.items():
        setattr(row, name, value)
    return row


def _mixed_table() -> experiments.ExpTable:
    """A baseline, a champion, empty cells, wide characters and right-justified metrics."""
    rows = [
        _row(0),
        _row(1, config={"train.C": 0.5, "train.label": "漢字漢字 and 😀😀"}, champion=True),
        _row(2, config={"train.note": "  padded  "}, metrics={"accuracy": 0.75}),
        _row(3, config={"train.C": [1, 2]}, metrics={}, model_version=None),
        _row(4, config={"train.note": "[red]not markup[/red] :smile:"}, model_version="12  "),
    ]
    return experiments.ExpTable(baseline=rows[0].run_id,
                                config_keys=["train.C", "train.label", "train.note"],
                                metric_names=["accuracy", "macro_f1"], rows=rows)


def test_the_one_pass_layout_prints_what_rich_prints_styles_included() -> None:
    table = _mixed_table()
    fast = exp_table.render_table_fast(table)
    assert isinstance(fast, exp_table.OneLineTable)  # not the fallback: the fast path is compared
    by_rows = _text(exp_table.render_table(table))
    assert _text(fast) == by_rows
    lines = by_rows.splitlines()
    assert "experiments" in lines[0] and "baseline: 00000001; times in UTC" in lines[-1]
    assert "00000001 (base)" in lines[4]
    assert "漢字漢字 and 😀😀" in lines[5] and "champion" in lines[5]
    assert "\x1b[36m  0.7500\x1b[0m" in lines[6]  # cyan, right-justified; macro_f1 empty
    assert "[red]not markup[/red] :smile:" in lines[8]
    assert " v12 │" in lines[8]  # right-justified as rich does: trailing spaces dropped


def test_the_one_pass_layout_measures_and_wraps_as_rich_does() -> None:
    from rich.console import Console

    table = _mixed_table()
    natural = Console(width=1000).measure(exp_table.render_table(table))
    for width in (1000, natural.maximum, natural.maximum - 1, natural.maximum - 10, 80):
        console = Console(width=width)
        fast, by_rows = exp_table.render_table_fast(table), exp_table.render_table(table)
        assert console.measure(fast) == console.measure(by_rows), width
        # NOTE: narrower than the table, rich wraps cells: the one-pass layout hands over.
        assert _text(fast, width) == _text(by_rows, width), width
    wrapped = _text(exp_table.render_table_fast(table), natural.maximum - 10)
    assert len(wrapped.splitlines()) > len(_text(exp_table.render_table_fast(table)).splitlines())


def test_no_rows_and_cells_of_several_lines_print_as_rich_does() -> None:
    from rich.console import Console

    empty = experiments.ExpTable(baseline="", config_keys=["train.tags by team"],
                                 metric_names=["f1"], rows=[])
    assert isinstance(exp_table.render_table_fast(empty), exp_table.OneLineTable)
    assert _text(exp_table.render_table_fast(empty)) == _text(exp_table.render_table(empty))
    assert (Console(width=200).measure(exp_table.render_table_fast(empty))
            == Console(width=200).measure(exp_table.render_table(empty)))

    table = _mixed_table()
    table.rows[1].config["train.note"] = "two\nlines\tand a tab"
    fast = exp_table.render_table_fast(table)
    assert not isinstance(fast, exp_table.OneLineTable)
    assert _text(fast) == _text(exp_table.render_table(table))


def test_the_one_pass_layout_refuses_what_it_does_not_lay_out() -> None:
    from rich.table import Table

    frame = Table(show_lines=True)
    frame.add_column("a", justify="full")
    with pytest.raises(ValueError, match=r"does not lay out: show_lines, justify other than left"):
        exp_table.OneLineTable(frame, [["x"]])
    with pytest.raises(ValueError, match="every cell must be one line of plain text"):
        exp_table.OneLineTable(Table("a"), [["x\ny"]])


def _records(n: int) -> list[dict[str, object]]:
    """Run records shaped like the example's (the fields exp show reads), one a minute."""
    start = time.time() - 3600 * 24
    return [{
        "version": 2, "flow_run_id": str(uuid.UUID(int=(i + 1) << 96)), "flow_name": "train-evaluate-deploy",
        "started": start + 60 * i, "state": "Completed", "trigger": {"kind": "user"},
        "params": {"train": {"C": 4.0 if i % 3 else 0.5, "classifier": "ridge"}},
        "data": f"{i // 10:064x}.dir",
        "models": [{"name": "issue-labeler", "version": str(i + 1),
                    "metrics": {"accuracy": 0.5 + i / 200, "macro_f1": 0.4 + i / 200}}],
        "mlflow": {"model_name": "issue-labeler", "model_version": str(i + 1)},
    } for i in range(n)]


def _s3_store(url: str, endpoint: str, state: Path) -> ObjectStore:
    from conftest import s3_options

    return ObjectStore(url, storage_options=s3_options(endpoint), state_dir=state)


def test_exp_show_over_many_records_on_s3(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """One listing, parallel reads: every record, in order, with its config change and metrics."""
    url = f"s3://{s3_bucket}/store"
    store = _s3_store(url, s3_endpoint, tmp_path / "state")
    records = _records(50)
    for record in reversed(records):  # written newest first: the order shown is by start
        store.put_run_record(str(record["flow_run_id"]), record)

    table = experiments.exp_rows(store, tmp_path)
    assert [row.run_id for row in table.rows] == [r["flow_run_id"] for r in records]
    assert table.baseline == records[0]["flow_run_id"]
    assert table.config_keys == ["train.C"] and table.metric_names == ["accuracy", "macro_f1"]
    for i, row in enumerate(table.rows):
        assert row.config == ({} if i % 3 == 0 else {"train.C": 4.0})
        assert row.metrics == {"accuracy": 0.5 + i / 200, "macro_f1": 0.4 + i / 200}
        assert row.model_version == str(i + 1) and row.data == f"{i // 10:064x}.dir"
        assert not row.champion  # no registry here

    from uncool_prefect.cli.experiments import exp_app

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("UNCOOL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UNCOOL_STATE_DIR", str(tmp_path / "cli-state"))
    exp_app(["show", "--basepath", url, "--json"], result_action="return_value")
    document = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in document["rows"]] == [r["flow_run_id"] for r in records]
    exp_app(["show", "--basepath", url], result_action="return_value")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].split()[0] for line in lines] == [
        str(r["flow_run_id"])[:8] for r in records]
    assert "(base)" in lines[0] and "0.6450" in lines[-1]


def test_records_read_once_come_from_the_cache_until_they_change(
        tmp_path: Path, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{s3_bucket}/store"
    records = _records(12)
    store = _s3_store(url, s3_endpoint, tmp_path / "state")
    for record in records:
        store.put_run_record(str(record["flow_run_id"]), record)
    reads: list[str] = []

    def counting(store: ObjectStore) -> ObjectStore:
        original = store.backend.read_bytes

        def read_bytes(rel: str) -> bytes:
            reads.append(rel)
            return original(rel)

        monkeypatch.setattr(store.backend, "read_bytes", read_bytes)
        return store

    def shown() -> list[dict[str, object]]:
        reads.clear()
        return reading.read_records(counting(_s3_store(url, s3_endpoint, tmp_path / "state")))

    # Just written: younger than the racy window, so read every time.
    assert [r["flow_run_id"] for r in shown()] == [r["flow_run_id"] for r in records]
    assert len(reads) == 12 and not (tmp_path / "state" / reading.RECORD_CACHE).exists()
    monkeypatch.setattr(reading, "RACY_S", -10.0)  # as if they were written long ago
    assert len(shown()) == 12 and len(reads) == 12
    assert shown() == records and reads == []  # all from the cache

    changed = {**records[3], "flow_name": "other-flow"}
    store.put_run_record(str(changed["flow_run_id"]), changed)
    store.backend.delete(f"runs/{records[5]['flow_run_id']}.json")
    again = shown()
    assert reads == [f"runs/{changed['flow_run_id']}.json"]
    assert again == [changed if r is records[3] else r for r in records if r is not records[5]]

    (tmp_path / "state" / reading.RECORD_CACHE).write_text("{not json")
    assert shown() == again and len(reads) == 11  # a damaged cache is only a slower look


def _registry(path: Path, workspace: bool) -> None:
    """The two tables of MLflow's SQLite registry that exp show reads, as MLflow 3 makes them."""
    extra = ", workspace VARCHAR(63) DEFAULT 'default' NOT NULL" if workspace else ""
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE registered_model_aliases (alias VARCHAR(256), version INTEGER, "
                   f"name VARCHAR(256){extra})")
        db.execute(f'CREATE TABLE model_version_tags ("key" VARCHAR(250), value TEXT, '
                   f"name VARCHAR(256), version INTEGER{extra})")
        db.execute("INSERT INTO registered_model_aliases (alias, version, name) "
                   "VALUES ('champion', 7, 'issue-labeler'), ('challenger', 9, 'issue-labeler')")
        db.execute("INSERT INTO model_version_tags (\"key\", value, name, version) "
                   "VALUES ('prefect_flow_run_id', 'run-7', 'issue-labeler', 7)")


@pytest.mark.parametrize("workspace", [True, False])
def test_the_champion_is_read_from_the_sqlite_registry_without_mlflow(
        tmp_path: Path, workspace: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    _registry(tmp_path / "mlflow.db", workspace)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # importing it would fail
    records = [{"flow_run_id": f"run-{v}", "mlflow": {"model_name": "issue-labeler",
                                                      "model_version": str(v)}} for v in (6, 7, 8)]
    assert experiments.champion_run_ids(records, tmp_path) == {"run-7"}
    # The tagged run is gone: the earliest run holding that version.
    others = [{"flow_run_id": "copy", "mlflow": {"model_name": "issue-labeler", "model_version": "7"}}]
    assert experiments.champion_run_ids(others, tmp_path) == {"copy"}


def test_a_registry_of_another_shape_is_asked_through_mlflow(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("CREATE TABLE something_else (x INTEGER)")
    assert experiments._sqlite_champions(tmp_path / "mlflow.db", ["issue-labeler"], "champion") is None
