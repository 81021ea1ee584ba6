"""Benchmark: ``ObjectStore.put`` on a local folder against ``dvc add`` and raw sha256.

Usage::

    .venv/bin/python bench/put_local.py [--size-mib 1024] [--files 20000]
        [--file-kib 4] [--repeat 3] [--skip-dvc] [--keep]

Everything lives under ``bench/.work/`` (gitignored). In one run it measures:

(a) one random file of ``--size-mib`` (1 GiB by default):
    - ours, cold: ``ObjectStore(fresh store, state_dir=fresh).put(file)``: no
      object and no stat cache, so the file is read, hashed and written;
    - ours, unchanged: the same put again, from a new ``ObjectStore`` on the
      same store and state dir (as a second process would): stat cache hit;
    - ``dvc add``, cold: in a scratch ``git init`` + ``dvc init`` repo with a
      fresh cache and a fresh site cache (dvc's own hash cache); the data is
      copied into the repo first (untimed; mtimes kept); unchanged: ``dvc add``
      again in that repo;
    - the limit: hashlib sha256 of the same file in 1 MiB reads, in-process;
    - peak RSS growth of a cold put, in a fresh subprocess: the peak resident
      set (VmHWM, reset with /proc/self/clear_refs right before the put, after
      a warm-up put of a tiny file) minus the resident set before the put.
(b) a folder of ``--files`` random files of ``--file-kib`` KiB each (20 subfolders),
    the same measurements but the RSS one.

Every figure is the median of ``--repeat`` runs; each cold run uses a store (or
dvc repo and cache) of its own. ``dvc add`` is timed as the user runs it, a
whole ``dvc`` process (its start-up alone is printed too); ours is timed
in-process. Before each timed run: ``os.sync()`` and a 1 s pause, so that
writeback of the previous run is not charged to the next.

NOTE on this VM's disk: the root file system is ext4 without a journal, where
creating a file skips inodes freed in the last minute or so, and that scan
costs up to ~200 us per create after tens of thousands of deletions. So this
script deletes nothing until all measurements are done, and a second run right
after the first (which deletes ~100k files when it cleans up) measures slower
cold folder puts, for dvc as much as for us: wait a minute or two between runs.

dvc is installed (``pip install dvc``) into a throwaway virtualenv,
``bench/.work/dvc-venv``, reused by later runs; it is never a dependency of
this project. ``--skip-dvc`` leaves it out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import dvc_bin, dvc_env, init_dvc_repo, loadavg, run_line

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
RUN = WORK / "put_local"
MiB = 1 << 20
CHUNK = 1 << 20

GOALS = {
    "file_cold": 1.0,
    "file_unchanged": 0.3,
    "dir_cold": 3.0,
    "dir_unchanged": 0.6,
    "rss_mib": 64.0,
}


# -- data ------------------------------------------------------------------------

def make_big_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    _age(path)


def make_small_files(root: Path, count: int, size: int) -> None:
    root.mkdir(parents=True)
    per_folder = max(1, -(-count // 20))
    for i in range(count):
        folder = root / f"d{i // per_folder:02d}"
        if i % per_folder == 0:
            folder.mkdir()
        with open(folder / f"f{i:06d}.bin", "wb") as f:
            f.write(os.urandom(size))
    _age(root)


def _age(path: Path) -> None:
    """Date the data a minute back: outside the stat cache's racy window (100 ms)."""
    then = time.time_ns() - 60 * 10**9
    targets = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for target in targets:
        os.utime(target, ns=(then, then))


# -- measuring ---------------------------------------------------------------------

def settle() -> None:
    os.sync()
    time.sleep(1.0)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    settle()
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(view[:n])
    return hasher.hexdigest()


class Runs:
    """Fresh, numbered folders for cold runs; nothing is deleted until the end."""

    def __init__(self) -> None:
        self.n = 0

    def fresh(self, label: str) -> Path:
        self.n += 1
        path = RUN / f"{label}-{self.n}"
        assert not path.exists()
        return path


def put_once(store_dir: Path, state_dir: Path, data: Path) -> Any:
    """One put, as a new process would do it: a new ObjectStore on the store."""
    from uncool_prefect.store import ObjectStore

    return ObjectStore(store_dir, state_dir=state_dir).put(data)


def ours(data: Path, repeat: int, runs: Runs, expect: str | None) -> dict[str, list[float]]:
    cold: list[float] = []
    unchanged: list[float] = []
    for _ in range(repeat):
        base = runs.fresh("ours")
        store_dir, state_dir = base / "store", base / "state"
        seconds, ref = timed(put_once, store_dir, state_dir, data)
        cold.append(seconds)
        if expect is not None:
            assert ref.oid == expect, (ref, expect)
        seconds, again = timed(put_once, store_dir, state_dir, data)
        assert again == ref, (again, ref)
        unchanged.append(seconds)
    return {"cold": cold, "unchanged": unchanged}


def sha256_compute(size: int) -> str:
    """sha256 of ``size`` bytes already in memory (one 1 MiB buffer, over and over)."""
    hasher = hashlib.sha256()
    block = os.urandom(CHUNK)
    for _ in range(size // CHUNK):
        hasher.update(block)
    return hasher.hexdigest()


def hashlib_limit(path: Path, repeat: int, expect: str) -> list[float]:
    out = []
    for _ in range(repeat):
        seconds, digest = timed(sha256_file, path)
        assert digest == expect
        out.append(seconds)
    return out


# NOTE: peak RSS is read as VmHWM (/proc/self/status), reset to the current RSS
# just before the put by writing 5 to /proc/self/clear_refs: "after - before" is
# the put's own growth. Not ru_maxrss: the kernel carries the *parent's* peak
# over fork+exec into the child's ru_maxrss (a child of a 300 MiB process starts
# at ru_maxrss 313 MiB here), and clear_refs does not reset that part, so a
# delta of ru_maxrss hides any growth below the parent's size.
_RSS_CHILD = """
import json, os, sys
from uncool_prefect.store import ObjectStore

def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field + " not in /proc/self/status")

store, state, warm, source = sys.argv[1:5]
s = ObjectStore(store, state_dir=state)
s.put(warm)  # load everything lazy first
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = status_kib("VmHWM")
ref = s.put(source)
after = status_kib("VmHWM")
print(json.dumps({"oid": ref.oid, "before_kib": before, "after_kib": after}))
"""


def rss_growth(path: Path, repeat: int, runs: Runs, expect: str) -> list[float]:
    out = []
    for _ in range(repeat):
        base = runs.fresh("rss")
        base.mkdir(parents=True)
        warm = base / "warm.txt"
        warm.write_bytes(b"warm up")
        settle()
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_RSS_CHILD), str(base / "store"),
             str(base / "state"), str(warm), str(path)],
            capture_output=True, text=True, check=True,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["oid"] == expect
        out.append((result["after_kib"] - result["before_kib"]) / 1024)
    return out


# -- dvc ---------------------------------------------------------------------------

def _copy_into(data: Path, repo: Path) -> Path:
    """Copy ``data`` (a file or a tree, with its mtimes) into ``repo``, untimed.

    NOTE: not hard links: dvc add on hard-linked files measured twice as slow
    here (16.9 s instead of 8.2 s cold for the 20k files), which is not what a
    user sees.
    """
    target = repo / data.name
    if data.is_file():
        shutil.copy2(data, target)
    else:
        shutil.copytree(data, target)
    return target


def dvc_repo(dvc: Path, data: Path, runs: Runs) -> tuple[Path, Path]:
    base = runs.fresh("dvc")
    repo = base / "repo"
    init_dvc_repo(dvc, repo, base / "site-cache")
    return repo, _copy_into(data, repo)


def dvc_add(dvc: Path, repo: Path, target: Path) -> None:
    subprocess.run([str(dvc), "add", "-q", target.name], cwd=repo, check=True,
                   env=dvc_env(), stdout=subprocess.DEVNULL)


def dvc_runs(data: Path, repeat: int, runs: Runs) -> dict[str, list[float]]:
    dvc = dvc_bin()
    cold: list[float] = []
    unchanged: list[float] = []
    for _ in range(repeat):
        repo, target = dvc_repo(dvc, data, runs)
        seconds, _ = timed(dvc_add, dvc, repo, target)
        cold.append(seconds)
        seconds, _ = timed(dvc_add, dvc, repo, target)
        unchanged.append(seconds)
    return {"cold": cold, "unchanged": unchanged}


def dvc_version(dvc: Path) -> str:
    return subprocess.run([str(dvc), "--version"], capture_output=True, text=True,
                          check=True, env=dvc_env()).stdout.strip()


def dvc_startup(repeat: int) -> tuple[str, list[float]]:
    dvc = dvc_bin()
    version = subprocess.run([str(dvc), "--version"], capture_output=True, text=True,
                             check=True, env=dvc_env()).stdout.strip()
    out = []
    for _ in range(repeat):
        seconds, _ = timed(dvc_version, dvc)
        out.append(seconds)
    return version, out


# -- report ------------------------------------------------------------------------

def med(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def fmt(seconds: float | None, unit: str = "s") -> str:
    if seconds is None:
        return "-"
    if unit == "MiB":
        return f"{seconds:.1f} MiB"
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def goal_cell(value: float | None, goal: float, unit: str = "s") -> str:
    if value is None:
        return ""
    verdict = "met" if value <= goal else "MISSED"
    return f"<= {goal:g} {unit}: {verdict}"


def samples(values: list[float] | None) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]" if values else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--file-kib", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-dvc", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="keep bench/.work/put_local (data, stores, dvc repos)")
    args = parser.parse_args()

    if RUN.exists():
        shutil.rmtree(RUN)
    RUN.mkdir(parents=True)
    runs = Runs()
    big = RUN / "data" / "big.bin"
    small = RUN / "data" / "small"
    size = args.size_mib * MiB
    print(f"preparing {size:,} random bytes and {args.files:,} x {args.file_kib} KiB files "
          f"under {RUN} ...", flush=True)
    make_big_file(big, size)
    make_small_files(small, args.files, args.file_kib * 1024)
    expect = sha256_file(big)
    if not args.skip_dvc:
        dvc_bin()

    try:
        # Warm up imports and lazy paths (not measured).
        from uncool_prefect.store import ObjectStore

        warm = RUN / "warm.txt"
        warm.write_bytes(b"warm")
        ObjectStore(runs.fresh("warm"), state_dir=runs.fresh("warm-state")).put(warm)

        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        load_at_start = loadavg()
        limit = hashlib_limit(big, args.repeat, expect)
        compute = [timed(sha256_compute, size)[0] for _ in range(args.repeat)]
        file_ours = ours(big, args.repeat, runs, expect)
        rss = rss_growth(big, args.repeat, runs, expect)
        file_dvc = None if args.skip_dvc else dvc_runs(big, args.repeat, runs)
        dir_ours = ours(small, args.repeat, runs, None)
        dir_dvc = None if args.skip_dvc else dvc_runs(small, args.repeat, runs)
        version, startup = ("-", None) if args.skip_dvc else dvc_startup(args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(RUN, ignore_errors=True)

    # -- print ------------------------------------------------------------------
    print()
    print(run_line("put_local.py", started, version))
    print(f"load average (1/5/15 min) before the timed part {load_at_start} (above ~0.3: "
          f"something else was running), after it {loadavg()} (this benchmark's own included)")
    print(f"median of {args.repeat}; samples in brackets; 'ours' in-process, "
          "'dvc add' a whole dvc process")
    width = 30
    header = f"{'':{width}} {'ours':>9} {'dvc add':>9} {'sha256 limit':>13}   goal for ours"
    gb = size / 1e9
    print()
    print(f"(a) one file of {size:,} bytes ({args.size_mib} MiB)")
    print(header)
    dvc_f = file_dvc or {}
    print(f"{'  cold':{width}} {fmt(med(file_ours['cold'])):>9} "
          f"{fmt(med(dvc_f.get('cold'))):>9} {fmt(med(limit)):>13}   "
          f"{goal_cell(med(file_ours['cold']), GOALS['file_cold'])}")
    print(f"{'  unchanged':{width}} {fmt(med(file_ours['unchanged'])):>9} "
          f"{fmt(med(dvc_f.get('unchanged'))):>9} {'':>13}   "
          f"{goal_cell(med(file_ours['unchanged']), GOALS['file_unchanged'])}")
    print(f"{'  peak RSS growth, cold put':{width}} {fmt(max(rss), 'MiB'):>9} "
          f"{'':>9} {'':>13}   {goal_cell(max(rss), GOALS['rss_mib'], 'MiB')} (max of runs)")
    print(f"  throughput, cold: ours {gb / med(file_ours['cold']):.2f} GB/s, "
          f"sha256 alone {gb / med(limit):.2f} GB/s"
          + (f", dvc add {gb / med(dvc_f['cold']):.2f} GB/s" if dvc_f else ""))
    print(f"  sha256 limit = read + hash in one thread (1 MiB reads); the hash alone, on "
          f"bytes already in memory: {fmt(med(compute))} {samples(compute)}")
    print(f"  samples: ours cold {samples(file_ours['cold'])} unchanged "
          f"{samples(file_ours['unchanged'])}; sha256 {samples(limit)}; "
          f"RSS MiB {samples(rss)}")
    if dvc_f:
        print(f"           dvc cold {samples(dvc_f['cold'])} unchanged "
              f"{samples(dvc_f['unchanged'])}")
    print()
    print(f"(b) a folder of {args.files:,} files x {args.file_kib} KiB")
    print(header)
    dvc_d = dir_dvc or {}
    print(f"{'  cold':{width}} {fmt(med(dir_ours['cold'])):>9} "
          f"{fmt(med(dvc_d.get('cold'))):>9} {'':>13}   "
          f"{goal_cell(med(dir_ours['cold']), GOALS['dir_cold'])}")
    print(f"{'  unchanged':{width}} {fmt(med(dir_ours['unchanged'])):>9} "
          f"{fmt(med(dvc_d.get('unchanged'))):>9} {'':>13}   "
          f"{goal_cell(med(dir_ours['unchanged']), GOALS['dir_unchanged'])}")
    print(f"  samples: ours cold {samples(dir_ours['cold'])} unchanged "
          f"{samples(dir_ours['unchanged'])}")
    if dvc_d:
        print(f"           dvc cold {samples(dvc_d['cold'])} unchanged "
              f"{samples(dvc_d['unchanged'])}")
    if startup:
        print()
        print(f"dvc start-up alone (`dvc --version`): {fmt(med(startup))} {samples(startup)}")


if __name__ == "__main__":
    main()
