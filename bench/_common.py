"""What the benchmark scripts share: a Prefect server, the dvc virtualenv, the load average.

dvc is never a dependency of this project: it lives in bench/.work/dvc-venv,
created on first use and reused by every benchmark after that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

DVC_VENV = Path(__file__).resolve().parent / ".work" / "dvc-venv"


def dvc_bin() -> Path:
    """The dvc executable of the throwaway virtualenv, installing it once."""
    dvc = DVC_VENV / "bin" / "dvc"
    if dvc.exists():
        return dvc
    print(f"installing dvc into {DVC_VENV} (once; reused by later runs) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(DVC_VENV)], check=True)
    subprocess.run([str(DVC_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "dvc"],
                   check=True)
    return dvc


def loadavg() -> str:
    """The 1/5/15-minute load average, to tell a quiet machine from a busy one."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def run_line(script: str, started: str, dvc_version: str) -> str:
    """The first line of a benchmark's report: which script, when, on what."""
    return (f"{script}  started {started}  python {sys.version.split()[0]}  "
            f"cpus {os.cpu_count()}  dvc {dvc_version}")


def bin_path(name: str) -> str:
    """A console script of this virtualenv (prefect, uncool), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def prefect_server(prefect_home: Path) -> Iterator[str]:
    """A ``prefect server start`` on a free loopback port; stopped (whole group) on exit."""
    prefect_home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(prefect_home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = prefect_home / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not _healthy(api_url):
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy in 120 s; see {log_path}")
            time.sleep(0.3)
        yield api_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def dvc_env() -> dict[str, str]:
    """The environment dvc runs in: no analytics, no git prompt."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}


def init_dvc_repo(dvc: Path, repo: Path, site_cache: Path) -> None:
    """``git init`` + ``dvc init`` in ``repo``, with dvc's hash cache in ``site_cache``."""
    env = dvc_env()
    repo.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run([str(dvc), "init", "-q"], cwd=repo, check=True, env=env)
    for key, value in [("core.analytics", "false"), ("core.check_update", "false"),
                       ("core.site_cache_dir", str(site_cache))]:
        subprocess.run([str(dvc), "config", key, value], cwd=repo, check=True, env=env)
