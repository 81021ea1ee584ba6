"""`uncool` on a project of its own: tests/wine_project, not the issue labeler.

The wine project uses only the public API (``stage``, ``pipeline``,
``register_model``, ``Gate``), names its stages and parameters its own way and
reads a folder of CSV files. Everything here goes through the `uncool` console
script, in a copy of the project, against the session's real Prefect server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from wine_project.make_data import write_wine_csvs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

UNCOOL = str(Path(sys.executable).with_name("uncool"))
WINE_PROJECT = Path(__file__).resolve().parent / "wine_project"
STAGES = ["load-table", "make-features", "fit-model", "score", "publish"]
OID = re.compile(r"[0-9a-f]{64}(\.dir)?")
DATA_VERSION = re.compile(r"[0-9a-f]{64}\.dir")


class WineProject:
    """A copy of tests/wine_project with its data, and an `uncool` user of its own."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.root = tmp / "project"
        shutil.copytree(WINE_PROJECT, self.root,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        self.data = self.root / "data"
        write_wine_csvs(self.data)
        self.home = tmp / "home"
        self.env = {**os.environ, "UNCOOL_HOME": str(self.home), "UNCOOL_BLOCK": name,
                    "UNCOOL_STORE": str(self.home / "store"), "COLUMNS": "200"}
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def uncool(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([UNCOOL, *args], capture_output=True, text=True, timeout=300,
                              cwd=cwd or self.root, env=self.env)

    def run(self, *overrides: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], str]:
        """`uncool run` with ``-S`` overrides: the process and the flow run id it printed."""
        args = ["run"]
        for override in overrides:
            args += ["-S", override]
        done = self.uncool(*args, cwd=cwd)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        match = re.search(r"runs/flow-run/([0-9a-f-]{36})", done.stdout)
        assert match, done.stdout
        return done, match.group(1)

    def record(self, flow_run_id: str) -> dict[str, Any]:
        """The run record: plain JSON in the store."""
        path = self.home / "store" / "runs" / f"{flow_run_id}.json"
        assert path.is_file(), f"no run record at {path}"
        return dict(json.loads(path.read_text(encoding="utf-8")))

    def states(self, flow_run_id: str) -> dict[str, str]:
        return {name: stage["state"] for name, stage in self.record(flow_run_id)["stages"].items()}


@pytest.fixture
def wine(tmp_path: Path, request: pytest.FixtureRequest) -> WineProject:
    name = "wine-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40]
    return WineProject(tmp_path, name)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _shows_states(stdout: str, states: dict[str, str]) -> None:
    """The stages table of `uncool run` names every stage with its state."""
    for name, state in states.items():
        assert re.search(rf"{re.escape(name)}\W+{state}\b", stdout), (name, state, stdout[-3000:])


def test_run_records_caches_and_reruns_only_what_a_param_change_touches(wine: WineProject) -> None:
    first, first_id = wine.run()
    record = wine.record(first_id)

    # stages: every task run, keyed by task name, in call order
    assert list(record["stages"]) == STAGES
    for stage in record["stages"].values():
        assert stage["state"] == "Completed"
        assert isinstance(stage["outputs"], dict)
        assert stage["result"] is None or OID.fullmatch(stage["result"]), stage["result"]
    _shows_states(first.stdout, dict.fromkeys(STAGES, "Completed"))

    # inputs: the folder argument of load-table, stored; its version is the run's data version
    assert list(record["inputs"]) == ["load-table.folder"]
    folder_input = record["inputs"]["load-table.folder"]
    assert Path(folder_input["url"]).resolve() == wine.data.resolve()
    assert DATA_VERSION.fullmatch(folder_input["version"]), folder_input
    assert record["data"] == folder_input["version"]

    # params: the flow's parameters, from pipelines/params.yaml
    params = record["params"]
    assert params["prepare"] == {"test_size": 0.3, "seed": 7}
    assert params["fit"] == {"alpha": 1.0, "max_iter": 500}
    assert params["gate"] == {"metric": "accuracy", "min_improvement": 0.0}
    assert params["data_dir"] == "data"

    # models: what publish registered
    assert len(record["models"]) == 1
    model = record["models"][0]
    assert (model["name"], str(model["version"]), model["promoted"]) == ("wine-classifier", "1", True)
    assert "wine-classifier v1" in first.stdout

    # Again, from a folder below the project's: the project is found, and nothing re-runs.
    second, second_id = wine.run(cwd=wine.root / "pipelines")
    assert wine.states(second_id) == dict.fromkeys(STAGES, "Cached")
    _shows_states(second.stdout, dict.fromkeys(STAGES, "Cached"))
    assert [(m["name"], str(m["version"])) for m in wine.record(second_id)["models"]] == \
        [("wine-classifier", "1")]
    assert wine.record(second_id)["data"] == record["data"]

    # A fit parameter: only the stages downstream of fit-model run.
    third, third_id = wine.run("fit.alpha=2.0")
    expected = {"load-table": "Cached", "make-features": "Cached", "fit-model": "Completed",
                "score": "Completed", "publish": "Completed"}
    assert wine.states(third_id) == expected
    _shows_states(third.stdout, expected)
    assert wine.record(third_id)["params"]["fit"] == {"alpha": 2.0, "max_iter": 500}
    assert "wine-classifier v2" in third.stdout

    # A key the params file does not have: a clear error, no traceback.
    bad = wine.uncool("run", "-S", "fit.nope=1")
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "unknown parameter" in bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr

    # exp show: a row per run; the config column holds what differs from the oldest run.
    shown = wine.uncool("exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {row["run_id"]: row for row in json.loads(shown.stdout)["rows"]}
    assert {first_id, second_id, third_id} <= set(rows)
    assert rows[third_id]["config"] == {"fit.alpha": 2.0}
    assert rows[second_id]["config"] == {}

    # lineage: upstream names the data version and the stages.
    lineage = wine.uncool("lineage", first_id, "--json")
    assert lineage.returncode == 0, lineage.stderr
    tree = json.loads(lineage.stdout)
    assert tree["upstream"]["data"] == record["data"]
    assert list(tree["upstream"]["stages"]) == STAGES
    assert tree["upstream"]["inputs"] == {"load-table.folder": record["data"]}

    # The champion's chain: its stages pass values, not object ids; Prefect's own
    # dependency tracking links them, each stored result named by its id.
    champion = json.loads(wine.uncool("lineage", "champion", "--json").stdout)
    chain = [link["slot"] for link in champion["upstream"]["chain"]]
    assert chain == ["load-table.folder", "load-table.result", "make-features.result",
                     "fit-model.result", "score.result"], chain
    versions = champion["downstream"]["model_versions"]["versions"]
    assert [v["name"] for v in versions] == ["wine-classifier"] and "champion" in versions[0]["aliases"]


def test_checkout_new_data_and_reproduce_from_the_recorded_data(wine: WineProject, tmp_path: Path) -> None:
    originals = _files(wine.data)
    _, first_id = wine.run()
    first = wine.record(first_id)

    dest = tmp_path / "checkout"
    done = wine.uncool("checkout", first_id, str(dest))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (dest / "params.yaml").is_file()
    assert _files(dest / "data") == originals  # byte for byte
    assert (dest / "code" / "pipelines" / "wine.py").read_bytes() == \
        (WINE_PROJECT / "pipelines" / "wine.py").read_bytes()
    assert (dest / "code" / "pyproject.toml").read_bytes() == \
        (WINE_PROJECT / "pyproject.toml").read_bytes()

    # A new part of the data: a new data version, and load-table runs again.
    (wine.data / "part-3.csv").write_bytes((wine.data / "part-1.csv").read_bytes())
    _, new_id = wine.run()
    new = wine.record(new_id)
    assert new["data"] != first["data"]
    assert new["stages"]["load-table"]["state"] == "Completed"

    # The first run again, with its data gone from the project: the recorded data is used.
    shutil.rmtree(wine.data)
    again = wine.uncool("reproduce", first_id)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "every stage reproduced byte for byte" in again.stdout


def test_a_folder_without_a_tool_uncool_table_is_a_clear_error(wine: WineProject, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pyproject.toml").write_text('[project]\nname = "bare"\nversion = "0.0.1"\n')
    done = wine.uncool("run", cwd=bare)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[tool.uncool]" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def _status(wine: WineProject, *overrides: str) -> tuple[int, dict[str, Any]]:
    args = ["status", "--json"]
    for override in overrides:
        args += ["-S", override]
    done = wine.uncool(*args)
    assert done.returncode in (0, 1), done.stdout[-4000:] + done.stderr[-4000:]
    return done.returncode, json.loads(done.stdout)


def _predicted(status: dict[str, Any], *, if_changed: str = "Completed") -> dict[str, str]:
    """What status says the run's states will be; ``if_changed`` for stages that depend on
    whether a re-run stage's result changes."""
    states = {"cached": "Cached", "runs": "Completed", "depends": if_changed}
    return {s["stage"]: states[s["state"]] for s in status["stages"]}


def test_status_says_what_the_next_run_re_runs_and_why(wine: WineProject) -> None:
    """Checked against what `uncool run` then does: nothing, a param, the data, one stage's code."""
    code, status = _status(wine)
    assert code == 1 and not status["up_to_date"] and status["last_run"] is None
    assert _predicted(status) == dict.fromkeys(STAGES, "Completed")
    assert status["stages"][0]["reasons"] == ["never ran"]
    _, first = wine.run()

    code, status = _status(wine)
    assert code == 0 and status["up_to_date"] and status["last_run"] == first
    assert _predicted(status) == dict.fromkeys(STAGES, "Cached")
    plain = wine.uncool("status")
    assert plain.returncode == 0 and "up to date" in plain.stdout

    code, status = _status(wine, "fit.alpha=2.0")
    assert code == 1 and status["params_changed"] == ["fit.alpha: 1.0 -> 2.0"]
    reasons = {s["stage"]: s["reasons"] for s in status["stages"]}
    assert reasons["fit-model"] == ["argument fit changed"]
    assert reasons["score"] == ["runs if the result of fit-model changes (it re-runs)"]
    _, second = wine.run("fit.alpha=2.0")
    assert wine.states(second) == _predicted(status)
    assert wine.states(second)["fit-model"] == "Completed"  # the prediction was not all Cached

    # New data: a row more in one file.
    part = wine.data / "part-1.csv"
    text = part.read_text(encoding="utf-8")
    part.write_text(text + text.splitlines()[-1] + "\n", encoding="utf-8")
    code, status = _status(wine, "fit.alpha=2.0")
    load = next(s for s in status["stages"] if s["stage"] == "load-table")
    assert load["state"] == "runs" and load["reasons"][0].startswith("input folder changed (")
    _, third = wine.run("fit.alpha=2.0")
    assert wine.states(third) == _predicted(status) == dict.fromkeys(STAGES, "Completed")

    # One stage's code: only it and what takes its result.
    source = wine.root / "pipelines" / "wine.py"
    text = source.read_text(encoding="utf-8")
    marker = "def score(model: RidgeClassifier, features: dict[str, list[Any]]) -> dict[str, float]:\n"
    assert marker in text
    source.write_text(text.replace(marker, marker + "    # scored on every row\n"), encoding="utf-8")
    code, status = _status(wine, "fit.alpha=2.0")
    reasons = {s["stage"]: s["reasons"] for s in status["stages"]}
    assert reasons["score"] == ["code changed"] and reasons["fit-model"] == []
    assert _predicted(status, if_changed="Cached") == {**dict.fromkeys(STAGES, "Cached"),
                                                       "score": "Completed"}
    _, fourth = wine.run("fit.alpha=2.0")
    # A comment changes the code, not the metrics: publish gets the same inputs again.
    assert wine.states(fourth) == _predicted(status, if_changed="Cached")
