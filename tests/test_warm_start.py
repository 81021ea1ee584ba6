"""Warm start: flow runs of `uncool worker` are forks of a process that imported Prefect once.

Three layers, each against the real thing where it can run here:

- the flow-run command (``warm_client``) against a stand-in server that
  speaks the protocol: its exit status, signal forwarding, the fallback to
  ``python -m prefect.engine`` when no server listens or one refuses, and
  what it does when the server goes away;
- the real warm server with the real client, no Prefect server: a run's
  engine is a fork of the server, named by its flow run id in /proc, and
  killed with its process group when its client is killed;
- `uncool worker` with a real Prefect server and a deployment of a tiny
  flow: a run completes in a fork of the warm server, a changed flow counts
  from the next run, and a run cancelled through the API ends its processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from project import Project
from stack import flow_run_state, processes_of, wait_for
from test_automation import _logs

from uncool_prefect.project.warm_client import HEADER, SOCKET_VAR, encode, read_message
from uncool_prefect.project.worker import flow_run_processes

CLIENT = [sys.executable, "-m", "uncool_prefect.project.warm_client"]
ENGINE = ["-m", "prefect.engine"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm start is Linux-only")


def _base_env() -> dict[str, str]:
    """This process's environment as a worker's runs would have it.

    NOTE: without pytest's PYTEST_CURRENT_TEST, which changes from one test
    phase to the next: a warm server refuses a run whose environment differs
    from its own (but for PREFECT_*), as a worker's never does.
    """
    return {name: value for name, value in os.environ.items()
            if name not in (SOCKET_VAR, "PYTEST_CURRENT_TEST")}


def _client_env(**extra: str) -> dict[str, str]:
    """An environment in which a cold engine fails fast: no API answers on port 9."""
    return {**_base_env(), "PREFECT_API_URL": "http://127.0.0.1:9/api",
            "PREFECT__FLOW_RUN_ID": str(uuid.uuid4()), **extra}


# -- the client against a stand-in server ------------------------------------------


class StandInServer:
    """Accepts one client on a Unix socket and answers it with ``script(conn, request)``."""

    def __init__(self, path: Path, script: Callable[[socket.socket, dict[str, Any]], None]) -> None:
        self.path = path
        self.request: dict[str, Any] = {}
        self.fds: list[int] = []
        self.received: list[dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script: Callable[[socket.socket, dict[str, Any]], None]) -> None:
        conn, _ = self.listener.accept()
        with conn:
            header, self.fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
            _magic, length = HEADER.unpack(header)
            payload = b""
            while len(payload) < length:
                payload += conn.recv(length - len(payload))
            self.request = json.loads(payload)
            script(conn, self.request)
        for fd in self.fds:
            os.close(fd)

    def close(self) -> None:
        self.thread.join(timeout=30)
        self.listener.close()


def _answer(*messages: dict[str, Any]) -> Callable[[socket.socket, dict[str, Any]], None]:
    def script(conn: socket.socket, _request: dict[str, Any]) -> None:
        for message in messages:
            conn.sendall(encode(message))
    return script


def test_the_client_hands_its_run_to_the_server_and_exits_as_the_engine_did(tmp_path: Path) -> None:
    server = StandInServer(tmp_path / "s.sock", _answer({"pid": 999_999_999}, {"exit": 3}))
    env = _client_env(**{SOCKET_VAR: str(server.path)})
    done = subprocess.run([*CLIENT, *ENGINE, "extra"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    server.close()
    assert done.returncode == 3, done.stderr
    assert server.request["argv"] == [*ENGINE, "extra"]
    assert server.request["cwd"] == str(tmp_path)
    assert server.request["env"]["PREFECT__FLOW_RUN_ID"] == env["PREFECT__FLOW_RUN_ID"]
    assert server.request["prefix"] == sys.prefix
    assert len(server.fds) == 3  # stdin, stdout, stderr, for the engine to use as its own


def test_the_client_forwards_sigterm_and_dies_by_the_engines_signal(tmp_path: Path) -> None:
    forwarded = threading.Event()

    def script(conn: socket.socket, _request: dict[str, Any]) -> None:
        conn.sendall(encode({"pid": 999_999_999}))
        pending = bytearray()
        message = read_message(conn, pending)
        if message == {"signal": signal.SIGTERM}:
            forwarded.set()
            conn.sendall(encode({"killed": signal.SIGTERM}))

    server = StandInServer(tmp_path / "s.sock", script)
    client = subprocess.Popen([*CLIENT, *ENGINE], env=_client_env(**{SOCKET_VAR: str(server.path)}),
                              stderr=subprocess.PIPE)
    # Its handlers are in place before it connects: a signal from now on reaches the engine.
    wait_for(lambda: server.request or None, 30, "the client's request")
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == -signal.SIGTERM
    server.close()
    assert forwarded.is_set()


def test_a_client_whose_server_goes_away_kills_the_engines_group_and_fails(tmp_path: Path) -> None:
    engine = subprocess.Popen(["sleep", "300"], start_new_session=True)  # stands for a forked engine
    try:
        server = StandInServer(tmp_path / "s.sock", _answer({"pid": engine.pid}))
        done = subprocess.run([*CLIENT, *ENGINE], env=_client_env(**{SOCKET_VAR: str(server.path)}),
                              capture_output=True, text=True, timeout=60)
        server.close()
        assert done.returncode == 1
        assert f"the warm server went away; flow-run process {engine.pid} killed" in done.stderr
        assert engine.wait(timeout=10) == -signal.SIGKILL
    finally:
        engine.kill()
        engine.wait()


@pytest.mark.parametrize("case", ["no variable", "no socket", "nobody listens", "refused"])
def test_without_a_warm_server_the_client_starts_prefects_engine_cold(tmp_path: Path, case: str) -> None:
    path = tmp_path / "s.sock"
    server = None
    env = _client_env()
    if case != "no variable":
        env[SOCKET_VAR] = str(path)
    if case == "nobody listens":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))  # a socket file left by a server that is gone
        stale.close()
    if case == "refused":
        server = StandInServer(path, _answer({"refused": "the warm server is stopping"}))
    done = subprocess.run([*CLIENT, *ENGINE], env=env, capture_output=True, text=True, timeout=120)
    if server is not None:
        server.close()
    # Prefect's own engine ran: it could not reach the API this environment names.
    assert done.returncode == 1
    assert "Connection refused" in done.stdout + done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("uncool warm start:")]
    if case == "no variable":
        assert notes == []
    else:
        assert len(notes) == 1 and "starting `python -m prefect.engine` cold" in notes[0], notes
        if case == "refused":
            assert "the warm server is stopping" in notes[0]


def test_the_cold_start_is_an_exec_in_the_clients_own_session(tmp_path: Path) -> None:
    """Anything but the engine runs cold, as ``python ARGS``, in the same pid."""
    code = "import os; print(os.getpid(), os.getsid(0))"
    client = subprocess.Popen([*CLIENT, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=_client_env(**{SOCKET_VAR: str(tmp_path / "none.sock")}))
    out, _ = client.communicate(timeout=60)
    assert out.split() == [str(client.pid), str(client.pid)]


# -- the real server and client, no Prefect server ---------------------------------


@pytest.fixture
def warm_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`python -m uncool_prefect.project.warm` on a socket in tmp_path, as `uncool worker` starts it."""
    from uncool_prefect.project import warm

    path = tmp_path / "engine.sock"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(warm.server_command(path), env=warm.server_environment(_base_env()),
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, process_group=0)
    try:
        wait_for(lambda: path.exists() or server.poll() is not None, 120, "the warm server to listen")
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        yield server, path
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert not path.exists()  # it removed its socket


@linux_only
def test_a_warm_run_is_a_fork_named_by_its_run_and_dies_with_its_client(
        tmp_path: Path, warm_server: tuple[subprocess.Popen[bytes], Path]) -> None:
    server, path = warm_server
    # An "API" that accepts and never answers: the engine waits in its first request.
    api = socket.socket()
    api.bind(("127.0.0.1", 0))
    api.listen(8)
    run_id = str(uuid.uuid4())
    env = _client_env(**{SOCKET_VAR: str(path), "PREFECT__FLOW_RUN_ID": run_id,
                         "PREFECT_API_URL": f"http://127.0.0.1:{api.getsockname()[1]}/api"})
    client = subprocess.Popen([*CLIENT, *ENGINE], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        engines = wait_for(lambda: flow_run_processes([server.pid]).get(run_id), 60,
                           "the forked engine under the warm server")
        (engine,) = engines
        assert engine != client.pid
        assert _parent(engine) == server.pid
        assert os.getsid(engine) == engine  # a session of its own, as Prefect starts runs
        assert Path(f"/proc/{engine}/cwd").resolve() == tmp_path.resolve()
        assert sorted(processes_of(run_id)) == sorted([client.pid, engine])
        client.kill()  # what Prefect's worker does when a cancelled run does not end in time
        client.wait()
        wait_for(lambda: not _alive(engine), 30, "the engine to be killed with its client")
        wait_for(lambda: not _children(server.pid), 10, "the server to reap it (no zombie)")
    finally:
        client.kill()
        client.wait()
        api.close()


@linux_only
def test_the_warm_server_runs_the_engine_with_the_runs_environment(
        tmp_path: Path, warm_server: tuple[subprocess.Popen[bytes], Path]) -> None:
    """The engine reads PREFECT_API_URL from the run (a cold engine would report the same error)."""
    _server, path = warm_server
    done = subprocess.run([*CLIENT, *ENGINE], env=_client_env(**{SOCKET_VAR: str(path)}),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Connection refused" in done.stdout + done.stderr
    assert "uncool warm start:" not in done.stderr  # it did start warm
    assert "RuntimeWarning" not in done.stderr


@linux_only
def test_a_run_whose_environment_differs_from_the_servers_starts_cold(
        tmp_path: Path, warm_server: tuple[subprocess.Popen[bytes], Path]) -> None:
    """PYTHONHASHSEED (or the locale, or a setting a module read at import) of the run
    itself: only a new Python has it, so the run starts as one."""
    _server, path = warm_server
    done = subprocess.run([*CLIENT, *ENGINE],
                          env=_client_env(**{SOCKET_VAR: str(path), "PYTHONHASHSEED": "7"}),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1  # the cold engine, with no API on port 9
    assert ("no warm start (the run's environment differs in PYTHONHASHSEED); starting "
            "`python -m prefect.engine` cold") in done.stderr


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


# -- `uncool worker` with a real Prefect server ---------------------------------------

HELLO = '''\
"""A flow that says which process runs it (and, given a sleep, starts a process that sleeps too)."""
import os
import subprocess
import time

from prefect import flow, get_run_logger

VERSION = {version}


@flow(name="warm-hello")
def hello(sleep: float = 0.0) -> int:
    helper = subprocess.Popen(["sleep", str(sleep)]) if sleep else None
    get_run_logger().info("hello v%s pid=%s ppid=%s helper=%s", VERSION, os.getpid(), os.getppid(),
                          helper.pid if helper else 0)
    time.sleep(sleep)
    return VERSION
'''

PREFECT_YAML = '''\
name: warm-start-test
prefect-version: 3.9.1
build: null
push: null
pull:
  - uncool_prefect.project.deploy.pull_code:
      ref: deployments/code
deployments:
  - name: warm-hello
    entrypoint: flows/hello.py:hello
    work_pool:
      name: uncool-local
'''


class HelloProject(Project):
    """A project of one tiny flow, deployed on the pool by `uncool deploy` from its own folder."""

    DEPLOYMENT = "warm-hello/warm-hello"

    def __init__(self, root: Path) -> None:
        super().__init__(root, "warm-start")
        self.root = root / "project"
        (self.root / "flows").mkdir(parents=True)
        (self.root / "deployments").mkdir()
        (self.root / "pyproject.toml").write_text(textwrap.dedent('''\
            [project]
            name = "warm-hello"
            version = "0"

            [tool.uncool]
            pipeline = "flows/hello.py:hello"
            '''))
        (self.root / "deployments" / "prefect.yaml").write_text(PREFECT_YAML)
        self.set_version(1)

    def set_version(self, version: int) -> None:
        (self.root / "flows" / "hello.py").write_text(HELLO.format(version=version))

    def deploy(self) -> None:
        done = self.uncool("deploy", cwd=self.root)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def run(self, **parameters: Any) -> Any:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(self.DEPLOYMENT)
            return client.create_flow_run_from_deployment(deployment.id, parameters=parameters)


@pytest.fixture
def hello(tmp_path: Path) -> Iterator[tuple[HelloProject, subprocess.Popen[bytes], Path]]:
    """The project deployed and `uncool worker` running from its folder (log: tmp_path/worker.log)."""
    project = HelloProject(tmp_path)
    project.deploy()
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([str(Path(sys.executable).with_name("uncool")), "worker"],
                                  cwd=project.root, env=project.env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    try:
        yield project, worker, log_path
    finally:
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


def _final(flow_run_id: object, timeout: float = 120) -> Any:
    return wait_for(lambda: ((s := flow_run_state(flow_run_id)) and s.is_final() and s) or None,
                    timeout, f"flow run {flow_run_id} to finish", interval=0.3)


def _hello_line(flow_run_id: object) -> tuple[int, int, int]:
    """(version, pid, ppid) the flow logged."""
    logs = wait_for(lambda: ((text := _logs(flow_run_id)) and "hello v" in text and text) or None,
                    30, "the flow's log line")
    found = re.search(r"hello v(\d+) pid=(\d+) ppid=(\d+)", logs)
    assert found, logs
    version, pid, ppid = found.groups()
    return int(version), int(pid), int(ppid)


@linux_only
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_uncool_worker_runs_flows_warm_picks_up_code_changes_and_cancels(
        hello: tuple[HelloProject, subprocess.Popen[bytes], Path]) -> None:
    project, worker, log_path = hello
    ready = wait_for(lambda: re.search(r"warm start: ready in .* \(pid (\d+),", log_path.read_text()),
                     120, "the warm-start server to be ready")
    server_pid = int(ready.group(1))

    def log() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    # A run completes, its engine a fork of the warm server, not the process Prefect started.
    first = project.run()
    assert _final(first.id).is_completed(), log()
    version, pid, ppid = _hello_line(first.id)
    client_pid = int(_read_run(first.id).infrastructure_pid)
    assert (version, ppid) == (1, server_pid), log()
    assert pid != client_pid

    # The flow changes: the next run, from the same warm server, runs the new code.
    project.set_version(2)
    project.deploy()
    second = project.run()
    assert _final(second.id).is_completed(), log()
    version, pid, ppid = _hello_line(second.id)
    assert (version, ppid) == (2, server_pid), log()

    # Cancelled through the API, a running warm run ends: client, engine and what the
    # flow started (the stop goes to the run's process group, as Prefect's own start does).
    third = project.run(sleep=300)
    wait_for(lambda: flow_run_state(third.id).is_running(), 60, "the third run to be Running")
    _version, engine, _ppid = _hello_line(third.id)
    found = re.search(r"helper=(\d+)", _logs(third.id))
    assert found, _logs(third.id)
    helper = int(found.group(1))
    assert _alive(helper)
    wait_for(lambda: engine in processes_of(third.id) or None, 10, "the engine named by its run")
    from prefect import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(third.id, Cancelling(), force=True)
    state = _final(third.id, timeout=90)
    assert state.is_cancelled(), (state, log())
    wait_for(lambda: processes_of(third.id) == [] or None, 30, "the run's processes to end")
    assert not _alive(engine)
    wait_for(lambda: not _alive(helper) or None, 30, "the flow's own subprocess to end")

    # Stopped, `uncool worker` leaves no warm server and no socket behind.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, log()
    assert not _alive(server_pid)
    socket_line = re.search(r"socket (\S+)", log())
    assert socket_line and not Path(socket_line.group(1)).parent.exists()


def _read_run(flow_run_id: object) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
