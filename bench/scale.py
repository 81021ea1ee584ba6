"""Benchmark: snapshotting a dataset of 200,000 small files, ours against ``dvc add``.

Usage::

    .venv/bin/python bench/scale.py [--files 200000] [--file-kib 4] [--per-folder 1000]
        [--repeat 3] [--s3-files 20000] [--skip-dvc] [--skip-s3] [--profile] [--keep]

Everything lives under ``bench/.work/scale/`` (gitignored) and is deleted at
the end (``--keep`` keeps it). The data is ``--files`` random files of
``--file-kib`` KiB in folders of ``--per-folder``, dated a minute back
(outside the stat cache's 100 ms racy window). A snapshot is what ``uncool``
does for a dataset folder: ``ObjectStore(store, state_dir=...).put_dir(data)``.

Every put of ours runs in a fresh Python process (as a second ``uncool``
process would: a new ``ObjectStore``, the stat cache only on disk); the time
printed is that of ``ObjectStore(...)`` + ``put_dir`` inside it, imports
excluded. The figures:

- cold: a new local store and a new state dir (no object, no stat cache):
  every file is read, hashed and written into the store, durably;
- unchanged: the same put again (stat cache warm); the median of ``--repeat``;
- no stat cache: the same put with a new, empty state dir: every file is
  hashed again, nothing is written (no goal; what a new machine or a lost
  cache costs);
- one file added: a new file in the data, then the put again; ``--repeat``
  times (each adds one more file), median;
- peak RSS: the put's process peak resident set (VmHWM, which includes the
  interpreter and the imports), the worst of the cases; the growth during
  the put itself (VmHWM reset through ``/proc/self/clear_refs`` just before
  it) is printed beside it;
- phases: where the time of each put goes (walk, stat-cache lookup, hashing
  and writing objects, stat-cache record, manifest encoding and write),
  measured by wrapping the store's functions in the child process.

``dvc add`` runs on its own copy of the same data (copied untimed, mtimes
kept) in a new ``git init`` + ``dvc init`` repo with a new cache and site
cache, as ``put_local.py`` does: cold, unchanged (median of ``--repeat``) and
one file added, each a whole ``dvc`` process.

S3 (``--s3-files`` files, 20,000 by default because moto answers a few
thousand requests a second at best on 2 cores): the store on
``s3://<bucket>/<prefix>`` of a moto server in its own process
(``s3_put.moto_server``), the data in a local folder; cold, unchanged, one
file added, each once. Figures are reported, not held to a goal.

Before every timed run: ``os.sync()`` and a 1 s pause. Nothing is deleted
until every measurement is done (this VM's ext4 is slow to create files after
many deletions; see README.md). The clean-up deletes about a million files:
run ``sync`` and wait a couple of minutes before the next benchmark.
``--profile`` writes a cProfile listing of each put of ours under
``bench/.work/scale/profiles/`` (the timings then include the profiler's
overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import dvc_bin, dvc_env, init_dvc_repo, loadavg, run_line

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
RUN = WORK / "scale"

GOALS = {"cold": 30.0, "unchanged": 3.0, "added": 3.0, "rss_mib": 512.0}


# -- data --------------------------------------------------------------------------

def make_files(root: Path, count: int, size: int, per_folder: int) -> None:
    """``count`` random files of ``size`` bytes, ``per_folder`` to a folder, dated a minute back."""
    then = time.time_ns() - 60 * 10**9
    root.mkdir(parents=True)
    for i in range(count):
        folder = root / f"d{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir()
        with open(folder / f"f{i:07d}.bin", "wb") as f:
            f.write(os.urandom(size))
            os.utime(f.fileno(), ns=(then, then))


def add_file(root: Path, n: int, size: int) -> None:
    """A new file, dated now: what lands in a dataset between two snapshots."""
    (root / "d0000" / f"added-{n:03d}.bin").write_bytes(os.urandom(size))


def settle() -> None:
    os.sync()
    time.sleep(1.0)


# -- one put of ours, in a fresh process ---------------------------------------------

# Wrapped in the child to say where the time goes: (module, qualified name).
# A name that does not exist (any more) is skipped.
PHASES = [
    ("objects", "walk_files", "walk"),
    ("hashing", "StatCache.lookup_many", "cache lookup"),
    ("hashing", "StatCache.lookup_tree", "cache lookup"),
    ("objects", "ObjectStore._put_dir_local", "objects (hash+write)"),
    ("objects", "ObjectStore._put_dir_remote", "objects (hash+upload)"),
    ("hashing", "StatCache.record_many", "cache record"),
    ("hashing", "Manifest.to_bytes", "manifest encode"),
    ("objects", "ObjectStore.put_bytes", "manifest write"),
    ("backends", "LocalBackend.sync", "of which syncfs"),  # inside objects (hash+write)
]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _wrap_phases(totals: dict[str, float]) -> None:
    import importlib
    import inspect

    for module_name, qualname, label in PHASES:
        module = importlib.import_module(f"uncool_prefect.store.{module_name}")
        owner: Any = module
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        original = getattr(owner, name, None) if owner is not None else None
        if original is None:
            continue
        generator = inspect.isgeneratorfunction(original)

        def wrapped(*a: Any, _f: Any = original, _label: str = label,
                    _gen: bool = generator, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                # A generator's work happens while it is consumed: consume it here.
                return list(_f(*a, **k)) if _gen else _f(*a, **k)
            finally:
                totals[_label] = totals.get(_label, 0.0) + time.perf_counter() - started

        setattr(owner, name, wrapped)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from uncool_prefect.store import ObjectStore

    totals: dict[str, float] = {}
    _wrap_phases(totals)
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmHWM")
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    store = ObjectStore(spec["store"], state_dir=spec["state"],
                        storage_options=spec.get("options"))
    ref = store.put_dir(spec["data"])
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    if profiler is not None:
        import io
        import pstats

        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        Path(spec["profile"]).parent.mkdir(parents=True, exist_ok=True)
        Path(spec["profile"]).write_text(out.getvalue())
    return {"seconds": seconds, "oid": ref.name, "nfiles": ref.nfiles,
            "before_kib": before, "peak_kib": peak, "phases": totals}


def run_child(label: str, store: str, state: Path, data: Path, *, profile: bool,
              options: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = {"store": store, "state": str(state), "data": str(data), "options": options,
            "profile": str(RUN / "profiles" / f"{label}.txt") if profile else None}
    settle()
    proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"put ({label}) failed:\n{proc.stderr[-4000:]}")
    result = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    result["label"] = label
    print(f"  {label}: {result['seconds']:.3f} s (load {loadavg()})", file=sys.stderr, flush=True)
    return result


def ours_cases(data: Path, base: Path, args: argparse.Namespace, *, store: str | None = None,
               options: dict[str, Any] | None = None, tag: str = "local",
               no_cache: bool = True, repeat: int | None = None,
               ) -> dict[str, list[dict[str, Any]]]:
    repeat = args.repeat if repeat is None else repeat
    store = store or str(base / "store")
    state = base / "state"
    out: dict[str, list[dict[str, Any]]] = {"cold": [], "unchanged": [], "nocache": [],
                                            "added": []}
    cold = run_child(f"{tag}-cold", store, state, data, profile=args.profile, options=options)
    out["cold"].append(cold)
    assert cold["nfiles"] == count_files(data), cold
    for i in range(repeat):
        again = run_child(f"{tag}-unchanged-{i}", store, state, data, profile=args.profile,
                          options=options)
        assert again["oid"] == cold["oid"], (again, cold)
        out["unchanged"].append(again)
    if no_cache:
        fresh = run_child(f"{tag}-nocache", store, base / "state-empty", data,
                          profile=args.profile, options=options)
        assert fresh["oid"] == cold["oid"], (fresh, cold)
        out["nocache"].append(fresh)
    for i in range(repeat):
        add_file(data, i, args.file_kib * 1024)
        added = run_child(f"{tag}-added-{i}", store, state, data, profile=args.profile,
                          options=options)
        assert added["nfiles"] == cold["nfiles"] + i + 1, added
        out["added"].append(added)
    return out


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


# -- dvc ---------------------------------------------------------------------------

def dvc_prepare(data: Path, base: Path) -> tuple[Path, Path]:
    """A new git + dvc repo with its own caches, holding a copy of ``data`` (untimed)."""
    repo = base / "repo"
    init_dvc_repo(dvc_bin(), repo, base / "site-cache")
    # NOTE: a copy, not hard links (dvc add is twice as slow on hard-linked files).
    shutil.copytree(data, repo / data.name)
    return repo, repo / data.name


def dvc_add(repo: Path, target: Path) -> float:
    settle()
    started = time.perf_counter()
    subprocess.run([str(dvc_bin()), "add", "-q", target.name], cwd=repo, check=True,
                   env=dvc_env(), stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def dvc_cases(repo: Path, target: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"cold": [dvc_add(repo, target)], "unchanged": [],
                                   "added": []}
    for _ in range(args.repeat):
        out["unchanged"].append(dvc_add(repo, target))
    for i in range(args.repeat):
        add_file(target, i, args.file_kib * 1024)
        out["added"].append(dvc_add(repo, target))
    return out


def dvc_version() -> str:
    return subprocess.run([str(dvc_bin()), "--version"], capture_output=True, text=True,
                          check=True, env=dvc_env()).stdout.strip()


# -- S3 ------------------------------------------------------------------------------

def s3_cases(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    from s3_put import BUCKET, CREDENTIALS, moto_server

    os.environ.update(CREDENTIALS)
    data = RUN / "s3-data"
    make_files(data, args.s3_files, args.file_kib * 1024, args.per_folder)
    with moto_server() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=BUCKET)
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        return ours_cases(data, RUN / "s3", args, store=f"s3://{BUCKET}/store",
                          options=options, tag="s3", no_cache=False, repeat=1)


# -- report ------------------------------------------------------------------------

def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def samples(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]" if len(values) > 1 else ""


def seconds_of(runs: list[dict[str, Any]]) -> list[float]:
    return [r["seconds"] for r in runs]


def phases_line(runs: list[dict[str, Any]]) -> str:
    """The phases of the median run, in seconds."""
    if not runs:
        return ""
    run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    parts = [f"{name} {secs:.2f}" for name, secs in run["phases"].items()]
    other = run["seconds"] - sum(secs for name, secs in run["phases"].items()
                                  if not name.startswith("of which"))
    return ", ".join([*parts, f"other {other:.2f}"])


def print_table(title: str, ours: dict[str, list[dict[str, Any]]],
                dvc: dict[str, list[float]] | None, goals: bool) -> None:
    print()
    print(title)
    header = (f"  {'case':<24} {'ours':>9} {'dvc add':>9} {'dvc/ours':>9}   "
              f"{'goal (ours)':<12} {'':<7}")
    print(header)
    names = {"cold": "cold", "unchanged": "unchanged", "nocache": "unchanged, no stat cache",
             "added": "one file added"}
    for key, name in names.items():
        if not ours.get(key):
            continue
        mine = med(seconds_of(ours[key]))
        theirs = med(dvc[key]) if dvc and dvc.get(key) else None
        ratio = f"{theirs / mine:.1f}x" if theirs and mine else "-"
        goal = GOALS.get(key) if goals else None
        verdict = ("met" if mine is not None and mine <= goal else "MISSED") if goal else ""
        goal_s = f"<= {goal:g} s" if goal else ""
        print(f"  {name:<24} {fmt(mine):>9} {fmt(theirs):>9} {ratio:>9}   "
              f"{goal_s:<12} {verdict:<7}")
    every = [r for runs in ours.values() for r in runs]
    peak = max(r["peak_kib"] for r in every) / 1024
    growth = max(r["peak_kib"] - r["before_kib"] for r in every) / 1024
    verdict = ("met" if peak <= GOALS["rss_mib"] else "MISSED") if goals else ""
    goal_s = f"<= {GOALS['rss_mib']:g} MiB" if goals else ""
    print(f"  {'peak RSS (worst case)':<24} {peak:>5.0f} MiB {'':>9} {'':>9}   "
          f"{goal_s:<12} {verdict:<7}  (growth during the put: {growth:.0f} MiB)")
    for key, name in names.items():
        if ours.get(key):
            print(f"  {name}: {phases_line(ours[key])}")
    for key, name in names.items():
        lines = samples(seconds_of(ours.get(key, [])))
        if lines:
            print(f"  samples, ours {name}: {lines}")
        if dvc and samples(dvc.get(key, [])):
            print(f"  samples, dvc {name}: {samples(dvc[key])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--file-kib", type=int, default=4)
    parser.add_argument("--per-folder", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each warm case (cold runs once)")
    parser.add_argument("--s3-files", type=int, default=20_000)
    parser.add_argument("--skip-dvc", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile each put of ours into bench/.work/scale/profiles/")
    parser.add_argument("--keep", action="store_true", help="keep bench/.work/scale")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return

    if RUN.exists():
        raise SystemExit(f"{RUN} exists (a --keep run, or one still going): remove it first")
    data = RUN / "data"
    print(f"preparing {args.files:,} random files x {args.file_kib} KiB "
          f"({args.per_folder} a folder) under {RUN} ...", flush=True)
    prepared = time.perf_counter()
    make_files(data, args.files, args.file_kib * 1024, args.per_folder)
    repo = target = None
    if not args.skip_dvc:
        repo, target = dvc_prepare(data, RUN / "dvc")
    print(f"prepared in {time.perf_counter() - prepared:.0f} s", flush=True)

    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        load_at_start = loadavg()
        local = ours_cases(data, RUN / "ours", args)
        dvc = None
        version = "-"
        if repo is not None and target is not None:
            version = dvc_version()
            dvc = dvc_cases(repo, target, args)
        load_local = loadavg()
        s3 = None if args.skip_s3 or args.s3_files <= 0 else s3_cases(args)
    finally:
        if not args.keep:
            shutil.rmtree(RUN, ignore_errors=True)

    print()
    print(run_line("scale.py", started, version))
    print(f"load average (1/5/15 min) before the timed part {load_at_start}, after the local "
          f"part {load_local}, at the end {loadavg()} (this benchmark's own included)")
    print(f"ours: ObjectStore(...).put_dir in a fresh process, imports excluded; dvc add: a "
          f"whole dvc process; warm cases: median of {args.repeat}, cold: one run")
    print_table(f"local: {args.files:,} files x {args.file_kib} KiB, "
                f"{args.per_folder} a folder, store on the same disk", local, dvc, goals=True)
    if s3 is not None:
        print_table(f"S3 (moto on loopback, own process): {args.s3_files:,} files x "
                    f"{args.file_kib} KiB, store s3://bucket/store (no goal; no dvc)",
                    s3, None, goals=False)


if __name__ == "__main__":
    main()
