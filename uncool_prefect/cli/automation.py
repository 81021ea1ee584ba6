"""``uncool deploy``, ``uncool worker`` and ``uncool watch``: the pipeline without anyone running it.

Errors whose message says what
to do (:class:`~uncool_prefect.deploy.DeployError`,
:class:`~uncool_prefect.events.WatchError`, server errors) print as one line.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

from cyclopts import Parameter

from ..project import POOL, WORKER_QUERY_SECONDS
from .common import app

Name = Annotated[str | None, Parameter(help="Dataset name: events are about uncool.dataset.NAME, "
                                            "which the deployments' triggers match. Default: the "
                                            "last part of the URL (data/issues -> issues).")]


def _dataset_name(name: str | None, url: str) -> str:
    return name or url.rstrip("/").rsplit("/", 1)[-1]


@app.command
def deploy(
    *,
    watch: Annotated[str | None, Parameter(
        help="Also start the watcher deployment on this dataset: a folder on the "
             "worker's machine or s3://bucket/prefix.")] = None,
    name: Name = None,
) -> int:
    """Deploy the project: work pool, blocks, code, and every deployment in its prefect.yaml.

    Checks that the Prefect server answers (PREFECT_API_URL, else the project's
    own server, started if needed), creates the process work pool
    `uncool-local` (its flow-run command starts runs warm under `uncool
    worker`), registers the block types and points the store block at
    this project's store, stores the pipeline's folder and pyproject.toml as
    the code every run pulls, and applies the project's prefect.yaml
    ([tool.uncool] deployments, default deployments/prefect.yaml) with
    `prefect deploy --all`. Then run `uncool worker`.
    """
    from rich.table import Table

    from ..config import load_config
    from ..events import WatchError
    from ..project import deploy as deploying
    from .common import out

    config = load_config()
    if watch and "://" not in watch and not Path(watch).is_dir():
        raise WatchError(f"cannot watch {watch}: no such folder; create it, e.g. "
                         f"`uncool sample-data {watch} --day 1`, or copy your data there")
    info = server_api_url()
    out.print(f"Prefect server  {info}")
    with prefect_at(info):
        out.print(f"work pool       {POOL} ({deploying.ensure_work_pool(POOL)})")
        store = deploying.register_blocks()
        out.print(f"store block     content-addressed-storage/{_block()} -> {store.url}")
        code = deploying.publish_code(store, config)
        out.print(f"code            {code.name} ({code.nfiles} files, refs/{deploying.CODE_REF})")
        deploying.apply_deployments(config, info)
        table = Table(title="deployments", show_header=True)
        for column in ("deployment", "work pool", "schedule", "triggered by"):
            table.add_column(column)
        deployments = deploying.read_deployments(config)
        for deployment in deployments:
            table.add_row(deployment.name, deployment.work_pool or "-",
                          ", ".join(deployment.schedules) or "-", ", ".join(deployment.triggers) or "-")
        out.print(table)
        if watch:
            url = watch if "://" in watch else str(Path(watch).absolute())
            run_id, created = deploying.start_watcher(url, _dataset_name(name, watch),
                                                      deploying.watcher_deployment(deployments))
            out.print(f"watcher         {'started' if created else 'already running'} on {url}: "
                      f"flow run {run_id}")
    out.print("next            uncool worker   (runs them; leave it running)")
    return 0


@app.command
def worker(
    *,
    pool: Annotated[str, Parameter(help="Work pool to take runs from.")] = POOL,
    query_seconds: Annotated[float, Parameter(
        help="Seconds between polls for runs to start (Prefect's default is 10).")] = WORKER_QUERY_SECONDS,
    stop_timeout: Annotated[float, Parameter(
        help="Seconds a stop waits for the cancelled flow runs to end before it kills them.")] = 30.0,
    cold: Annotated[bool, Parameter(
        help="Start each flow run as a new `python -m prefect.engine` instead of warm.")] = False,
) -> int:
    """Start Prefect's process worker for the deployments (runs until Ctrl-C or SIGTERM).

    The same as `prefect worker start --pool uncool-local --type process`, with
    a 0.5 s poll so that a triggered run is picked up within half a second, and
    UNCOOL_HOME set to this project's state folder so that every flow run
    records into the same MLflow database and data cache.

    Flow runs start warm (Linux): beside the worker runs a process that has
    imported Prefect, prefect-aws and uncool-prefect once, and each flow run's
    engine is a fork of it, so a run reports Running about a second sooner
    than from a new Python process. The flow's code is still imported anew by
    each run, so a changed flow counts from the next run; after upgrading
    Prefect or uncool-prefect, restart the worker. Prefect's worker still
    polls, sets states, cancels and streams logs as usual. Runs start warm
    through the work pool's command, which `uncool deploy` sets; under a plain
    `prefect worker`, or with --cold, each run is a new `python -m
    prefect.engine`.

    Stopping it (Ctrl-C, SIGTERM) cancels the flow runs it executes through the
    API (state Cancelled, processes gone) before the worker stops; a watcher
    cancelled so is started again by the next `uncool worker`.
    """
    from ..config import load_config
    from ..project import server
    from ..project import worker as working
    from .common import err

    config = load_config()
    api_url = server_api_url()
    env = working.worker_environment(config.root, api_url, query_seconds)
    command = [server.prefect_executable(), "worker", "start",
               "--pool", pool, "--type", "process"]
    warm = not cold and sys.platform.startswith("linux")
    err.print(f"worker on {pool} (polls every {query_seconds:g} s, flow runs start "
              f"{'warm' if warm else 'cold'}), UNCOOL_HOME={env['UNCOOL_HOME']}")
    with prefect_at(api_url):
        for url, run_id, created in working.resume_watchers(pool):
            err.print(f"watcher {'resumed' if created else 'already running'} on {url}: "
                      f"flow run {run_id}")
        sys.stdout.flush()
        sys.stderr.flush()
        return working.supervise_worker(command, env, say=err.print, stop_timeout=stop_timeout,
                                        warm_start=warm)


@app.command
def watch(
    url: Annotated[str, Parameter(help="A local folder or s3://bucket/prefix.")],
    /,
    *,
    name: Name = None,
    debounce: Annotated[float, Parameter(
        help="Seconds the data must stay unchanged before it is read.")] = 0.5,
    poll_interval: Annotated[float, Parameter(help="Seconds between listings of an s3:// prefix.")] = 2.0,
    once: Annotated[bool, Parameter(help="Check once, announce if new, and exit.")] = False,
) -> int:
    """Watch a dataset and announce new content as a Prefect event (runs until Ctrl-C).

    A local folder is watched through filesystem notifications, an s3:// prefix
    through a cheap listing every POLL_INTERVAL seconds. When the data changed
    and then stayed quiet for DEBOUNCE seconds, its snapshot is stored and
    `uncool.dataset.updated` is emitted for resource uncool.dataset.NAME with
    the snapshot's id: the on-new-data deployment trains on it. Content that
    was announced before (also by an earlier watcher) is not announced again.
    """
    from ..blocks import ensure_store_block
    from ..events import DatasetWatcher
    from .common import err, out

    name = _dataset_name(name, url)
    with prefect_at(server_api_url()):
        store = ensure_store_block(_block())
        where = url if "://" in url else str(Path(url).absolute())
        watcher = DatasetWatcher(where, name, store, debounce=debounce, poll_interval=poll_interval)

        def report(result: object) -> None:
            out.print(getattr(result, "reason", result))

        if once:
            report(watcher.check())
            return 0
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        err.print(f"watching {where} as uncool.dataset.{name} (debounce {debounce:g} s); Ctrl-C stops")
        watcher.run(stop, on_result=report)
    return 0


def server_api_url() -> str:
    """The API URL of the server to use: PREFECT_API_URL if it answers, else the project's."""
    from ..project import runner, server

    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        if not server.is_healthy(configured):
            raise server.ServerError(
                f"the Prefect server at PREFECT_API_URL={configured} does not answer; start it "
                "(prefect server start), or unset PREFECT_API_URL to use the project's own")
        return configured
    return runner.connect().api_url


def prefect_at(api_url: str) -> AbstractContextManager[object]:
    """Prefect calls in this process go to ``api_url``.

    NOTE: Prefect reads its settings when first imported (finding the server
    may have imported it already); the environment alone could leave this
    process on a temporary server of its own.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api_url})


def _block() -> str:
    from ..settings import get_settings

    return get_settings().block
