"""``uncool worker``: Prefect's process worker for the deployments, stopped without leftovers.

The worker runs with the project's environment (:func:`worker_environment`),
beside a warm-start server (:mod:`.warm`) that its flow runs start from;
stopping it cancels the flow runs it executes and resumes the watcher next
time (see the note below).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any
from uuid import UUID

from ..settings import get_settings
from . import POOL, WORKER_QUERY_SECONDS, warm
from .deploy import WATCH_FLOW, ensure_watcher_run
from .warm_client import SOCKET_VAR


def worker_environment(project: Path, api_url: str,
                       query_seconds: float = WORKER_QUERY_SECONDS) -> dict[str, Any]:
    """The environment `uncool worker` gives Prefect's process worker and its flow runs."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = api_url
    env["PREFECT_WORKER_QUERY_SECONDS"] = str(query_seconds)
    settings = get_settings()
    env["UNCOOL_HOME"] = str((project / settings.home).absolute())  # an absolute home stays
    # NOTE: flow runs start in the code cache, away from the project's .env:
    # pin the store and its block as `uncool deploy` saw them.
    env["UNCOOL_STORE"] = settings.store_url
    env["UNCOOL_BLOCK"] = settings.block
    # NOTE: the pool's flow-run command is a console script (deploy.FLOW_RUN_COMMAND):
    # this environment's, where uncool-prefect and the flows' packages are.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env


# -- stopping and starting the worker --------------------------------------
#
# Prefect's process worker starts each flow run in a session of its own, and on
# Ctrl-C or SIGTERM it kills them without a state: the watcher's run stays
# "Running" with no process (so `uncool deploy --watch` finds it "already
# running"), and a worker that dies before it kills them leaves them behind.
# `uncool worker` therefore runs Prefect's worker as a child and, when stopped,
# cancels the runs that worker executes through the API first (Prefect's own
# cancellation: the worker kills each run's process group and records
# Cancelled), then stops the worker; a watcher cancelled so is tagged, and the
# next `uncool worker` starts it again.

RESUME_TAG = "uncool:resume-on-worker-start"
_RECENT = 120.0
_RECORD_GRACE = 3.0
STOPPED = "uncool worker stopped"
# Each flow-run process (and whatever it starts) has this in its environment.
_RUN_ID_VAR = b"PREFECT__FLOW_RUN_ID="
# Linux: the worker gets SIGTERM when `uncool worker` dies, even by SIGKILL.
_EXEC_WITH_PARENT_DEATH_SIGNAL = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def resume_watchers(pool: str = POOL) -> list[tuple[str, str, bool]]:
    """Start again each watcher that a stopping `uncool worker` cancelled.

    A watcher run cancelled by a stopping worker carries RESUME_TAG; for each
    (newest first, one per deployment and dataset) a new run of its deployment
    with the same parameters is created, unless one is already scheduled or
    running, and the tag is removed. Returns (url, flow run id, created) each.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    resumed: list[tuple[str, str, bool]] = []
    done: set[tuple[str, str, str]] = set()
    with get_client(sync_client=True) as client:
        stopped = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[WATCH_FLOW])),
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[RESUME_TAG]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLED]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        )
        for run in stopped:
            key = (str(run.deployment_id), str(run.parameters.get("url")), str(run.parameters.get("name")))
            if run.deployment_id is not None and key not in done:
                done.add(key)
                try:
                    run_id, created = ensure_watcher_run(client, run.deployment_id, dict(run.parameters))
                    resumed.append((str(run.parameters.get("url")), run_id, created))
                except ObjectNotFound:  # the deployment is gone: nothing to resume
                    pass
            client.update_flow_run(run.id, tags=[t for t in run.tags if t != RESUME_TAG])
    return resumed


def flow_run_processes(roots: Collection[int] | None = None,
                       run_ids: set[str] | None = None) -> dict[str, set[int]]:
    """flow run id -> live pids of its processes: descendants of ``roots``, or any with one of ``run_ids``.

    A warm-started run has two: the client under Prefect's worker and the
    engine under the warm-start server (whose environment block names the
    run, see warm_run); pass both of those parents as ``roots``.
    """
    proc = Path("/proc")
    found: dict[str, set[int]] = {}
    if not proc.is_dir():
        return _flow_run_processes_psutil(roots, run_ids)
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if state not in "ZX":
            children.setdefault(int(ppid), []).append(int(entry.name))
    if roots is not None:
        pids, todo = [], [pid for root in roots for pid in children.get(root, [])]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, []))
    else:
        pids = [pid for kids in children.values() for pid in kids]
    for pid in pids:
        try:
            environ = (proc / str(pid) / "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(_RUN_ID_VAR):
                run_id = item[len(_RUN_ID_VAR):].decode()
                if run_ids is None or run_id in run_ids:
                    found.setdefault(run_id, set()).add(pid)
    return found


def _flow_run_processes_psutil(roots: Collection[int] | None,
                               run_ids: set[str] | None) -> dict[str, set[int]]:
    try:
        import psutil
    except ImportError:  # neither /proc nor psutil: the API's states are all there is
        return {}
    found: dict[str, set[int]] = {}
    candidates: list[Any] = []
    if roots is None:
        candidates = list(psutil.process_iter())
    for root in roots or ():
        with contextlib.suppress(psutil.NoSuchProcess):
            candidates += psutil.Process(root).children(recursive=True)
    for process in candidates:
        try:
            run_id = process.environ().get(_RUN_ID_VAR[:-1].decode())
        except (psutil.Error, OSError):
            continue
        if run_id and (run_ids is None or run_id in run_ids):
            found.setdefault(run_id, set()).add(process.pid)
    return found


def cancel_flow_runs(run_ids: set[str], *, force: bool = False) -> set[str]:
    """Cancel these flow runs through the API; returns those that were not final.

    Watcher runs are tagged to be resumed by the next worker. Without
    ``force`` a run is set Cancelling, for its worker to kill its processes
    and record Cancelled; with it, Cancelled at once (for runs whose worker
    is gone).
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Cancelled, Cancelling

    if not run_ids:
        return set()
    pending: set[str] = set()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[UUID(r) for r in run_ids])))
        watch_flows = {f.id for f in client.read_flows(flow_filter=_flow_named(WATCH_FLOW))}
        for run in runs:
            if run.state is None or run.state.is_final():
                continue
            pending.add(str(run.id))
            # A run already Cancelling was cancelled by someone (or by this stop before):
            # a watcher cancelled by hand stays stopped.
            ours = not run.state.is_cancelling()
            if ours and run.flow_id in watch_flows and RESUME_TAG not in run.tags:
                client.update_flow_run(run.id, tags=[*run.tags, RESUME_TAG])
            if force:
                client.set_flow_run_state(run.id, Cancelled(message=STOPPED), force=True)
            elif ours:
                client.set_flow_run_state(run.id, Cancelling(message=STOPPED), force=True)
    return pending


def _flow_named(name: str) -> Any:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    return FlowFilter(name=FlowFilterName(any_=[name]))


def _kill(pids: set[int]) -> None:
    """SIGKILL these processes and their process groups (never this process's group)."""
    own = os.getpgid(0)
    for pid in pids:
        with contextlib.suppress(OSError):
            group = os.getpgid(pid)
            if group != own:
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class _WarmStartServer:
    """The warm-start server (:mod:`.warm`) beside Prefect's worker: its process and private folder."""

    def __init__(self, env: dict[str, str]) -> None:
        # A folder only this user can enter: whoever can connect starts runs as this user.
        self.folder = Path(tempfile.mkdtemp(prefix="uncool-warm-"))
        self.socket = self.folder / "engine.sock"
        try:
            self.process = subprocess.Popen(
                _dying_with_this_process(warm.server_command(self.socket)),
                env=warm.server_environment(env), cwd=self.folder, stdin=subprocess.DEVNULL,
                process_group=0)
        except OSError:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.reported = False

    def report_exit(self, say: Callable[[str], object]) -> None:
        """Say once that the server is gone (its flow runs' clients then start cold)."""
        if not self.reported and self.process.poll() is not None:
            self.reported = True
            say(f"the warm-start server exited ({self.process.returncode}); "
                "flow runs start cold from now on")

    def stop(self) -> None:
        """SIGTERM (it ends the runs it still has), SIGKILL if that takes too long; remove the folder."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=warm.STOP_GRACE + 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _dying_with_this_process(command: list[str]) -> list[str]:
    """``command``, getting SIGTERM when this process dies (Linux; elsewhere as is)."""
    if sys.platform.startswith("linux"):
        return [sys.executable, "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *command]
    return command


def supervise_worker(command: list[str], env: dict[str, str], *, say: Callable[[str], object],
                     stop_timeout: float = 30.0, warm_start: bool = True) -> int:
    """Run Prefect's worker (``command``) until it exits or this process gets SIGINT/SIGTERM.

    With ``warm_start`` (Linux), a warm-start server runs beside it and the
    worker's flow runs start from it (UNCOOL_WARM_SOCKET, see :mod:`.warm`).
    On the signal: the flow runs the worker executes are cancelled through the
    API and, while the worker kills their processes, waited for up to
    ``stop_timeout`` seconds; then the worker is stopped; whatever is left
    (a run not final, a process of a run) is then cancelled by force and
    killed; then the warm-start server is stopped. A second signal skips the
    waiting. Returns 0 after a requested stop, else the worker's exit status.
    """
    signals: list[int] = []
    requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
        requested.set()

    with contextlib.ExitStack() as lifetime:
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        server = None
        env = {name: value for name, value in env.items() if name != SOCKET_VAR}
        if warm_start and sys.platform.startswith("linux"):
            try:
                server = _WarmStartServer(env)
            except OSError as exc:
                say(f"cannot start the warm-start server ({exc}); flow runs start cold")
            else:
                lifetime.callback(server.stop)
                env[SOCKET_VAR] = str(server.socket)
        # Its own process group: a Ctrl-C in the terminal reaches this process only,
        # which stops the worker in the order above.
        worker = subprocess.Popen(_dying_with_this_process(command), env=env,
                                  stdin=subprocess.DEVNULL, process_group=0)
        roots = [worker.pid] if server is None else [worker.pid, server.process.pid]
        # Every run met while stopping, and before that those met in the last
        # RECENT seconds: a run cancelled by hand just before the stop may have no
        # process left and its Cancelled not recorded yet.
        seen: dict[str, set[int]] = {}
        last_met: dict[str, float] = {}

        def scan(keep: bool = True) -> dict[str, set[int]]:
            now = flow_run_processes(roots)
            for run_id, pids in now.items():
                seen.setdefault(run_id, set()).update(pids)
                last_met[run_id] = time.monotonic()
            if not keep:
                for run_id in [r for r, at in last_met.items() if time.monotonic() - at > _RECENT]:
                    del last_met[run_id], seen[run_id]
            return now

        def cancel(run_ids: set[str], force: bool = False) -> set[str] | None:
            """cancel_flow_runs; None when the API does not answer (nothing will record a state)."""
            try:
                return cancel_flow_runs(run_ids, force=force)
            except Exception as exc:  # noqa: BLE001 - a stop goes on without the API
                say(f"cannot cancel through the Prefect API ({type(exc).__name__}: {exc}); "
                    "killing the flow runs' processes instead")
                return None

        try:
            while worker.poll() is None and not requested.wait(1.0):
                scan(keep=False)
                if server is not None:
                    server.report_exit(say)
            if requested.is_set():
                scan()
                running = {run_id: seen[run_id] for run_id in last_met}
                say(f"{signal.Signals(signals[0]).name}: cancelling {len(running)} flow run(s) of "
                    "this worker, then stopping it")
                pending = cancel(set(running))
                deadline = time.monotonic() + stop_timeout
                gone_since: dict[str, float] = {}
                while (pending is not None and (pending or running) and len(signals) < 2
                       and time.monotonic() < deadline):
                    time.sleep(0.5)
                    running = scan()
                    # NOTE: Prefect records Cancelled some seconds after the processes
                    # are gone (it polls their group); past _RECORD_GRACE this does.
                    for run_id in pending - set(running):
                        gone_since.setdefault(run_id, time.monotonic())
                    late = {r for r, at in gone_since.items() if time.monotonic() - at > _RECORD_GRACE}
                    if late & pending:
                        cancel(late & pending, force=True)
                    pending = cancel((pending - late) | set(running))
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)  # Prefect's worker: stop polling, kill what is left
                deadline = time.monotonic() + 15
                while worker.poll() is None and len(signals) < 2 and time.monotonic() < deadline:
                    scan()
                    time.sleep(0.2)
            else:
                say(f"Prefect's worker exited ({worker.returncode})")
        finally:
            if worker.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            # The worker is gone: nothing else will end these runs' processes.
            _kill({pid for pids in flow_run_processes(run_ids=set(seen)).values() for pid in pids})
        forced = cancel(set(seen), force=True)
        if forced:
            say(f"cancelled {len(forced)} flow run(s) left without a worker: {', '.join(sorted(forced))}")
    return 0 if signals else (worker.returncode or 0)
