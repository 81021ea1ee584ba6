"""Real servers on loopback for the tests: a Prefect server and a moto S3.

Environment is fixed here, before anything imports Prefect, so that the test
process and every subprocess it starts talk to the same server and none of
them touches the developer's ~/.prefect or ~/.cache.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_SESSION_DIR = Path(tempfile.mkdtemp(prefix="uncool-tests-"))
_PREFECT_PORT = _free_port()
PREFECT_API_URL = f"http://127.0.0.1:{_PREFECT_PORT}/api"

os.environ.update(
    {
        "PREFECT_HOME": str(_SESSION_DIR / "prefect-home"),
        "PREFECT_API_URL": PREFECT_API_URL,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true",
        "UNCOOL_HOME": str(_SESSION_DIR / "uncool-home"),
        "XDG_CACHE_HOME": str(_SESSION_DIR / "cache"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
os.environ.pop("UNCOOL_STORE", None)

BIN = Path(sys.executable).parent


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real `prefect server start` on a free loopback port; yields the API URL."""
    log_path = _SESSION_DIR / "prefect-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
             "--port", str(_PREFECT_PORT)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=os.environ.copy(),
        )
    try:
        deadline = time.monotonic() + 120
        while not _healthy(f"{PREFECT_API_URL}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Prefect server did not start; log:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield PREFECT_API_URL
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server over real HTTP on a free loopback port (as s3fs tests do)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on a freshly reset moto; returns its name."""
    import boto3

    request = urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="uncool-test")
    return "uncool-test"


def s3_options(endpoint: str) -> dict[str, object]:
    return {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The conformance target: the same tests run on a local folder and on S3."""
    from uncool_prefect.store import ObjectStore

    if request.param == "local":
        return ObjectStore(tmp_path / "store", state_dir=tmp_path / "state")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return ObjectStore(f"s3://{bucket}/store", storage_options=s3_options(endpoint),
                       state_dir=tmp_path / "state")
