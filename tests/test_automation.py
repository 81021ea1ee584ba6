"""New data in the watched folder -> a new evaluated model, with nobody running anything.

A real Prefect server, `uncool deploy --watch` (work pool, blocks, code in the
store, `prefect deploy --all`), Prefect's process worker (`uncool worker`) and
the watcher as a flow run of its deployment, all on loopback.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from project import Project
from stack import AutomationStack, flow_runs, wait_for
from test_pipeline import latest_artifact

from uncool_prefect.sources import write_sample, write_sample_day
from uncool_prefect.store import ObjectStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[AutomationStack]:
    project = Project(tmp_path, "automation")
    write_sample(project.data, days=3, seed=5)
    running = AutomationStack(project, tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def test_new_data_trains_evaluates_and_deploys_by_itself(stack: AutomationStack) -> None:
    project = stack.project
    store = ObjectStore(project.home / "store")
    assert "train-evaluate-deploy/on-new-data" in stack.deploy_output.replace("…", "")

    # The watcher announces what the folder holds when it starts: run 1.
    (first,) = stack.wait_for_pipeline_runs(1)
    assert first.state.is_completed(), stack.worker_log()[-4000:]
    assert first.parameters["dataset"] == store.hash_path(project.data)

    # The next day's data lands: one run, on exactly the new content.
    day4 = write_sample_day(project.data, 4, seed=5)
    runs = stack.wait_for_pipeline_runs(2)
    assert len(runs) == 2
    second = runs[1]
    assert second.state.is_completed(), stack.worker_log()[-4000:]
    new_dataset = store.hash_path(project.data)
    assert second.parameters["dataset"] == new_dataset != first.parameters["dataset"]
    record = store.get_run_record(str(second.id))
    assert record["data"] == new_dataset
    assert record["trigger"]["kind"] == "event"
    assert record["stages"]["get-data"]["state"] == "Completed"
    # Promoted or not, the report says which and why.
    report = str(latest_artifact("issue-labeler-report").data)
    version = record["mlflow"]["model_version"]
    assert f"v{version}: " in report and "**Why:**" in report
    assert ("promoted to **champion**" in report) == record["models"][0]["promoted"]
    assert new_dataset in report

    # The same content again, under new names: announced never, run never.
    for path in day4[:10]:
        shutil.copy(path, path.with_name(f"again-{path.name}"))
    watcher_run = flow_runs(stack.WATCHER)[-1]
    wait_for(lambda: "same content as the last announcement" in _logs(watcher_run.id), 60,
             "the watcher to see the copies")
    assert len(flow_runs(stack.PIPELINE)) == 2

    # The daily deployment is there with its schedule, on the same pool.
    from prefect import get_client

    with get_client(sync_client=True) as client:
        daily = client.read_deployment_by_name(stack.DAILY)
    assert [s.schedule.cron for s in daily.schedules] == ["0 6 * * *"]  # type: ignore[union-attr]
    assert daily.work_pool_name == "uncool-local"
    assert daily.pull_steps == [{"uncool_prefect.project.deploy.pull_code": {"ref": "deployments/code"}}]
    # Run now, it retrains on the latest announced data: nothing changed, all Cached.
    with get_client(sync_client=True) as client:
        client.create_flow_run_from_deployment(daily.id)
    daily_run = wait_for(lambda: [r for r in flow_runs(stack.DAILY) if r.state and r.state.is_final()],
                         180, "the daily run to finish", interval=0.5)[0]
    assert daily_run.state.is_completed(), stack.worker_log()[-4000:]
    daily_record = store.get_run_record(str(daily_run.id))
    assert daily_record["data"] == new_dataset
    assert {s["state"] for s in daily_record["stages"].values()} == {"Cached"}


def test_deploy_names_an_unreachable_server(tmp_path: Path) -> None:
    project = Project(tmp_path, "unreachable")
    project.env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    done = project.uncool("deploy")
    assert done.returncode == 2
    assert "does not answer" in done.stderr and "127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr


def test_uncool_watch_once_announces_new_content_once(tmp_path: Path) -> None:
    project = Project(tmp_path, "watch-once")
    write_sample_day(project.data, 1, per_day=6)
    first = project.uncool("watch", str(project.data), "--once", "--name", "once")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "announced" in first.stdout and "6 files" in first.stdout
    again = project.uncool("watch", str(project.data), "--once", "--name", "once")
    assert again.returncode == 0 and "unchanged since the last announcement" in again.stdout
    assert _events_about("uncool.dataset.once") == 1


def test_deploy_refuses_to_watch_a_missing_folder(tmp_path: Path) -> None:
    project = Project(tmp_path, "missing-folder")
    done = project.uncool("deploy", "--watch", str(tmp_path / "nope"))
    assert done.returncode == 2
    assert "no such folder" in done.stderr and "uncool sample-data" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_without_a_project_home_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pull step refuses a relative UNCOOL_HOME: runs would record apart from the project."""
    from uncool_prefect.project.deploy import DeployError, pull_code

    monkeypatch.setenv("UNCOOL_HOME", ".uncool")
    with pytest.raises(DeployError, match="uncool worker"):
        pull_code()


def _events_about(resource_id: str) -> int:
    """How many uncool.dataset.updated events the server received about ``resource_id``."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    def count() -> int | None:
        with get_client(sync_client=True) as client:
            page = client.request("POST", "/events/filter", json={"filter": EventFilter(
                event=EventNameFilter(name=["uncool.dataset.updated"]),
                resource=EventResourceFilter(id=[resource_id]),
            ).model_dump(mode="json")}).json()
        return len(page["events"]) or None

    # NOTE: the server stores events in batches (its event persister flushes every few seconds).
    return wait_for(count, 30, f"an event about {resource_id} on the server", interval=0.5)


def _logs(flow_run_id: object) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[flow_run_id])))  # type: ignore[list-item]
    return "\n".join(log.message for log in logs)
