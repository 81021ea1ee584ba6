"""The automation stack for tests and bench/latency.py: deployments, a process worker, a watcher.

Everything real: `uncool deploy --watch` against a running Prefect server
(PREFECT_API_URL), `uncool worker` (Prefect's process worker) as a subprocess,
and the watcher as a long-running flow run of its deployment on that worker.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from project import PROJECT, UNCOOL, Project

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def flow_runs(deployment: str) -> list[Any]:
    """Flow runs of ``flow/deployment``, oldest first."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[target.id])))
    return sorted(runs, key=lambda run: run.created)


class AutomationStack:
    """`uncool deploy --watch DATA` and `uncool worker` for one Project; stop() cleans up."""

    PIPELINE = "train-evaluate-deploy/on-new-data"
    WATCHER = "uncool-watch/watch-issues"
    DAILY = "train-evaluate-deploy/daily"

    def __init__(self, project: Project, log_dir: Path) -> None:
        self.project = project
        self.log_dir = log_dir
        self.worker: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The dataset's name is what the on-new-data trigger of deployments/prefect.yaml matches.
        done = self.project.uncool("deploy", "--watch", str(self.project.data), "--name", "issues")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        self.deploy_output = done.stdout
        with open(self.log_dir / "worker.log", "wb") as log:
            self.worker = subprocess.Popen(
                [UNCOOL, "worker"], cwd=PROJECT, env=self.project.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def worker_log(self) -> str:
        return (self.log_dir / "worker.log").read_text(errors="replace")

    def finished_pipeline_runs(self) -> list[Any]:
        return [run for run in flow_runs(self.PIPELINE) if run.state and run.state.is_final()]

    def wait_for_pipeline_runs(self, count: int, timeout: float = 240) -> list[Any]:
        """Wait until ``count`` pipeline runs are final; fail with the worker's log if not."""
        try:
            return wait_for(lambda: [runs for runs in [self.finished_pipeline_runs()]
                                     if len(runs) >= count] or None,
                            timeout, f"{count} finished run(s) of {self.PIPELINE}", interval=0.5)[0]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nworker log:\n{self.worker_log()[-6000:]}") from None

    def stop(self) -> None:
        """Cancel the watcher's flow run, then stop the worker and anything it started."""
        import psutil
        from prefect import get_client
        from prefect.states import Cancelling

        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            for run in flow_runs(self.WATCHER):
                if run.state and not run.state.is_final():
                    client.set_flow_run_state(run.id, Cancelling(), force=True)
        if self.worker is None:
            return
        # NOTE: the worker starts each flow run in a new session, so killing
        # its process group alone would leave a watcher behind.
        with contextlib.suppress(psutil.NoSuchProcess):
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not _watchers_alive(self.worker), 20, "the watcher to stop")
            children = psutil.Process(self.worker.pid).children(recursive=True)
            self.worker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.worker.wait(timeout=15)
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        if self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait()


class StoppableStack(AutomationStack):
    """An AutomationStack whose `uncool worker` is stopped by a signal and started again."""

    def signal_worker(self, signum: int, timeout: float = 90) -> float:
        """Send ``signum`` to `uncool worker`; seconds until it exited (fails past ``timeout``)."""
        assert self.worker is not None
        started = time.monotonic()
        self.worker.send_signal(signum)
        try:
            self.worker.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"uncool worker still running {timeout:.0f} s after "
                                 f"signal {signum}\nworker log:\n{self.worker_log()[-6000:]}") from None
        return time.monotonic() - started

    def start_worker(self) -> subprocess.Popen[bytes]:
        """Another `uncool worker`, logging to the same worker.log; it becomes ``self.worker``."""
        with open(self.log_dir / "worker.log", "ab") as log:
            self.worker = subprocess.Popen(
                [UNCOOL, "worker"], cwd=PROJECT, env=self.project.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return self.worker

    def active_watchers(self) -> list[Any]:
        """Watcher flow runs on this project's data that are not final (scheduled ... cancelling)."""
        return [run for run in flow_runs(self.WATCHER) if run.state and not run.state.is_final()
                and run.parameters.get("url") == str(self.project.data)]

    def running_watcher(self, timeout: float = 120) -> Any:
        """The one watcher flow run once it is Running."""
        return wait_for(lambda: [run for run in self.active_watchers() if run.state.is_running()],
                        timeout, "the watcher's flow run to be Running", interval=0.5)[0]


def flow_run_state(flow_run_id: object) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state  # type: ignore[arg-type]


def processes_of(flow_run_id: object) -> list[int]:
    """Live processes whose command line or environment names the flow run."""
    import psutil

    run_id = str(flow_run_id)
    pids = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if (run_id in " ".join(process.cmdline())
                    or process.environ().get("PREFECT__FLOW_RUN_ID") == run_id):
                pids.append(process.pid)
    return pids


def _watchers_alive(worker: subprocess.Popen[bytes] | None) -> bool:
    import psutil

    if worker is None:
        return False
    try:
        children = psutil.Process(worker.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    return any("flow-run" in " ".join(child.cmdline()) or "prefect.engine" in " ".join(child.cmdline())
               for child in children if child.is_running())
