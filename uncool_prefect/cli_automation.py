"""``uncool deploy``, ``uncool worker`` and ``uncool watch``: the pipeline without anyone running it.

Registered with ``app.command(...)`` in cli.py. Errors whose message says what
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
from typing import Annotated, cast

from cyclopts import Parameter

from .deploy import POOL, WORKER_QUERY_SECONDS

Name = Annotated[str, Parameter(help="Dataset name: events are about uncool.dataset.NAME "
                                     "(the on-new-data trigger matches 'issues').")]


def deploy(
    *,
    watch: Annotated[str | None, Parameter(
        help="Also start the watcher deployment on this dataset: a folder on the "
             "worker's machine or s3://bucket/prefix.")] = None,
    name: Name = "issues",
) -> int:
    """Deploy the pipeline: work pool, blocks, code, and every deployment in deployments/prefect.yaml.

    Checks that the Prefect server answers (PREFECT_API_URL, else the project's
    own server, started if needed), creates the process work pool
    `uncool-local`, registers the block types and points the store block at
    this project's store, stores flows/ as the code every run pulls, and
    applies deployments/prefect.yaml with `prefect deploy --all`: the daily
    schedule, the on-new-data trigger and the watcher. Then run `uncool worker`.
    """
    from rich.table import Table

    from . import deploy as deploying
    from . import runner
    from .cli import out
    from .events import WatchError
    from .store import ObjectStore

    project = runner.find_project()
    if watch and "://" not in watch and not Path(watch).is_dir():
        raise WatchError(f"cannot watch {watch}: no such folder; create it, e.g. "
                         f"`uncool sample-data {watch} --day 1`, or copy your data there")
    info = server_api_url()
    out.print(f"Prefect server  {info}")
    with prefect_at(info):
        out.print(f"work pool       {POOL} ({deploying.ensure_work_pool(POOL)})")
        store_url = deploying.register_blocks()
        out.print(f"store block     content-addressed-storage/{_block()} -> {store_url}")
        code = deploying.publish_code(ObjectStore(store_url), project)
        out.print(f"code            {code.name} ({code.nfiles} files of flows/, refs/{deploying.CODE_REF})")
        deploying.apply_deployments(project, info)
        table = Table(title="deployments", show_header=True)
        for column in ("deployment", "work pool", "schedule", "triggered by"):
            table.add_column(column)
        for deployment in deploying.read_deployments():
            table.add_row(deployment.name, deployment.work_pool or "-",
                          ", ".join(deployment.schedules) or "-", ", ".join(deployment.triggers) or "-")
        out.print(table)
        if watch:
            url = watch if "://" in watch else str(Path(watch).absolute())
            run_id, created = deploying.start_watcher(url, name)
            out.print(f"watcher         {'started' if created else 'already running'} on {url}: "
                      f"flow run {run_id}")
    out.print("next            uncool worker   (runs them; leave it running)")
    return 0


def worker(
    *,
    pool: Annotated[str, Parameter(help="Work pool to take runs from.")] = POOL,
    query_seconds: Annotated[float, Parameter(
        help="Seconds between polls for runs to start (Prefect's default is 10).")] = WORKER_QUERY_SECONDS,
) -> None:
    """Start Prefect's process worker for the deployments (runs until Ctrl-C).

    The same as `prefect worker start --pool uncool-local --type process`, with
    a 0.5 s poll so that a triggered run is picked up within half a second, and
    UNCOOL_HOME set to this project's state folder so that every flow run
    records into the same MLflow database and data cache.
    """
    from . import deploy as deploying
    from . import runner, server
    from .cli import err

    project = runner.find_project()
    api_url = server_api_url()
    env = deploying.worker_environment(project, api_url, query_seconds)
    command = [server.prefect_executable(), "worker", "start",
               "--pool", pool, "--type", "process"]
    err.print(f"worker on {pool} (polls every {query_seconds:g} s), UNCOOL_HOME={env['UNCOOL_HOME']}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def watch(
    url: Annotated[str, Parameter(help="A local folder or s3://bucket/prefix.")],
    /,
    *,
    name: Name = "issues",
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
    from .blocks import ContentAddressedStorage
    from .cli import err, out
    from .events import DatasetWatcher
    from .runner import ensure_block

    with prefect_at(server_api_url()):
        ensure_block(_block())
        store = cast(ContentAddressedStorage, ContentAddressedStorage.load(_block())).store
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
    from . import runner, server

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
    from .settings import get_settings

    return get_settings().block
