"""A local Prefect server for demos and laptops: found, or started in the background.

The ephemeral server (no ``PREFECT_API_URL``) costs seconds per process and
prints shutdown tracebacks; every run of the demo would pay it. Instead we use
the configured server, or one already listening on 127.0.0.1:4200, or start
``prefect server start`` in the background with its pid, port and log under the
project state folder (``.uncool/server/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 4200
LOCAL_API_URL = f"http://127.0.0.1:{DEFAULT_PORT}/api"
START_TIMEOUT_S = 90.0


class ServerError(RuntimeError):
    """The Prefect server could not be found or started."""


@dataclass(frozen=True)
class ServerInfo:
    api_url: str
    pid: int | None  # None when we did not start it
    log: Path | None

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _state_file(state_dir: Path) -> Path:
    return state_dir / "server" / "server.json"


def _read_state(state_dir: Path) -> dict[str, object] | None:
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads(_state_file(state_dir).read_text()))
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(state_dir: Path) -> ServerInfo | None:
    """The server we started earlier, if it is still up."""
    state = _read_state(state_dir)
    if not state:
        return None
    api_url, pid = str(state["api_url"]), int(state["pid"])  # type: ignore[call-overload]
    if _pid_alive(pid) and is_healthy(api_url):
        return ServerInfo(api_url, pid, Path(str(state["log"])))
    return None


def start(state_dir: Path, port: int | None = None, timeout: float = START_TIMEOUT_S) -> ServerInfo:
    """Start ``prefect server start`` in the background and wait until it is healthy."""
    running = status(state_dir)
    if running is not None:
        return running
    if port is None:
        port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port()
    server_dir = state_dir / "server"
    server_dir.mkdir(parents=True, exist_ok=True)
    log_path = server_dir / "server.log"
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    command = [prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
    _state_file(state_dir).write_text(
        json.dumps({"api_url": api_url, "pid": process.pid, "log": str(log_path)})
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(
                f"`prefect server start` exited with code {process.returncode}; "
                f"see its log at {log_path}"
            )
        if is_healthy(api_url, timeout=1.0):
            return ServerInfo(api_url, process.pid, log_path)
        time.sleep(0.3)
    stop(state_dir)
    raise ServerError(
        f"the Prefect server did not become healthy on {api_url} within {timeout:.0f} s; "
        f"see its log at {log_path}"
    )


def stop(state_dir: Path) -> bool:
    """Stop the server we started; True if one was running."""
    state = _read_state(state_dir)
    if not state:
        return False
    pid = int(state["pid"])  # type: ignore[call-overload]
    stopped = False
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        stopped = True
    _state_file(state_dir).unlink(missing_ok=True)
    return stopped


def prefect_executable() -> str:
    """The ``prefect`` command of this virtualenv, else the one on PATH."""
    local = Path(sys.executable).with_name("prefect")
    return str(local) if local.exists() else "prefect"


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment, else from Prefect's profile; None if unset."""
    configured = os.environ.get("PREFECT_API_URL")
    if not configured:
        from prefect.settings import PREFECT_API_URL

        configured = PREFECT_API_URL.value()
    return configured or None


def ensure(state_dir: Path) -> ServerInfo:
    """The API to use: ``PREFECT_API_URL`` if set, a local server, or a new one."""
    configured = configured_api_url()
    if configured:
        if not is_healthy(configured, timeout=5.0):
            raise ServerError(
                f"PREFECT_API_URL is {configured} but no Prefect server answers there; "
                "start it, or unset PREFECT_API_URL to let uncool start a local one"
            )
        return ServerInfo(configured, None, None)
    if is_healthy(LOCAL_API_URL):
        return ServerInfo(LOCAL_API_URL, None, None)
    return start(state_dir)
