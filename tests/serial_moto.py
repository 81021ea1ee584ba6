"""A moto S3 server that answers one request at a time, for tests of conditional writes.

NOTE: moto checks ``If-None-Match`` / ``If-Match`` and then writes, in two
steps, and its usual server (``ThreadedMotoServer``, one thread per request)
can interleave two requests between them: both conditional PUTs succeed. S3
itself decides a conditional write atomically. A server that handles requests
one after another makes moto's check-then-write atomic, as S3's is, so a test
of the locks exercises our protocol and not moto's race.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import boto3
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


@contextlib.contextmanager
def serial_moto(bucket: str) -> Iterator[str]:
    """A single-threaded moto S3 on a free loopback port with ``bucket``; yields the endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = make_server("127.0.0.1", port, DomainDispatcherApplication(create_backend_app),
                         threaded=False, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.shutdown()
        thread.join()
