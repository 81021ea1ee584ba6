"""Benchmark: new data lands -> a pipeline flow run is Running, with nobody running anything.

Usage::

    .venv/bin/python bench/latency.py [--arrivals 10] [--cold]

Everything real and on loopback, under ``bench/.work/latency/`` (wiped at the
start): a ``prefect server start`` on a free port, ``uncool deploy --watch``
(work pool, blocks, code in the store, ``prefect deploy --all``), ``uncool
worker`` (Prefect's process worker, 1 s poll) and the watcher as a flow run of
its deployment (0.5 s quiet window). The sample data's days 1-3 are there
first; their run is not timed.

Each arrival writes the next day of sample issues (60 files, each written
atomically) into the watched folder; t0 is when the last file is in place.
Timed from t0, read from the server: the watcher's log line saying the event
was sent, the flow run of ``on-new-data`` created
by the trigger (``created``), and the run entering Running (its
``start_time``, set by the server), then Completed. The next arrival waits
until the run is over. Goals: p50 <= 3 s and p95 <= 6 s to Running; p50 <= 10 s
to Completed (the decision recorded). The worker polls every 0.5 s
(``uncool worker``'s default) and starts flow runs warm (forks of a process
that imported Prefect); ``--cold`` runs ``uncool worker --cold``, each run a
new ``python -m prefect.engine``, to compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from _common import loadavg, prefect_server

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "latency"
GOAL_P50_S, GOAL_P95_S = 3.0, 6.0
GOAL_DONE_P50_S = 10.0


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a small sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


def _seconds(moment: datetime | None, t0: float) -> float:
    return float("nan") if moment is None else moment.timestamp() - t0


def _announced_at(watcher_run_id: object, dataset: str) -> datetime | None:
    """When the watcher's flow run logged that it announced ``dataset`` (after the event was sent)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[watcher_run_id])))  # type: ignore[list-item]
    return next((log.timestamp for log in logs if f"announced {dataset}" in log.message), None)


def _phases(flow_run_id: object, t0: float) -> tuple[float, float]:
    """Seconds from t0 to Pending (the worker took the run and starts its process) and to
    the run's first log line (a new Python process with Prefect imported, the flow loading)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(flow_run_id)  # type: ignore[arg-type]
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))  # type: ignore[list-item]
    pending = min((s.timestamp for s in states if s.name == "Pending"), default=None)
    first_log = min((log.timestamp for log in logs), default=None)
    return _seconds(pending, t0), _seconds(first_log, t0)


def bench(arrivals: int, cold: bool) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.environ.update({"PREFECT_HOME": str(WORK / "prefect-home"),
                       "XDG_CACHE_HOME": str(WORK / "cache"),
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    with prefect_server(WORK / "prefect-home") as api_url:
        os.environ["PREFECT_API_URL"] = api_url  # before Prefect is imported below
        from project import Project
        from stack import flow_runs, wait_for

        from uncool_prefect.sources import write_sample, write_sample_day

        project = Project(WORK, "latency")
        write_sample(project.data, days=3, seed=0)
        stack = _stack_class()(project, WORK, cold=cold)
        print(f"load average {loadavg()}; server {api_url}; flow runs start "
              f"{'cold' if cold else 'warm'}", flush=True)
        try:
            stack.start()
            stack.wait_for_pipeline_runs(1)
            print("first run (days 1-3, untimed) done; timing arrivals", flush=True)
            rows: list[tuple[int, float, float, float, str, float]] = []
            phases: list[tuple[float, float]] = []
            for n in range(arrivals):
                day = 4 + n
                before = len(flow_runs(stack.PIPELINE))
                write_sample_day(project.data, day, seed=0)
                t0 = time.time()
                run = wait_for(lambda b=before: [r for r in flow_runs(stack.PIPELINE)[b:]
                                                 if r.start_time] or None, 120,
                               f"a Running flow run for day {day}", interval=0.05)[0]
                runs = stack.wait_for_pipeline_runs(before + 1)
                done = next(r for r in runs if r.id == run.id)
                announced = _announced_at(flow_runs(stack.WATCHER)[-1].id, run.parameters["dataset"])
                row = (day, _seconds(run.created, t0), _seconds(run.start_time, t0),
                       _seconds(done.end_time, t0), str(done.state_name),
                       _seconds(announced, t0))
                rows.append(row)
                pending, first_log = _phases(run.id, t0)
                phases.append((pending, first_log))
                print(f"day {day:>2}: announced {row[5]:5.2f} s, created {row[1]:5.2f} s, "
                      f"Pending {pending:5.2f} s, first log {first_log:5.2f} s, "
                      f"Running {row[2]:5.2f} s, {row[4]} {row[3]:5.2f} s", flush=True)
        finally:
            stack.stop()
    running = [r[2] for r in rows]
    created = [r[1] for r in rows]
    announced = [r[5] for r in rows]
    p50, p95 = statistics.median(running), _percentile(running, 95)
    print()
    print(f"{'new data -> ':<28}{'p50':>8}{'p95':>8}{'max':>8}   goal")
    print(f"{'event sent (watcher)':<28}{statistics.median(announced):8.2f}"
          f"{_percentile(announced, 95):8.2f}{max(announced):8.2f}")
    print(f"{'flow run created (trigger)':<28}{statistics.median(created):8.2f}"
          f"{_percentile(created, 95):8.2f}{max(created):8.2f}")
    for label, values in (("worker took it (Pending)", [p[0] for p in phases]),
                          ("flow-run process logs", [p[1] for p in phases])):
        print(f"{label:<28}{statistics.median(values):8.2f}{_percentile(values, 95):8.2f}"
              f"{max(values):8.2f}")
    print(f"{'flow run Running':<28}{p50:8.2f}{p95:8.2f}{max(running):8.2f}   "
          f"p50 <= {GOAL_P50_S:g}, p95 <= {GOAL_P95_S:g}: "
          f"{'met' if p50 <= GOAL_P50_S and p95 <= GOAL_P95_S else 'MISSED'}")
    finished = [r[3] for r in rows]
    done_p50 = statistics.median(finished)
    print(f"{'flow run Completed':<28}{done_p50:8.2f}{_percentile(finished, 95):8.2f}"
          f"{max(finished):8.2f}   p50 <= {GOAL_DONE_P50_S:g}: "
          f"{'met' if done_p50 <= GOAL_DONE_P50_S else 'MISSED'}")
    print(f"runs completed: {sum(r[4] == 'Completed' for r in rows)}/{len(rows)}; "
          f"load average {loadavg()}")
    return 0 if all(r[4] == "Completed" for r in rows) else 1


def _stack_class() -> type:
    """tests/stack.py's AutomationStack, whose `uncool worker` gets --cold if asked.

    Built here, not at import: tests/ is on sys.path and PREFECT_API_URL set only inside bench().
    """
    import subprocess

    from project import PROJECT, UNCOOL
    from stack import AutomationStack

    class LatencyStack(AutomationStack):
        def __init__(self, project: object, log_dir: Path, *, cold: bool) -> None:
            super().__init__(project, log_dir)  # type: ignore[arg-type]
            self.cold = cold

        def start(self) -> None:
            if not self.cold:
                return super().start()
            done = self.project.uncool("deploy", "--watch", str(self.project.data), "--name", "issues")
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            with open(self.log_dir / "worker.log", "wb") as log:
                self.worker = subprocess.Popen(
                    [UNCOOL, "worker", "--cold"], cwd=PROJECT, env=self.project.env, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )
            return None

    return LatencyStack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrivals", type=int, default=10, help="timed arrivals (default 10)")
    parser.add_argument("--cold", action="store_true",
                        help="`uncool worker --cold`: each flow run a new Python process")
    args = parser.parse_args()
    return bench(args.arrivals, args.cold)


if __name__ == "__main__":
    sys.exit(main())
