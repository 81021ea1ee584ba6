"""`uncool exp show` and `uncool diff` over three real pipeline runs.

Run 1 uses the defaults, run 2 sets ``train.C=0.5``, run 3 adds a day of data.
The runs go through `uncool run` against the test Prefect server; the
comparisons are then made in-process from the run records they wrote.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from project import Project

from uncool_prefect.records import experiments
from uncool_prefect.records.targets import TargetError, resolve_target
from uncool_prefect.sources import write_sample, write_sample_day
from uncool_prefect.store import ObjectStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]



@dataclass
class Runs:
    """Three finished runs in one isolated UNCOOL_HOME."""

    home: Path
    ids: list[str]

    @property
    def store(self) -> ObjectStore:
        return ObjectStore(self.home / "store")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
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

    rendered = experiments.render_table(table)
    assert [c.header for c in rendered.columns][5] == "train.C"
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
