"""Runs at the same time: identical stages computed once, a killed run blocks only for its lease.

Two `uncool run` processes of the wine project (tests/wine_project) with the
same inputs and the same store are started together: for every stage, one of
them computes it (Completed) and the other waits on the stage's lock in the
store and reads its result (Cached). On a local store and on S3 (moto, one
request at a time: see tests/serial_moto.py). Then a run killed with SIGKILL in
the middle of a stage: the next run takes that stage over once the killed
run's lease has expired, and finishes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from serial_moto import serial_moto
from test_any_project import STAGES, UNCOOL, WineProject

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

BUCKET = "uncool-runs"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with serial_moto(BUCKET) as endpoint:
        yield endpoint


def _start(wine: WineProject, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([UNCOOL, "run"], cwd=wine.root, env=env or wine.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _states(stdout: str) -> dict[str, str]:
    """Each stage's state as the run's stages table shows it."""
    found = {}
    for name in STAGES:
        match = re.search(rf"^\W*{re.escape(name)}\W+(Completed|Cached|Failed|Crashed)\b", stdout,
                          re.MULTILINE)
        assert match, (name, stdout[-3000:])
        found[name] = match.group(1)
    return found


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_identical_runs_started_together_compute_each_stage_once(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    wine = WineProject(tmp_path, f"wine-together-{where}")
    if where == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        wine.env.update({"UNCOOL_STORE": f"s3://{BUCKET}/{tmp_path.name}",
                         "AWS_ENDPOINT_URL": endpoint})
    # MLflow's database exists before the race, as it does for a project that
    # has run once (two first runs would both create its tables); the cache is empty.
    MlflowClient(tracking_uri=f"sqlite:///{wine.home / 'mlflow.db'}").search_experiments()

    runs = [_start(wine), _start(wine)]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
    first, second = (_states(stdout) for stdout, _ in outputs)
    for name in STAGES:
        assert sorted([first[name], second[name]]) == ["Cached", "Completed"], (name, first, second)


def test_a_run_killed_inside_a_stage_holds_it_only_for_its_lease(tmp_path: Path) -> None:
    wine = WineProject(tmp_path, "wine-killed")
    # The copy's fit-model stage waits when asked to, after saying it started:
    # the environment is not part of its cache key.
    source = wine.root / "pipelines" / "wine.py"
    text = source.read_text()
    body = '    """A RidgeClassifier on the train rows (deterministic: no randomness in its solver)."""\n'
    assert body in text
    source.write_text(text.replace(body, body + (
        '    import os, time\n'
        '    if os.environ.get("FIT_STARTED"):\n'
        '        Path(os.environ["FIT_STARTED"]).touch()\n'
        '        time.sleep(float(os.environ.get("FIT_SLEEP", "0")))\n')))
    marker = tmp_path / "fit-started"
    env = {**wine.env, "UNCOOL_LOCK_LEASE": "5"}

    doomed = _start(wine, {**env, "FIT_STARTED": str(marker), "FIT_SLEEP": "600"})
    try:
        while not marker.exists():
            assert doomed.poll() is None, doomed.communicate()
            time.sleep(0.1)
        locks = list((wine.home / "store" / "locks").iterdir())
        assert len(locks) == 1, locks  # fit-model's, held by the run now inside it
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=30)
    finally:
        if doomed.poll() is None:
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait()
    assert locks[0].exists()  # a SIGKILLed run releases nothing

    done = subprocess.run([UNCOOL, "run"], cwd=wine.root, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _states(done.stdout) == {"load-table": "Cached", "make-features": "Cached",
                                    "fit-model": "Completed", "score": "Completed",
                                    "publish": "Completed"}
    assert list((wine.home / "store" / "locks").iterdir()) == []
