"""Benchmark: ``ObjectStore.put_file`` on S3 against a raw s3fs ``put_file``.

Usage::

    .venv/bin/python bench/s3_put.py [--size-mib 256] [--repeat 3]

Starts its own moto ``ThreadedMotoServer`` on a free loopback port, creates a
bucket, writes one random file, then measures, best of ``--repeat``:

(a) raw s3fs: ``S3FileSystem(...).put_file(local, "bucket/key")``, default settings;
(b) ours, cold: ``ObjectStore("s3://bucket/prefix").put_file(local)`` with an
    empty stat cache and a new prefix each time, so it hashes the file and
    uploads it (no dedup);
(c) ours again, same file: the object exists, so no upload. Timed twice: with
    the stat cache (no hashing, one HEAD) and with a fresh stat cache (hash,
    then one HEAD).

Each measured put runs in a fresh Python process and moto runs in its own
process too (it keeps every object in memory): so the peak-RSS growth printed
is that of the uploading process alone, not moto's or an earlier run's heap.
Moto is reset between runs. Throughput is in MB/s (10**6 bytes per second).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BUCKET = "uncool-bench"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MB = 1_000_000


# -- measuring -------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


class PeakRss:
    """Peak resident memory above the level at entry, during a ``with`` block.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) where it
    can and samples RSS every 2 ms as well, keeping the larger of the two.
    """

    def __enter__(self) -> PeakRss:
        self.hwm_reset = False
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        hwm = _vm_hwm() if self.hwm_reset else None
        if hwm is not None:
            self.peak = max(self.peak, hwm)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _options(endpoint: str) -> dict[str, Any]:
    return {"key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def _child_raw(args: argparse.Namespace) -> dict[str, Any]:
    import s3fs

    fs = s3fs.S3FileSystem(**_options(args.endpoint))  # s3fs defaults otherwise
    with PeakRss() as mem:
        started = time.perf_counter()
        fs.put_file(args.file, f"{BUCKET}/{args.key}")
        seconds = time.perf_counter() - started
    size = fs.info(f"{BUCKET}/{args.key}")["size"]
    return {"seconds": seconds, "rss_growth": mem.growth, "stored": size}


def _child_ours(args: argparse.Namespace) -> dict[str, Any]:
    from uncool_prefect.store import ObjectStore

    state = Path(args.state)
    store = ObjectStore(f"s3://{BUCKET}/{args.key}", storage_options=_options(args.endpoint),
                        state_dir=state / "cold")
    uploads = _count_uploads(store)
    with PeakRss() as mem:
        started = time.perf_counter()
        ref = store.put_file(args.file)
        cold = time.perf_counter() - started
    cold_uploads = uploads[0]

    started = time.perf_counter()
    again = store.put_file(args.file)  # same path, unchanged: stat cache hit
    cached = time.perf_counter() - started

    fresh = ObjectStore(f"s3://{BUCKET}/{args.key}", storage_options=_options(args.endpoint),
                        state_dir=state / "fresh")
    fresh_uploads = _count_uploads(fresh)
    started = time.perf_counter()
    rehashed = fresh.put_file(args.file)  # no stat cache: hash, find it, skip
    rehash = time.perf_counter() - started

    assert ref.oid == again.oid == rehashed.oid
    stat = store.backend.stat(store._rel(ref.oid))
    return {
        "seconds": cold, "rss_growth": mem.growth, "stored": stat.size if stat else -1,
        "cold_uploads": cold_uploads, "dedup_cached_seconds": cached,
        "dedup_rehash_seconds": rehash,
        "dedup_uploads": uploads[0] - cold_uploads + fresh_uploads[0],
    }


def _count_uploads(store: Any) -> list[int]:
    """Count the backend's uploads (put_local_file/write_bytes) of ``store``."""
    counter = [0]
    backend = store.backend
    for name in ("put_local_file", "write_bytes"):
        original = getattr(backend, name)

        def counted(*a: Any, _original: Any = original, **k: Any) -> Any:
            counter[0] += 1
            return _original(*a, **k)

        setattr(backend, name, counted)
    return counter


def _serve_moto(port: int) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()


# -- orchestrating --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--_moto", str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("moto did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _reset(endpoint: str) -> None:
    """Drop everything moto holds (it is all in memory), then recreate the bucket."""
    import boto3

    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=30).close()
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket=BUCKET
    )


def _run_child(case: str, endpoint: str, file: Path, key: str, state: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--_case", case, "--_endpoint", endpoint,
         "--_file", str(file), "--_key", key, "--_state", str(state)],
        check=True, capture_output=True, text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _write_random(path: Path, size: int) -> None:
    block = 16 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def _mb_s(size: int, seconds: float) -> float:
    return size / MB / seconds if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="file size (MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; best is kept")
    for hidden in ("--_moto", "--_case", "--_endpoint", "--_file", "--_key", "--_state"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.update(CREDENTIALS)

    if args._moto:
        _serve_moto(int(args._moto))
        return 0
    if args._case:
        args.endpoint, args.file, args.key, args.state = (
            args._endpoint, args._file, args._key, args._state)
        result = _child_raw(args) if args._case == "raw" else _child_ours(args)
        print(json.dumps(result))
        return 0

    import botocore
    import s3fs

    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="uncool-bench-s3-"))
    try:
        source = work / "random.bin"
        _write_random(source, size)
        raw: list[dict[str, Any]] = []
        ours: list[dict[str, Any]] = []
        with moto_server() as endpoint:
            for i in range(args.repeat):
                _reset(endpoint)
                raw.append(_run_child("raw", endpoint, source, f"raw/{i}", work))
                _reset(endpoint)
                ours.append(_run_child("ours", endpoint, source, f"ours-{i}",
                                       work / f"state-{i}"))
        for result in raw + ours:
            assert result["stored"] == size, result
        assert all(r["cold_uploads"] == 1 and r["dedup_uploads"] == 0 for r in ours), ours

        best_raw = min(r["seconds"] for r in raw)
        best_ours = min(r["seconds"] for r in ours)
        best_cached = min(r["dedup_cached_seconds"] for r in ours)
        best_rehash = min(r["dedup_rehash_seconds"] for r in ours)
        raw_rate, ours_rate = _mb_s(size, best_raw), _mb_s(size, best_ours)

        print(f"S3 put of a {args.size_mib} MiB random file to moto on loopback "
              f"(best of {args.repeat}; MB/s = 10^6 bytes/s)")
        print(f"s3fs {s3fs.__version__}, botocore {botocore.__version__}, "
              f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
              "moto in its own process, each put in a fresh process")
        print()
        header = f"{'case':<44} {'best s':>8} {'MB/s':>9} {'vs raw':>7} {'peak RSS +MiB':>14}"
        print(header)
        print("-" * len(header))

        def row(name: str, seconds: float, rss: list[int] | None) -> None:
            rate = _mb_s(size, seconds)
            mem = f"{max(rss) / (1 << 20):.0f}" if rss else "-"
            print(f"{name:<44} {seconds:>8.3f} {rate:>9.1f} {rate / raw_rate:>6.2f}x {mem:>14}")

        row("(a) raw s3fs fs.put_file (defaults)", best_raw, [r["rss_growth"] for r in raw])
        row("(b) ObjectStore.put_file, cold (hash+upload)", best_ours,
            [r["rss_growth"] for r in ours])
        row("(c) ours again: dedup, stat cache hit", best_cached, None)
        row("(c') ours again: dedup, re-hash, no upload", best_rehash, None)
        print()
        print("runs (s):  raw " + " ".join(f"{r['seconds']:.3f}" for r in raw)
              + " | ours " + " ".join(f"{r['seconds']:.3f}" for r in ours))
        print("peak RSS growth is the worst of the runs; (c) uploads counted: "
              f"{sum(r['dedup_uploads'] for r in ours)}")
        verdict = "met" if ours_rate / raw_rate >= 0.9 else "NOT met"
        print(f"ours/raw throughput: {ours_rate / raw_rate:.2f}x (goal >= 0.90x: {verdict})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
