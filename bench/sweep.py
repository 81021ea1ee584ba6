"""The training sweep on 1 vs 2 Dask workers: does it scale on this machine? (goal >= 1.7x)

Starts its own Prefect server and a fresh UNCOOL_HOME under bench/.work/sweep,
stores a bigger sample (``--days`` days of 60 issue titles) as the train split,
then runs the pipeline's own ``sweep`` flow (flows/pipeline.py: every trial a
task, cached by content) over a grid of ``--C`` values with ``refresh`` on, so
every trial trains. For each worker count it starts a ``distributed.LocalCluster``
(as ``uncool_prefect.compute`` does: one single-threaded process per worker),
then times ``--repeat`` sweeps on it; and separately times one sweep whose
runner starts its own cluster (what ``uncool run`` pays on a train cache miss).

    .venv/bin/python bench/sweep.py [--days 600] [--C 2 2.5 3 ... 5.5] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import loadavg, prefect_server

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "sweep"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=600, help="days of sample data (60 titles each)")
    # NOTE: C values close together: trials of about the same length, so the
    # ratio measures the workers, not an unlucky order of long and short trials.
    parser.add_argument("--C", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5],
                        help="grid of train.C values (classifier: logistic_regression)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    try:
        with prefect_server(WORK / "prefect-home") as api_url:
            # NOTE: before Prefect is imported, and inherited by every Dask worker.
            os.environ.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(WORK / "prefect-home"),
                               "UNCOOL_HOME": str(WORK / "home"), "UNCOOL_BLOCK": "bench-sweep"})
            os.environ.pop("UNCOOL_STORE", None)
            os.environ.pop("UNCOOL_DASK_ADDRESS", None)
            run(args)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    import yaml
    from distributed import LocalCluster

    from uncool_prefect import compute, get_store
    from uncool_prefect.blocks import ensure_store_block
    from uncool_prefect.config import config_of
    from uncool_prefect.project import runner
    from uncool_prefect.settings import get_settings
    from uncool_prefect.sources import load_examples, write_sample

    runner.load_flow(config_of(ROOT))
    pipeline = sys.modules["uncool_pipeline_pipeline"]  # the flow's module: its sweep flow
    ensure_store_block(get_settings().block)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        write_sample(tmp, days=args.days, seed=0)
        rows = [{"id": e.id, "text": e.text, "label": e.label} for e in load_examples(tmp)]
    train_split = get_store().put_bytes(pipeline.labeler.rows_to_jsonl(rows)).oid
    params = yaml.safe_load((ROOT / "flows" / "params.yaml").read_text())["train"]
    grid = {"classifier": ["logistic_regression"], "C": args.C}
    labeler = pipeline.labeler
    points = [{"point": p, "params": labeler.trial_params(params, p)} for p in labeler.expand_grid(grid)]
    selection = {"metric": "macro_f1", "val_size": 0.25, "seed": 0}

    def sweep(task_runner: object) -> float:
        started = time.perf_counter()
        trials = pipeline.sweep.with_options(task_runner=task_runner)(
            train_split, points, selection, "cpu", False, refresh=True)
        elapsed = time.perf_counter() - started
        assert len(trials) == len(points) and all(t["state"] == "Completed" for t in trials), trials
        return elapsed

    print(f"\nsweep.py  python {sys.version.split()[0]}  cpus {os.cpu_count()}  "
          f"{len(rows):,} rows  {len(points)} trials (C in {args.C}, fit on 75% + refit on all)")
    print(f"load average before: {loadavg()}")
    warm: dict[int, list[float]] = {}
    starts: dict[int, float] = {}
    cold: dict[int, float] = {}
    for workers in (1, 2):
        started = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster:
            starts[workers] = time.perf_counter() - started
            choice = compute.choose(address=cluster.scheduler_address)
            sweep(compute.task_runner(choice))  # untimed: workers import Prefect and sklearn
            warm[workers] = [sweep(compute.task_runner(choice)) for _ in range(args.repeat)]
        cold[workers] = sweep(compute.task_runner(compute.choose(gpus=0, workers=workers)))
    print(f"load average after:  {loadavg()}\n")
    print(f"{'':34}{'1 worker':>12}{'2 workers':>12}{'speed-up':>10}   goal")
    one, two = statistics.median(warm[1]), statistics.median(warm[2])
    print(f"{'sweep on a running cluster':34}{one:>11.2f}s{two:>11.2f}s{one / two:>9.2f}x   >= 1.7x: "
          f"{'met' if one / two >= 1.7 else 'missed'}")
    print(f"{'sweep, cluster started by runner':34}{cold[1]:>11.2f}s{cold[2]:>11.2f}s"
          f"{cold[1] / cold[2]:>9.2f}x   (what uncool run pays on a train cache miss)")
    print(f"{'LocalCluster start':34}{starts[1]:>11.2f}s{starts[2]:>11.2f}s")
    print(f"samples (running cluster): 1 worker {[round(x, 2) for x in warm[1]]}, "
          f"2 workers {[round(x, 2) for x in warm[2]]}")


if __name__ == "__main__":
    main()
