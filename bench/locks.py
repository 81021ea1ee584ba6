"""Benchmark: what the stage lock costs, per stage, on a local folder and on S3 (moto).

Usage::

    .venv/bin/python bench/locks.py [--stages 40] [--rounds 3]

Starts its own Prefect server (bench/_common.py) and moto in a child process,
saves a ``ContentAddressedStorage`` block on each store (a new local folder
under ``bench/.work/locks/``, and ``s3://uncool-bench/locks`` on moto), and
runs one flow per store in which a trivial task (returns its argument) is
called ``--stages`` times with new arguments (uncached: computed, result
written) and then again with the same ones (Cached: result read back), for
two cache policies that differ only in the lock:

- ``unlocked``: ``ContentAware()`` (Prefect's default isolation, READ_COMMITTED);
- ``locked``: ``ContentAware().configure(isolation_level="SERIALIZABLE",
  lock_manager=block.lock_manager)``, what every ``@stage`` gets.

The two alternate, ``--rounds`` times, in the same flow run. Each figure is
the median over rounds of (elapsed / stages), timed around the task call in
the flow. Then the lock alone, without Prefect: ``acquire_lock`` +
``is_lock_holder`` + ``release_lock`` as the transaction makes them, and the
S3 requests the lock made per stage (counted on the store's s3fs client).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, prefect_server
from s3_put import moto_server

WORK = Path(__file__).resolve().parent / ".work" / "locks"
BUCKET = "uncool-bench"


@contextlib.contextmanager
def moto_with_bucket() -> Iterator[str]:
    """s3_put's moto server (a child process, so its work is not charged to ours), with a bucket."""
    import boto3

    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)
        yield endpoint


def _count_lock_requests(block: Any) -> list[int]:
    """Count the S3 requests on ``locks/`` made through the block store's s3fs client."""
    counter = [0]
    fs = getattr(block.store.backend, "fs", None)
    if fs is None:
        return counter
    original = fs._call_s3

    async def counted(method: str, *args: Any, **kwargs: Any) -> Any:
        if "/locks/" in str(kwargs.get("Key", "")):
            counter[0] += 1
        return await original(method, *args, **kwargs)

    fs._call_s3 = counted
    return counter


def measure(label: str, basepath: str, options: dict[str, Any], stages: int,
            rounds: int) -> dict[str, Any]:
    from prefect import flow, task

    from uncool_prefect.blocks import ContentAddressedStorage
    from uncool_prefect.caching import ContentAware

    block = ContentAddressedStorage(basepath=basepath, storage_options=options)
    block.save(f"bench-locks-{label}", overwrite=True)
    manager = block.lock_manager
    policies = {"unlocked": ContentAware(),
                "locked": ContentAware().configure(isolation_level="SERIALIZABLE",
                                                   lock_manager=manager)}
    tasks = {name: task(name=f"trivial-{name}", cache_policy=policy, result_storage=block,
                        persist_result=True)(_trivial)
             for name, policy in policies.items()}
    requests = _count_lock_requests(block)

    @flow(name=f"bench-locks-{label}")
    def run() -> dict[str, Any]:
        times: dict[tuple[str, str], list[float]] = {}
        counted: dict[str, int] = {"locked": 0, "unlocked": 0}
        for _ in range(rounds):
            for name, stage in tasks.items():
                salt = uuid.uuid4().hex
                for phase, expected in (("uncached", "Completed"), ("cached", "Cached")):
                    before = requests[0]
                    start = time.perf_counter()
                    for i in range(stages):
                        state = stage(i, salt, return_state=True)
                        if state.name != expected:
                            raise RuntimeError(f"{name} {phase} stage {i} was {state.name}")
                    elapsed = time.perf_counter() - start
                    times.setdefault((name, phase), []).append(elapsed / stages)
                    counted[name] += requests[0] - before
        return {"times": times, "requests": {k: v / (rounds * 2 * stages) for k, v in counted.items()}}

    result = run()
    result["alone"] = _lock_alone(manager, stages * rounds)
    return dict(result)


def _trivial(i: int, salt: str) -> int:
    return i


def _lock_alone(manager: Any, n: int) -> float:
    """Seconds per acquire + is_lock_holder + release, as one transaction makes them."""
    start = time.perf_counter()
    for i in range(n):
        key, holder = f"alone-{i}", uuid.uuid4().hex
        manager.acquire_lock(key, holder)
        manager.is_lock_holder(key, holder)
        manager.release_lock(key, holder)
    return (time.perf_counter() - start) / n


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def report(label: str, result: dict[str, Any]) -> None:
    times: dict[tuple[str, str], list[float]] = result["times"]
    for phase in ("uncached", "cached"):
        plain = statistics.median(times[("unlocked", phase)])
        locked = statistics.median(times[("locked", phase)])
        print(f"{label:<6} {phase:<9} {_ms(plain)} {_ms(locked)} {_ms(locked - plain)} "
              f"{(locked - plain) / plain * 100:6.1f}%   "
              f"[{' '.join(_ms(t).strip() for t in times[('unlocked', phase)])}] "
              f"[{' '.join(_ms(t).strip() for t in times[('locked', phase)])}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "XDG_CACHE_HOME": str(WORK / "cache"),
                       "PREFECT_LOGGING_LEVEL": "WARNING"})
    try:
        with prefect_server(WORK / "prefect-home") as api_url, moto_with_bucket() as endpoint:
            os.environ["PREFECT_API_URL"] = api_url
            os.environ["PREFECT_HOME"] = str(WORK / "prefect-home")
            import prefect

            import uncool_prefect.store.locks as locks_module

            print(f"lock cost per stage: {args.stages} stages x {args.rounds} rounds each, "
                  f"Prefect {prefect.__version__}, lease {locks_module.DEFAULT_LEASE_S:.0f} s")
            print(f"load average at start: {loadavg()}")
            stores: dict[str, tuple[str, dict[str, Any]]] = {
                "local": (str(WORK / "store"), {}),
                "moto": (f"s3://{BUCKET}/locks",
                         {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}),
            }
            results = {label: measure(label, url, options, args.stages, args.rounds)
                       for label, (url, options) in stores.items()}
            print(f"load average at end:   {loadavg()}")
            print()
            print("ms per stage (median of rounds); samples: [unlocked] [locked]")
            print(f"{'store':<6} {'stage':<9} {'unlocked':>8} {'locked':>8} {'cost':>8} {'cost %':>7}")
            for label, result in results.items():
                report(label, result)
            print()
            for label, result in results.items():
                requests = result["requests"]
                print(f"{label:<6} lock alone (acquire + is_lock_holder + release): "
                      f"{_ms(result['alone']).strip()} ms"
                      + (f"; S3 requests on locks/ per locked stage: {requests['locked']:.1f} "
                         f"(unlocked: {requests['unlocked']:.1f})" if label == "moto" else ""))
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
