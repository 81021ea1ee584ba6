"""A stopped `uncool worker` leaves nothing running, and a new one watches again.

A real Prefect server, `uncool deploy --watch`, `uncool worker` (Prefect's
process worker) and the watcher as a flow run of its deployment; the worker is
stopped the way a service manager (SIGTERM) or a terminal (SIGINT) stops it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from project import Project
from stack import StoppableStack, flow_run_state, flow_runs, processes_of, wait_for
from test_automation import _logs

from uncool_prefect.events import last_announced
from uncool_prefect.sources import write_sample, write_sample_day
from uncool_prefect.store import ObjectStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

# A stop cancels through the API and waits for the worker to kill each run's processes.
STOP_BOUND = 45


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[StoppableStack]:
    running = StoppableStack(Project(tmp_path, "worker-stop"), tmp_path)
    try:
        yield running
    finally:
        running.stop()
        _forget_stopped_watchers()  # a failed test must not hand its watcher to the next worker


def _assert_cancelled_and_gone(stack: StoppableStack, flow_run_id: object) -> None:
    state = flow_run_state(flow_run_id)
    assert state.is_cancelled(), (state, stack.worker_log()[-4000:])
    assert processes_of(flow_run_id) == [], f"processes of {flow_run_id} left running"


def test_sigterm_cancels_the_watcher_and_the_run_in_flight_and_a_new_worker_resumes_watching(
        stack: StoppableStack) -> None:
    project = stack.project
    write_sample(project.data, days=3, seed=5)
    store = ObjectStore(project.home / "store")
    since = datetime.now(UTC)

    def pipeline_runs() -> list[Any]:  # this test's: the deployments are the session's
        return [run for run in flow_runs(stack.PIPELINE) if run.created and run.created >= since]

    stack.start()
    watcher = stack.running_watcher()
    # The watcher announced the data; the pipeline trains on it.
    training = wait_for(lambda: [r for r in pipeline_runs() if r.state and r.state.is_running()],
                        180, "the pipeline run to be Running", interval=0.2)[0]
    announced = last_announced(store, "issues")
    assert announced is not None

    took = stack.signal_worker(signal.SIGTERM)
    assert took < STOP_BOUND, stack.worker_log()[-4000:]
    _assert_cancelled_and_gone(stack, watcher.id)
    _assert_cancelled_and_gone(stack, training.id)
    assert last_announced(store, "issues") == announced  # the watcher's state stays in the store

    # A new worker watches again: one watcher, which knows what it announced.
    stack.start_worker()
    resumed = stack.running_watcher()
    assert resumed.id != watcher.id and resumed.parameters == watcher.parameters
    assert [run.id for run in stack.active_watchers()] == [resumed.id]
    wait_for(lambda: "unchanged since the last announcement" in _logs(resumed.id), 60,
             "the resumed watcher to check the data it already announced")
    assert [run.id for run in pipeline_runs()] == [training.id]

    # New data after the restart: one run, on it.
    write_sample_day(project.data, 4, seed=5)
    wait_for(lambda: [r for r in pipeline_runs()[1:] if r.state and r.state.is_final()], 240,
             "the pipeline run on the new data to finish", interval=0.5)
    first, second = pipeline_runs()
    assert first.id == training.id
    assert second.state.is_completed(), stack.worker_log()[-4000:]
    assert second.parameters["dataset"] == store.hash_path(project.data)


def test_sigint_cancels_the_watcher_and_workers_started_again_run_one_watcher(
        stack: StoppableStack) -> None:
    stack.project.data.mkdir(parents=True)
    stack.start()
    watcher = stack.running_watcher()

    took = stack.signal_worker(signal.SIGINT)
    assert took < STOP_BOUND, stack.worker_log()[-4000:]
    _assert_cancelled_and_gone(stack, watcher.id)
    assert "cancelling 1 flow run(s)" in stack.worker_log()

    first = stack.start_worker()
    resumed = stack.running_watcher()
    assert resumed.id != watcher.id
    # A second worker on the pool resumes nothing more.
    stack.start_worker()
    wait_for(lambda: stack.worker_log().count("started!") >= 3, 60, "the second worker to start")
    assert [run.id for run in stack.active_watchers()] == [resumed.id]
    assert stack.signal_worker(signal.SIGTERM) < STOP_BOUND  # it executes nothing
    assert flow_run_state(resumed.id).is_running()
    assert [run.id for run in stack.active_watchers()] == [resumed.id]
    stack.worker = first  # stop() stops the one running the watcher


def _forget_stopped_watchers() -> None:
    from prefect import get_client

    from uncool_prefect.project.worker import RESUME_TAG

    with get_client(sync_client=True) as client:
        for run in flow_runs(StoppableStack.WATCHER):
            if RESUME_TAG in run.tags:
                client.update_flow_run(run.id, tags=[t for t in run.tags if t != RESUME_TAG])
