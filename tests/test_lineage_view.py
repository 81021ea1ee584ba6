"""Lineage both ways and checkout, on two real pipeline runs (`uncool run` in a subprocess)."""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from project import Project as BaseProject

from uncool_prefect.records.lineage import CheckoutError, checkout, lineage_tree, render_tree
from uncool_prefect.records.targets import TargetError
from uncool_prefect.sources import write_sample
from uncool_prefect.store import ObjectStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]



class Project(BaseProject):
    def run(self, *overrides: str) -> str:
        """Run the pipeline on the project's data folder; return the flow run id."""
        return self.run_flow(*overrides)[1]


@dataclass
class TwoRuns:
    project: Project
    store: ObjectStore
    first: dict[str, Any]
    second: dict[str, Any]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> TwoRuns:
    """The pipeline run twice: defaults, then train.C=0.5 (get-data and split Cached)."""
    project = Project(tmp_path_factory.mktemp("lineage"), "lineage-view")
    write_sample(project.data, days=2, seed=3)
    first_id = project.run()
    second_id = project.run("train.C=0.5")
    store = ObjectStore(project.home / "store")
    return TwoRuns(project, store, store.get_run_record(first_id), store.get_run_record(second_id))


def _out(record: dict[str, Any], stage: str, key: str) -> Any:
    return record["stages"][stage]["outputs"][key]


def test_lineage_of_the_model_object_goes_up_to_the_data_and_down_to_mlflow(runs: TwoRuns) -> None:
    model = _out(runs.first, "train", "model")
    tree = lineage_tree(runs.store, model, runs.project.home)
    assert tree["kind"] == "object" and tree["slot"] == "train.model"
    up = tree["upstream"]
    assert up["run"]["flow_run_id"] == runs.first["flow_run_id"]
    assert up["config"] == {"params_hash": runs.first["params_hash"], "params": runs.first["params"]}
    assert up["data"] == runs.first["data"]
    assert up["code"]["snapshot"] == runs.first["code"]["snapshot"]
    assert up["environment"] == runs.first["environment"]
    # The chain follows the object ids each stage's arguments named: the data
    # folder get-data stored, the train split made from it, the model.
    assert [(link["slot"], link["id"]) for link in up["chain"]] == [
        ("get-data.source", runs.first["data"]),
        ("split.train", _out(runs.first, "split", "train")),
        ("train.model", model),
    ]
    down = tree["downstream"]
    assert {(c["flow_run_id"], c["stage"]) for c in down["consumers"]} == {
        (runs.first["flow_run_id"], "evaluate"), (runs.first["flow_run_id"], "deploy")}
    versions = down["model_versions"]["versions"]
    assert [v["version"] for v in versions] == [runs.first["mlflow"]["model_version"]]
    json.dumps(tree)  # what --json prints


def test_lineage_of_the_dataset_shows_both_runs_split(runs: TwoRuns) -> None:
    dataset = runs.first["data"]
    assert runs.second["data"] == dataset
    tree = lineage_tree(runs.store, dataset, runs.project.home)
    assert tree["slot"] == "get-data.source"  # the input, stored as it was hashed
    assert [link["slot"] for link in tree["upstream"]["chain"]] == ["get-data.source"]
    consumers = {c["flow_run_id"]: c for c in tree["downstream"]["consumers"]
                 if c["stage"] == "split"}
    assert set(consumers) == {runs.first["flow_run_id"], runs.second["flow_run_id"]}
    assert consumers[runs.first["flow_run_id"]]["state"] == "Completed"
    assert consumers[runs.second["flow_run_id"]]["state"] == "Cached"
    assert consumers[runs.second["flow_run_id"]]["outputs"] == runs.first["stages"]["split"]["outputs"]
    text = _render(tree)
    assert "downstream" in text and runs.second["flow_run_id"] in text


def test_lineage_of_a_run_and_of_the_champion(runs: TwoRuns) -> None:
    tree = lineage_tree(runs.store, runs.first["flow_run_id"], runs.project.home)
    assert tree["kind"] == "run"
    assert [link["slot"] for link in tree["upstream"]["chain"]][-1] == "deploy.result"  # the Registration
    assert list(tree["upstream"]["stages"]) == ["get-data", "split", "train", "evaluate", "deploy"]
    reused = tree["downstream"]["reused_by"]
    assert [(r["flow_run_id"], r["stages"]) for r in reused] == [
        (runs.second["flow_run_id"], ["get-data", "split"])]
    assert tree["upstream"]["run"]["trigger"]["kind"] == "user"
    # The short ids `uncool exp show` prints work as well.
    short = lineage_tree(runs.store, runs.first["flow_run_id"][:8], runs.project.home)
    assert {**short, "target": tree["target"]} == tree

    champion = lineage_tree(runs.store, "champion", runs.project.home)
    assert champion["kind"] == "model-version"
    assert "train.model" in [link["slot"] for link in champion["upstream"]["chain"]]
    record = runs.store.get_run_record(champion["flow_run_id"])
    versions = champion["downstream"]["model_versions"]["versions"]
    assert any("champion" in v["aliases"] and v["version"] == record["mlflow"]["model_version"]
               for v in versions)
    assert "champion" in _render(champion)


def test_unknown_targets_are_refused(runs: TwoRuns) -> None:
    with pytest.raises(TargetError, match="neither a run"):
        lineage_tree(runs.store, "no-such-run", runs.project.home)
    with pytest.raises(TargetError, match="neither a run"):  # too short to mean one run
        lineage_tree(runs.store, runs.first["flow_run_id"][:3], runs.project.home)
    with pytest.raises(TargetError, match="produced object"):
        lineage_tree(runs.store, "0" * 64, runs.project.home)
    with pytest.raises(TargetError):
        checkout(runs.store, "no-such-run", runs.project.home / "x", runs.project.home)
    assert not (runs.project.home / "x").exists()


def test_checkout_of_the_champion_holds_everything_to_rerun_it(runs: TwoRuns, tmp_path: Path) -> None:
    dest = checkout(runs.store, "champion", tmp_path / "champ", runs.project.home)
    record = json.loads((dest / "run.json").read_text())
    assert yaml.safe_load((dest / "params.yaml").read_text()) == record["params"]
    assert _files(dest / "data") == _files(runs.project.data)
    with open(dest / "model.pkl", "rb") as handle:
        model = pickle.load(handle)
    assert type(model).__name__ == "Pipeline"
    assert len(model.predict(["dvc pull fails with my S3 remote"])) == 1
    assert set(json.loads((dest / "metrics.json").read_text())) >= {"accuracy", "macro_f1"}
    assert (dest / "code" / "flows" / "pipeline.py").is_file()
    assert (dest / "code" / "uncool_prefect" / "records" / "lineage.py").is_file()
    assert (dest / "code" / "pyproject.toml").is_file()
    environment = json.loads((dest / "environment.json").read_text())
    assert {"python", "platform", "packages"} <= set(environment)
    assert (dest / "git.diff").exists() == bool(record["code"]["git_diff"])
    readme = (dest / "RUN.md").read_text()
    assert f"uncool reproduce {record['flow_run_id']}" in readme
    assert "uncool run --params ../params.yaml" in readme
    assert [p.name for p in tmp_path.iterdir()] == ["champ"]  # no staging left behind


def test_checkout_refuses_a_non_empty_folder_and_leaves_it_alone(runs: TwoRuns, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(CheckoutError, match="not an empty folder"):
        checkout(runs.store, runs.first["flow_run_id"], busy, runs.project.home)
    assert _files(busy) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checkout(runs.store, runs.first["flow_run_id"], empty, runs.project.home) == empty
    assert (empty / "RUN.md").is_file()


def test_the_cli_commands(runs: TwoRuns, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    from uncool_prefect.cli import lineage as cli_lineage

    monkeypatch.setenv("UNCOOL_HOME", str(runs.project.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    basepath = str(runs.project.home / "store")
    cli_lineage.lineage(runs.first["data"], json_output=True, basepath=basepath)
    tree = json.loads(capsys.readouterr().out)
    assert len([c for c in tree["downstream"]["consumers"] if c["stage"] == "split"]) == 2
    cli_lineage.lineage("champion", basepath=basepath)
    assert "upstream" in capsys.readouterr().out
    cli_lineage.checkout(runs.first["flow_run_id"], tmp_path / "co", basepath=basepath)
    assert "RUN.md" in capsys.readouterr().out and (tmp_path / "co" / "model.pkl").is_file()


def test_the_checkout_reruns_by_hand_as_run_md_says(runs: TwoRuns, tmp_path: Path) -> None:
    dest = checkout(runs.store, runs.first["flow_run_id"], tmp_path / "co", runs.project.home)
    done = runs.project.uncool("run", "--params", "../params.yaml", "-S", "data.source=folder",
                               "-S", "data.folder.url=../data", cwd=dest / "code")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rerun = runs.store.get_run_record(
        re.search(r"runs/flow-run/([0-9a-f-]{36})", done.stdout).group(1))  # type: ignore[union-attr]
    assert rerun["data"] == runs.first["data"]
    assert _out(rerun, "train", "model") == _out(runs.first, "train", "model")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _render(tree: dict[str, Any]) -> str:
    from rich.console import Console

    console = Console(width=200, file=io.StringIO())
    console.print(render_tree(tree))
    return str(console.file.getvalue())  # type: ignore[attr-defined]
