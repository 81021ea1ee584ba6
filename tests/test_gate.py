"""The champion gate: both models judged on the same rows, one decision at a time.

MLflow on a SQLite store, the project's store on a local folder, real
scikit-learn models; concurrent deploys are separate processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

pytestmark = pytest.mark.slow


def _rows(threshold: float, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One feature; the label is whether it is above ``threshold``."""
    x = np.random.default_rng(seed).uniform(0, 1, size=(n, 1))
    return x, (x[:, 0] > threshold).astype(int)


def _stump(threshold: float) -> LogisticRegression:
    """A model that learned the rule ``x > threshold``."""
    x, y = _rows(threshold, n=2000, seed=1)
    return LogisticRegression(C=1e4, max_iter=1000).fit(x, y)


def _accuracy_on(x: np.ndarray, y: np.ndarray) -> Any:
    def score(model: Any) -> dict[str, float]:
        return {"accuracy": float((model.predict(x) == y).mean())}
    return score


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import mlflow

    home = tmp_path / "home"
    monkeypatch.setenv("UNCOOL_HOME", str(home))
    monkeypatch.delenv("UNCOOL_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    home.mkdir()
    monkeypatch.setattr("uncool_prefect.tracking._USER_TRACKING_URI", uri)
    yield home
    mlflow.set_tracking_uri(None)


def test_new_data_judges_the_champion_on_todays_rows_not_its_old_number(project: Path) -> None:
    """The old gate would promote: 0.90 today beats the 0.70 the champion logged on old data."""
    from uncool_prefect import Gate, register_model
    from uncool_prefect.tracking import current_champion

    champion = register_model(_stump(0.5), "drift", {"accuracy": 0.70})
    assert champion.promoted
    x, y = _rows(0.5, seed=7)  # today's rows: the champion's rule still holds
    worse = _stump(0.6)  # wrong on the 10% between 0.5 and 0.6
    score = _accuracy_on(x, y)
    assert 0.70 < score(worse)["accuracy"] < score(_stump(0.5))["accuracy"]

    judged = register_model(worse, "drift", {"accuracy": score(worse)["accuracy"]},
                            gate=Gate("accuracy", score=score, scored_on="today's rows"))
    assert not judged.promoted
    assert judged.decision.compared_on == "same rows"
    assert judged.decision.champion_value == pytest.approx(1.0, abs=0.02)
    assert "both scored on today's rows" in judged.decision.reason
    assert str(current_champion("drift").version) == champion.version

    from mlflow import MlflowClient

    version_tags = MlflowClient().get_model_version("drift", judged.version).tags
    assert version_tags["gate.scored_on"] == "today's rows"
    assert float(version_tags["gate.champion_score"]) == pytest.approx(judged.decision.champion_value)
    assert float(version_tags["gate.challenger_score"]) == pytest.approx(judged.decision.value)


def test_a_champion_that_cannot_be_scored_stays_champion_and_the_reason_says_why(
    project: Path,
) -> None:
    from uncool_prefect import Gate, register_model
    from uncool_prefect.tracking import current_champion

    first = register_model(_stump(0.5), "fragile", {"accuracy": 0.5})
    x, y = _rows(0.5)
    calls: list[Any] = []

    def score(model: Any) -> dict[str, float]:
        calls.append(model)
        if len(calls) == 2:  # the second model scored is the champion
            raise RuntimeError("the champion needs a feature these rows lack")
        return _accuracy_on(x, y)(model)

    second = register_model(_stump(0.5), "fragile", {"accuracy": 1.0},
                            gate=Gate("accuracy", score=score))
    assert not second.promoted
    assert "could not be loaded or scored" in second.decision.reason
    assert "the champion needs a feature these rows lack" in second.decision.reason
    assert str(current_champion("fragile").version) == first.version


_DEPLOY = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    from test_gate import _accuracy_on, _rows, _stump
    from uncool_prefect import Gate, register_model
    import uncool_prefect.tracking as tracking
    tracking._USER_TRACKING_URI = {uri!r}
    name, threshold, start = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    model = _stump(threshold)
    x, y = _rows(0.5, seed=3)
    rows_score = _accuracy_on(x, y)

    def score(model):
        time.sleep(1.5)  # a real validation set takes a while: the window a race needs
        return rows_score(model)

    time.sleep(max(0.0, start - time.time()))  # both reach the gate together
    done = register_model(model, name, rows_score(model), gate=Gate("accuracy", score=score))
    print(json.dumps({{"version": done.version, "promoted": done.promoted,
                       "value": done.decision.value, "reason": done.decision.reason}}))
""")


def test_two_deploys_at_once_leave_the_better_model_champion_every_time(project: Path) -> None:
    """Without one decision at a time, both compare with the old champion and the later wins."""
    from uncool_prefect import Gate, register_model
    from uncool_prefect.tracking import current_champion

    uri = f"sqlite:///{project / 'mlflow.db'}"
    script = project.parent / "deploy.py"
    script.write_text(_DEPLOY.format(tests=str(Path(__file__).parent), uri=uri), encoding="utf-8")
    x, y = _rows(0.5, seed=3)
    env = {**os.environ, "UNCOOL_HOME": str(project)}
    for trial in range(3):
        name = f"race-{trial}"
        register_model(_stump(0.8), name, {"accuracy": 0.0},
                       gate=Gate("accuracy", score=_accuracy_on(x, y)))  # a weak champion
        start = time.time() + 8.0  # both processes import MLflow first
        # The worse one (0.6) is started second: it would win a race to the alias.
        procs = [subprocess.Popen([sys.executable, str(script), name, str(t), str(start)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env, cwd=project.parent)
                 for t in (0.5, 0.6)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        best, worse = results
        assert best["value"] > worse["value"]
        assert str(current_champion(name).version) == best["version"], (trial, results)


def test_a_tree_model_registers_and_mlflow_serves_it_back(project: Path) -> None:
    """register_model logs scikit-learn models in MLflow's pickle format: a tree model,
    which MLflow's default (skops) refuses without a list of trusted types, registers,
    and MLflow's own loader gives back a model that predicts as the original."""
    import mlflow.pyfunc
    from sklearn.tree import DecisionTreeClassifier

    from uncool_prefect import register_model

    x, y = _rows(0.3)
    tree = DecisionTreeClassifier(max_depth=3).fit(x, y)
    done = register_model(tree, "tree", _accuracy_on(x, y)(tree))
    assert done.decision.promoted
    served = mlflow.pyfunc.load_model(f"models:/tree/{done.version}")
    assert (served.predict(x) == tree.predict(x)).all()
