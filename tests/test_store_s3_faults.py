"""S3 faults over real HTTP: a proxy between the store and moto injects errors.

The proxy is a plain threaded ``http.server`` on loopback that forwards every
request to the moto endpoint, except those a test tells it to answer itself
with a canned S3 error (500 InternalError, 503 SlowDown, 403 AccessDenied) or
to drop (close the connection without an answer). It records every request,
so the tests can count attempts: botocore's standard retry mode, set up by the
store, must retry 5xx and SlowDown a bounded number of times, and never 403 or
a missing bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from uncool_prefect.store import (
    ObjectStore,
    StoreError,
    StorePermissionError,
    StoreUnavailableError,
)
from uncool_prefect.store.backends import S3_PART_SIZE

MAX_ATTEMPTS = 4  # what the store configures (botocore standard mode)
BOUNDED_S = 30.0
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding",
    "upgrade", "expect", "content-length",
}
_MESSAGES = {
    "InternalError": "We encountered an internal error. Please try again.",
    "SlowDown": "Please reduce your request rate.",
    "AccessDenied": "Access Denied",
}


# -- the proxy -------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One request the proxy saw, and what it did with it."""

    method: str
    path: str
    query: dict[str, list[str]]
    answer: int | str  # the upstream's (or injected) status, or "dropped"

    @property
    def key(self) -> str:
        """``bucket/key`` of the request (path-style addressing)."""
        return self.path.lstrip("/")


def is_put_object(r: Request) -> bool:
    return r.method == "PUT" and "partNumber" not in r.query and "uploadId" not in r.query


def is_upload_part(r: Request) -> bool:
    return r.method == "PUT" and "partNumber" in r.query


def is_get_object(r: Request) -> bool:
    return r.method == "GET" and "list-type" not in r.query and r.key.count("/") >= 1


def is_any(r: Request) -> bool:
    return True


@dataclass
class Fault:
    when: Callable[[Request], bool]
    status: int  # 0: drop the connection without an answer
    code: str
    times: int | None  # None: every matching request
    hits: int = 0

    def take(self, request: Request) -> bool:
        if not self.when(request) or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True


@dataclass
class FaultProxy:
    upstream: str
    seen: list[Request] = field(default_factory=list, repr=False)
    faults: list[Fault] = field(default_factory=list, repr=False)
    delays: list[tuple[Callable[[Request], bool], float]] = field(default_factory=list, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    url: str = ""

    def fail(self, status: int, code: str, *, when: Callable[[Request], bool] = is_any,
             times: int | None = None) -> Fault:
        """Answer matching requests (the first ``times`` of them) with an S3 error."""
        fault = Fault(when, status, code, times)
        with self.lock:
            self.faults.append(fault)
        return fault

    def drop(self, *, when: Callable[[Request], bool] = is_any,
             times: int | None = None) -> Fault:
        """Close the connection of matching requests without answering."""
        return self.fail(0, "dropped", when=when, times=times)

    def slow(self, seconds: float, *, when: Callable[[Request], bool] = is_any) -> None:
        """Hold matching requests this long before passing them on."""
        with self.lock:
            self.delays.append((when, seconds))

    def heal(self) -> None:
        with self.lock:
            self.faults.clear()
            self.delays.clear()

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.delays.clear()
            self.seen.clear()

    def count(self, when: Callable[[Request], bool] = is_any) -> int:
        with self.lock:
            return sum(1 for r in self.seen if when(r))

    def requests(self) -> list[Request]:
        with self.lock:
            return list(self.seen)

    def _decide(self, method: str, target: str) -> tuple[Request, Fault | None]:
        split = urlsplit(target)
        probe = Request(method, split.path, parse_qs(split.query, keep_blank_values=True), 0)
        with self.lock:
            fault = next((f for f in self.faults if f.take(probe)), None)
            delay = sum(seconds for when, seconds in self.delays if when(probe))
        time.sleep(delay)
        return probe, fault

    def _record(self, request: Request, answer: int | str) -> None:
        with self.lock:
            self.seen.append(Request(request.method, request.path, request.query, answer))


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, proxy: FaultProxy) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.proxy = proxy
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue, as a real S3
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        proxy = self.server.proxy
        request, fault = proxy._decide(self.command, self.path)
        if fault is None:
            self._forward(body, lambda status: proxy._record(request, status))
        elif fault.status == 0:
            proxy._record(request, "dropped")
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        else:
            proxy._record(request, fault.status)
            self._send_error(fault, request)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def _send_error(self, fault: Fault, request: Request) -> None:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{fault.code}</Code>"
            f"<Message>{_MESSAGES.get(fault.code, fault.code)}</Message>"
            f"<Resource>{request.path}</Resource>"
            "<RequestId>FAULTPROXY</RequestId></Error>"
        ).encode()
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", "FAULTPROXY")
        if fault.code == "SlowDown":
            self.send_header("Retry-After", "1")
        if self.command == "HEAD":
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        self.wfile.write(xml)

    def _forward(self, body: bytes, record: Callable[[int], None]) -> None:
        upstream = urlsplit(self.server.proxy.upstream)
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            headers = response.getheaders()
        finally:
            conn.close()
        record(response.status)  # before the client can see the answer
        self.send_response_only(response.status, response.reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":
            length = response.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of moto, on a free loopback port."""
    state = FaultProxy(upstream=s3_endpoint)
    server = _ProxyServer(state)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True, name="s3-fault-proxy")
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.close_all()
        server.server_close()
        thread.join(timeout=5)


# -- helpers -----------------------------------------------------------------------

def _options(endpoint: str) -> dict[str, Any]:
    # NOTE: a fresh S3FileSystem per store: fsspec's instance cache would hand a
    # later test a client with keep-alive connections to a proxy that is gone.
    return {"key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def _store(endpoint: str, bucket: str, tmp_path: Path) -> ObjectStore:
    return ObjectStore(f"s3://{bucket}/store", storage_options=_options(endpoint),
                       state_dir=tmp_path / "state")


def _moto(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _key_of(store: ObjectStore, oid: str) -> str:
    url = store.url_of(oid)
    return url.split("://", 1)[1].split("/", 1)[1]


def _exists(endpoint: str, bucket: str, key: str) -> bool:
    found = _moto(endpoint).list_objects_v2(Bucket=bucket, Prefix=key)
    return any(item["Key"] == key for item in found.get("Contents", []))


def _all_keys(endpoint: str, bucket: str) -> list[str]:
    found = _moto(endpoint).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in found.get("Contents", []))


def _write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def _oid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- 1. transient 5xx are retried, a bounded number of times ------------------------

@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (503, "SlowDown")])
def test_transient_error_then_success_is_retried(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path, status: int, code: str
) -> None:
    store = _store(proxy.url, s3_bucket, tmp_path)

    proxy.fail(status, code, when=is_put_object, times=1)
    payload = os.urandom(50_000)
    ref = store.put_bytes(payload)
    assert proxy.count(is_put_object) == 2  # the failure, then the retry
    assert _exists(proxy.upstream, s3_bucket, _key_of(store, ref.oid))

    proxy.reset()
    proxy.fail(status, code, when=is_put_object, times=1)
    source = tmp_path / "model.bin"
    file_payload = _write(source, 300_000)
    file_ref = store.put_file(source)
    assert file_ref.oid == _oid(file_payload)
    assert proxy.count(is_put_object) == 2

    proxy.reset()
    proxy.fail(status, code, when=is_get_object, times=1)
    assert store.get_bytes(ref.oid) == payload
    assert proxy.count(is_get_object) >= 2
    assert next(r.answer for r in proxy.requests() if is_get_object(r)) == status

    proxy.reset()
    proxy.fail(status, code, when=lambda r: r.method == "HEAD", times=1)
    assert store.has(file_ref.oid)


def test_transient_error_on_a_multipart_part_is_retried(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(proxy.url, s3_bucket, tmp_path)
    source = tmp_path / "big.bin"
    payload = _write(source, 2 * S3_PART_SIZE + 123)
    proxy.fail(500, "InternalError",
               when=lambda r: is_upload_part(r) and r.query["partNumber"] == ["2"], times=1)
    ref = store.put_file(source)
    assert proxy.count(is_upload_part) == 4  # 3 parts, part 2 twice
    key = _key_of(store, ref.oid)
    body = _moto(proxy.upstream).get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert body == payload


def test_persistent_500_gives_up_after_bounded_attempts(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(proxy.url, s3_bucket, tmp_path)
    proxy.fail(500, "InternalError", when=is_put_object)
    payload = os.urandom(10_000)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        store.put_bytes(payload)
    elapsed = time.monotonic() - started
    assert 1 < proxy.count(is_put_object) <= MAX_ATTEMPTS
    assert elapsed < BOUNDED_S
    assert proxy.url in str(info.value)
    assert _all_keys(proxy.upstream, s3_bucket) == []


def test_persistent_500_on_read_is_store_unavailable(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(proxy.url, s3_bucket, tmp_path)
    ref = store.put_bytes(b"read me " * 1000)
    proxy.fail(500, "InternalError", when=is_get_object)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        store.get_bytes(ref.oid)
    assert 1 < proxy.count(is_get_object) <= MAX_ATTEMPTS
    assert time.monotonic() - started < BOUNDED_S


# -- 2. 403 is permanent: one attempt, a clear error ---------------------------------

def test_access_denied_on_put_is_one_attempt_and_a_permission_error(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(proxy.url, s3_bucket, tmp_path)
    proxy.fail(403, "AccessDenied", when=is_put_object)
    payload = os.urandom(1000)
    with pytest.raises(StorePermissionError) as info:
        store.put_bytes(payload)
    assert isinstance(info.value, PermissionError)
    assert proxy.count(is_put_object) == 1
    message = str(info.value)
    assert store.url_of(_oid(payload)) in message
    assert "credentials" in message

    source = tmp_path / "f.bin"
    _write(source, 20_000)
    proxy.reset()
    proxy.fail(403, "AccessDenied", when=is_put_object)
    with pytest.raises(StorePermissionError):
        store.put_file(source)
    assert proxy.count(is_put_object) == 1
    assert _all_keys(proxy.upstream, s3_bucket) == []


def test_access_denied_on_read_is_one_attempt_and_a_permission_error(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(proxy.url, s3_bucket, tmp_path)
    ref = store.put_bytes(b"secret " * 100)
    proxy.fail(403, "AccessDenied", when=is_get_object)
    with pytest.raises(StorePermissionError) as info:
        store.get_bytes(ref.oid)
    assert proxy.count(is_get_object) == 1
    assert "credentials" in str(info.value)


def test_access_denied_on_every_request_is_one_attempt(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    """Bad credentials: even the first HEAD is refused (S3 answers 403, no body)."""
    store = _store(proxy.url, s3_bucket, tmp_path)
    proxy.fail(403, "AccessDenied")
    started = time.monotonic()
    with pytest.raises(StorePermissionError) as info:
        store.put_bytes(b"x")
    assert time.monotonic() - started < 5
    assert proxy.count(lambda r: r.method == "PUT") == 0
    counts: dict[tuple[str, str], int] = {}
    for r in proxy.requests():
        counts[(r.method, r.path)] = counts.get((r.method, r.path), 0) + 1
    assert all(n == 1 for n in counts.values()), counts
    assert "credentials" in str(info.value)


# -- 3. a bucket that does not exist -------------------------------------------------

def test_missing_bucket_is_a_clear_error_without_retries(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(proxy.url, "no-such-bucket-here", tmp_path)
    source = tmp_path / "f.bin"
    _write(source, 1000)
    for attempt in (lambda: store.put_bytes(b"hello"), lambda: store.put_file(source),
                    lambda: store.get_bytes(_oid(b"hello"))):
        proxy.reset()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            attempt()
        assert time.monotonic() - started < 5
        message = str(info.value)
        assert "no-such-bucket-here" in message
        assert "does not exist" in message
        requests = proxy.requests()
        assert requests, "the store should have asked S3"
        assert not any(r.method == "PUT" for r in requests)
        paths = [(r.method, r.path, tuple(sorted(r.query))) for r in requests]
        assert len(paths) == len(set(paths)), f"retried: {paths}"


# -- 4. S3 gone --------------------------------------------------------------------

def _dead_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_s3_gone_is_store_unavailable_naming_the_endpoint(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    dead = _dead_endpoint()
    store = _store(dead, s3_bucket, tmp_path)
    payload = os.urandom(5000)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        store.put_bytes(payload)
    assert time.monotonic() - started < BOUNDED_S
    assert dead in str(info.value)

    real = _store(s3_endpoint, s3_bucket, tmp_path / "real")
    assert not _exists(s3_endpoint, s3_bucket, _key_of(real, _oid(payload)))
    assert not real.has(_oid(payload))


def test_an_endpoint_from_the_environment_is_the_one_errors_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_ENDPOINT_URL (the README's way to MinIO) is where requests go: errors say so."""
    dead = _dead_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    store = ObjectStore("s3://bucket/prefix", state_dir=tmp_path / "state",
                        storage_options={"key": "testing", "secret": "testing"})
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        store.has("0" * 64)
    assert time.monotonic() - started < BOUNDED_S
    assert f"(endpoint {dead})" in str(info.value) and "AWS S3" not in str(info.value)


def test_connection_dropped_mid_upload_is_store_unavailable(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    """S3 goes away while the body is being sent: retried, then a clear error."""
    store = _store(proxy.url, s3_bucket, tmp_path)
    proxy.drop(when=is_put_object)
    payload = os.urandom(200_000)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        store.put_bytes(payload)
    assert time.monotonic() - started < BOUNDED_S
    # NOTE: aiohttp itself resends an idempotent request (PUT) once when the
    # server hangs up on it, so each botocore attempt may be two on the wire.
    assert 1 < proxy.count(is_put_object) <= 2 * MAX_ATTEMPTS
    assert proxy.url in str(info.value)
    assert _all_keys(proxy.upstream, s3_bucket) == []


# -- 5. multipart upload failing mid-way ----------------------------------------------

def test_multipart_failing_mid_way_is_aborted(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(proxy.url, s3_bucket, tmp_path)
    source = tmp_path / "big.bin"
    payload = _write(source, 2 * S3_PART_SIZE + 4 * (1 << 20))  # 3 parts
    proxy.fail(403, "AccessDenied",
               when=lambda r: is_upload_part(r) and r.query["partNumber"] != ["1"])
    # Part 1 is still on its way when part 2 is refused.
    proxy.slow(1.0, when=lambda r: is_upload_part(r) and r.query["partNumber"] == ["1"])
    with pytest.raises(StoreError) as info:
        store.put_file(source)
    assert isinstance(info.value, StorePermissionError)
    assert proxy.count(lambda r: r.method == "POST" and "uploads" in r.query) == 1
    # 403 is permanent: parts 2 and 3 were each tried once.
    failed = [r for r in proxy.requests() if is_upload_part(r) and r.answer == 403]
    assert sorted(r.query["partNumber"][0] for r in failed) == ["2", "3"]
    # The abort comes once every part has its answer: none can land after it.
    seen = proxy.requests()
    aborts = [i for i, r in enumerate(seen) if r.method == "DELETE" and "uploadId" in r.query]
    assert len(aborts) == 1
    assert [r.query["partNumber"][0] for r in seen[aborts[0]:] if is_upload_part(r)] == []
    assert sorted(r.query["partNumber"][0] for r in seen if is_upload_part(r)) == ["1", "2", "3"]

    key = _key_of(store, _oid(payload))
    assert not _exists(proxy.upstream, s3_bucket, key)
    pending = _moto(proxy.upstream).list_multipart_uploads(Bucket=s3_bucket)
    assert pending.get("Uploads", []) == []
    assert not store.has(_oid(payload))


# -- 6. dedup on S3 ------------------------------------------------------------------

def test_existing_object_is_not_uploaded_again(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(proxy.url, s3_bucket, tmp_path)
    payload = os.urandom(100_000)
    source = tmp_path / "a.bin"
    source.write_bytes(payload)
    first = store.put_file(source)
    assert proxy.count(lambda r: r.method in ("PUT", "POST")) == 1

    proxy.reset()
    copy = tmp_path / "b.bin"
    copy.write_bytes(payload)
    assert store.put_bytes(payload).oid == first.oid
    assert store.put_file(copy).oid == first.oid  # hashed, found, skipped
    assert store.put_file(source).oid == first.oid  # stat cache hit
    assert proxy.count(lambda r: r.method in ("PUT", "POST")) == 0
    assert proxy.count() > 0  # it did ask S3 whether the object is there

    # A fresh store (no stat cache) on the same bucket dedups too.
    other = _store(proxy.url, s3_bucket, tmp_path / "other")
    proxy.reset()
    assert other.put_file(source).oid == first.oid
    assert proxy.count(lambda r: r.method in ("PUT", "POST")) == 0



def test_gc_aborts_multipart_uploads_a_dead_writer_left(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """A writer killed mid-multipart leaves parts billed forever: gc ends those past the grace."""
    store = _store(s3_endpoint, s3_bucket, tmp_path)
    client = _moto(s3_endpoint)
    ours = "store/tmp/upload-of-a-writer-that-died"
    theirs = "elsewhere/not-the-store"
    for key in (ours, theirs):
        upload = client.create_multipart_upload(Bucket=s3_bucket, Key=key)
        client.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                           Body=os.urandom(1024))

    def pending() -> set[str]:
        return {u["Key"] for u in client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])}

    assert store.gc(grace=3600).aborted_uploads == []  # young: a writer may be at work
    assert store.gc(grace=0, dry_run=True).aborted_uploads == [ours]
    assert pending() == {ours, theirs}  # a dry run aborts nothing
    assert store.gc(grace=0).aborted_uploads == [ours]
    assert pending() == {theirs}  # outside the store's prefix: not ours to end


# -- a peer that stops reading mid-body --------------------------------------------

class StallingProxy:
    """A TCP proxy to moto that stops reading a connection's request after ``stall_after`` bytes
    (or, with ``stall_answers``, stops passing on its answer).

    The socket stays open and nothing is answered: what a dead middlebox or an
    overloaded endpoint looks like to a client sending a body. Its receive
    buffer is small, so the client's writes block soon after.
    """

    def __init__(self, upstream: str, stall_after: int, *, stall_answers: bool = False) -> None:
        host, port = urlsplit(upstream).hostname, urlsplit(upstream).port
        self.upstream = (str(host), int(port or 80))
        self.stall_after = stall_after
        self.stall_answers = stall_answers  # stop passing on the answer instead of the request
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self.sockets += [client, upstream]
            threading.Thread(target=self._forward, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._forward, args=(upstream, client, False), daemon=True).start()

    def _forward(self, source: socket.socket, target: socket.socket, request: bool) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while not self.stopped.is_set():
                if request != self.stall_answers and sent >= self.stall_after:
                    self.stopped.wait(0.1)  # keep the connection open; read nothing more
                    continue
                data = source.recv(64 << 10)
                if not data:
                    return
                target.sendall(data)
                sent += len(data)

    def close(self) -> None:
        self.stopped.set()
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.mark.parametrize("size", [10 << 20, 2 * S3_PART_SIZE + 1],
                         ids=["single-put", "multipart"])
def test_a_peer_that_stops_reading_mid_body_is_an_error_in_bounded_time(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Connect and read timeouts do not cover a body that stops moving: the send deadline does."""
    from uncool_prefect.store import backends

    monkeypatch.setattr(backends, "SEND_BASE_S", 1.0)
    monkeypatch.setattr(backends, "SEND_MIN_RATE", float(100 << 20))  # 0.1 s per 10 MiB
    proxy = StallingProxy(s3_endpoint, stall_after=1 << 20)
    try:
        store = _store(proxy.url, s3_bucket, tmp_path)
        source = tmp_path / "big.bin"
        source.write_bytes(os.urandom(size))
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            store.put_file(source)
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    # 3 tries of (1 s + size at 100 MiB/s): a few seconds, where it used to hang for good.
    assert elapsed < 3 * (1.0 + size / (100 << 20)) + 10, elapsed
    assert "stalled" in str(info.value) and proxy.url in str(info.value)
    real = _store(s3_endpoint, s3_bucket, tmp_path / "real")
    assert not real.has(hashlib.sha256(source.read_bytes()).hexdigest())  # nothing half-written


def test_an_answer_that_stops_mid_body_is_an_error_in_bounded_time_and_writes_nothing(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """A download whose bytes stop coming ends by the read timeout, retried, not never."""
    real = _store(s3_endpoint, s3_bucket, tmp_path / "real")
    payload = os.urandom(4 << 20)
    oid = real.put_bytes(payload).oid
    proxy = StallingProxy(s3_endpoint, stall_after=256 << 10, stall_answers=True)
    try:
        options = _options(proxy.url)
        options["config_kwargs"] = {"read_timeout": 1, "connect_timeout": 1}
        stalled = ObjectStore(f"s3://{s3_bucket}/store", storage_options=options,
                              state_dir=tmp_path / "state")
        dest = tmp_path / "out" / "payload.bin"
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            stalled.get_file(oid, dest)
        elapsed = time.monotonic() - started
        with pytest.raises(StoreUnavailableError), stalled.open(oid, verify_first=True) as stream:
            stream.read()
    finally:
        proxy.close()
    assert elapsed < 30, elapsed  # a few read timeouts of 1 s and retries, not a hang
    assert proxy.url in str(info.value)
    assert not dest.exists() and not list(dest.parent.glob("*"))  # no partial file left
