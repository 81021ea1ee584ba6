"""Benchmark: snapshotting an S3 dataset prefix, as the watcher and get-data do.

Usage::

    .venv/bin/python bench/snapshot.py [--files 2000] [--repeat 3]

Starts moto in its own process (``s3_put.moto_server``), uploads ``--files``
small objects (one issue title each, the worked example's layout), then
times, best of ``--repeat``, side by side:

(a) baseline: the object-by-object copy the snapshot used before (one
    ``get_file`` after another), into an empty folder;
(b) ``snapshot_folder`` into an empty folder (one batched, concurrent ``get``);
(c) ``snapshot_folder`` again after one object was added: only that object is
    fetched, the others are linked from the previous snapshot by ETag.

Loopback moto answers a GET in a few milliseconds; a real S3 region takes tens,
so the ratios here understate what batching saves there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import loadavg
from s3_put import BUCKET, CREDENTIALS, moto_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="objects under the prefix")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)

    import s3fs

    from uncool_prefect.sources import snapshot_folder

    print(f"load average at start: {loadavg()}")
    with moto_server() as endpoint, tempfile.TemporaryDirectory() as work:
        options = {"client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.mkdir(BUCKET)
        prefix = f"{BUCKET}/issues"
        for i in range(args.files):
            label = ("bug", "enhancement", "question")[i % 3]
            fs.pipe(f"{prefix}/{label}/{i:06d}.txt", f"issue title number {i}\n".encode())
        url = f"s3://{prefix}"
        root = Path(work)

        def baseline() -> float:
            dest = root / "baseline"
            shutil.rmtree(dest, ignore_errors=True)
            started = time.perf_counter()
            for remote in sorted(fs.find(prefix)):
                target = dest / remote[len(prefix) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(target))
            return time.perf_counter() - started

        def cold() -> float:
            dest = root / "cold"
            shutil.rmtree(dest, ignore_errors=True)
            (root / ".cold.listing.json").unlink(missing_ok=True)
            started = time.perf_counter()
            snapshot_folder(url, dest, storage_options=options)
            return time.perf_counter() - started

        def one_new() -> float:
            dest = root / "warm"
            snapshot_folder(url, dest, storage_options=options)
            fs.pipe(f"{prefix}/bug/new-{time.time_ns()}.txt", b"one more issue\n")
            started = time.perf_counter()
            snapshot_folder(url, dest, storage_options=options)
            return time.perf_counter() - started

        a = min(baseline() for _ in range(args.repeat))
        b = min(cold() for _ in range(args.repeat))
        c = min(one_new() for _ in range(args.repeat))
    print(f"{args.files} objects, best of {args.repeat}:")
    print(f"  (a) object by object (before) : {a:7.3f} s   1.00x")
    print(f"  (b) snapshot, empty folder    : {b:7.3f} s   {a / b:5.2f}x faster")
    print(f"  (c) snapshot, one object new  : {c:7.3f} s   {a / c:5.2f}x faster")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
