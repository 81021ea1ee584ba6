"""The ``uncool`` command.

    uncool run [-S key=value]       the main job: the issue-labeler pipeline
    uncool predict|serve            use the champion
    uncool lineage|checkout|reproduce|exp show|diff   find, recover and audit runs
    uncool deploy|worker|watch      deployments, a worker, the new-data watcher
    uncool store put|get|cat|ls|du|verify|gc
    uncool server start|stop|status
    uncool block register           save the store as a Prefect block
    uncool sample-data|demo

Every store command takes ``--basepath URL`` (default: ``UNCOOL_STORE``, else
``.uncool/store`` in the project folder).
"""

from __future__ import annotations

import atexit
import json
import re
import sys
from pathlib import Path
from typing import Annotated

import cyclopts
from cyclopts import Parameter
from rich.console import Console
from rich.table import Table

from .progress import RichCallback
from .settings import get_settings
from .store import ObjectStore, StoreError

app = cyclopts.App(
    name="uncool",
    help="Content-addressed, verified ML artifacts and caching for Prefect.",
    version_flags=["--version"],
)
store_app = cyclopts.App(name="store", help="Put, get, inspect and clean the object store.")
server_app = cyclopts.App(name="server", help="A local Prefect server in the background.")
block_app = cyclopts.App(name="block", help="The store as a Prefect block.")
app.command(store_app)
app.command(server_app)
app.command(block_app)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Basepath = Annotated[
    str | None,
    Parameter(help="Store URL: a folder or s3://bucket/prefix. Default: UNCOOL_STORE, "
              "else .uncool/store."),
]


def _open_store(basepath: str | None) -> ObjectStore:
    settings = get_settings()
    return ObjectStore(
        basepath or settings.store_url,
        algorithm=settings.algorithm,
        state_dir=settings.state_dir,
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '1h', '2d' -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise StoreError(f"cannot read duration {text!r}; use e.g. 90s, 30m, 1h or 2d")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * scale


# -- store -----------------------------------------------------------------
@store_app.command
def put(path: Path, /, *, basepath: Basepath = None) -> None:
    """Store a file or a folder; print its object id (folders end in .dir).

    Parameters
    ----------
    path
        File or folder to store. Unchanged files are not read again.
    """
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    store = _open_store(basepath)
    with RichCallback(f"put {path.name}") as progress:
        ref = store.put(path, callback=progress)
    out.print(ref.name)


@store_app.command
def get(oid: str, dest: Path, /, *, basepath: Basepath = None) -> None:
    """Write an object (file) or a .dir object (folder) to DEST, verified.

    Parameters
    ----------
    oid
        Object id as printed by `uncool store put`.
    dest
        Destination file, or a new or empty folder for a .dir object.
    """
    store = _open_store(basepath)
    with RichCallback(f"get {oid[:12]}") as progress:
        store.get_file(oid, dest, callback=progress)
    out.print(str(dest))


@store_app.command
def cat(oid: str, /, *, basepath: Basepath = None) -> None:
    """Write an object's bytes to stdout (verified; a .dir prints its manifest).

    Parameters
    ----------
    oid
        Object id as printed by `uncool store put`.
    """
    store = _open_store(basepath)
    with store.open(oid) as stream:
        # NOTE: the final chunk is only released after the hash check, so a
        # corrupt object ends with an error instead of a silent bad tail.
        while chunk := stream.read(1 << 20):
            sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


@store_app.command(name="ls")
def ls_(*, basepath: Basepath = None, json_output: Annotated[bool, Parameter(name="--json")] = False) -> None:
    """List the objects in the store."""
    store = _open_store(basepath)
    infos = sorted(store.ls(), key=lambda i: i.name)
    if json_output:
        out.print(json.dumps([{"oid": i.name, "size": i.size, "mtime": i.mtime} for i in infos]))
        return
    for info in infos:
        out.print(f"{info.name}  {_human(info.size):>10}")


@store_app.command
def du(*, basepath: Basepath = None, json_output: Annotated[bool, Parameter(name="--json")] = False) -> None:
    """Show objects, stored bytes, logical bytes and the deduplication ratio.

    Logical bytes count every ref and every file of every folder snapshot in
    full: what the store would hold without deduplication.
    """
    store = _open_store(basepath)
    usage = store.du()
    if json_output:
        out.print(json.dumps({
            "objects": usage.objects, "directories": usage.directories, "refs": usage.refs,
            "stored_bytes": usage.stored_bytes, "logical_bytes": usage.logical_bytes,
            "dedup_ratio": round(usage.dedup_ratio, 3),
        }))
        return
    table = Table(title=f"store {store.url}", show_header=False)
    table.add_row("objects", f"{usage.objects} ({usage.directories} folders)")
    table.add_row("refs", str(usage.refs))
    table.add_row("stored bytes", _human(usage.stored_bytes))
    table.add_row("logical bytes", _human(usage.logical_bytes))
    table.add_row("dedup ratio", f"{usage.dedup_ratio:.2f}x")
    out.print(table)


@store_app.command
def verify(*, basepath: Basepath = None) -> int:
    """Re-hash every object; exit 1 and list them if any is corrupt or missing."""
    store = _open_store(basepath)
    with RichCallback("verify") as progress:
        problems = store.verify(callback=progress)
    if not problems:
        out.print(f"all objects in {store.url} verified")
        return 0
    for problem in problems:
        out.print(f"{problem.kind}: {problem.name} at {problem.url}: {problem.detail}")
    # One missing object listed by several folders is one object to repair.
    damaged = len({problem.name for problem in problems})
    err.print(f"{damaged} damaged object(s); put the original data again to repair")
    return 1


@store_app.command
def gc(
    *,
    basepath: Basepath = None,
    grace: Annotated[str, Parameter(help="Spare anything younger than this (e.g. 30m, 1h, 0).")] = "1h",
    keep: Annotated[tuple[str, ...], Parameter(help="Object ids to keep besides refs and runs.")] = (),
    dry_run: Annotated[bool, Parameter(help="List what would be removed; delete nothing.")] = False,
) -> None:
    """Delete objects no ref, run record or --keep id reaches, older than --grace."""
    store = _open_store(basepath)
    report = store.gc(grace=parse_duration(grace), keep=keep, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    out.print(
        f"{verb} {len(report.removed)} object(s), {_human(report.removed_bytes)}; "
        f"kept {report.reachable} reachable, spared {report.spared_young} younger than {grace}; "
        f"{verb} {report.removed_temp} stale temp file(s)"
    )
    for name in report.dangling:
        err.print(f"warning: a ref or run names {name}, which is not in the store")


# -- server ----------------------------------------------------------------
@server_app.command(name="start")
def server_start(*, port: int | None = None) -> None:
    """Start a Prefect server on 127.0.0.1 in the background (pid/log in .uncool/server)."""
    from . import server

    info = server.start(get_settings().home, port=port)
    out.print(f"Prefect server up: {info.ui_url} (pid {info.pid}, log {info.log})")
    out.print(f"use it with: export PREFECT_API_URL={info.api_url}")


@server_app.command(name="stop")
def server_stop() -> None:
    """Stop the server started by `uncool server start`."""
    from . import server

    stopped = server.stop(get_settings().home)
    out.print("stopped" if stopped else "no server of ours was running")


@server_app.command(name="status")
def server_status() -> int:
    """Say whether our background server is up, or which server answers instead (exit 1: none)."""
    from . import server

    info = server.status(get_settings().home)
    if info is None:
        # The same order as server.ensure: the environment, Prefect's profile, then :4200.
        other = server.configured_api_url() or server.LOCAL_API_URL
        if server.is_healthy(other):
            out.print(f"not started by this project; uncool commands use the server that "
                      f"answers at {other.removesuffix('/api')}")
            return 0
        out.print("not running")
        return 1
    out.print(f"running: {info.ui_url} (pid {info.pid}, log {info.log})")
    return 0


# -- block -----------------------------------------------------------------
@block_app.command(name="register")
def block_register(name: str | None = None, /, *, basepath: Basepath = None) -> None:
    """Save a ContentAddressedStorage block NAME for the store (needs a Prefect API).

    NAME defaults to the store's own block, the one `uncool run` and the
    deployments use (UNCOOL_BLOCK, else uncool-<hash of the store URL>).
    """
    from .blocks import ContentAddressedStorage
    from .cli_automation import prefect_at, server_api_url

    settings = get_settings(store=basepath) if basepath else get_settings()
    url = basepath or settings.store_url
    name = name or settings.block
    api_url = server_api_url()  # the server `uncool run` uses, not a temporary one
    with prefect_at(api_url):
        ContentAddressedStorage.register_type_and_schema()
        ContentAddressedStorage(basepath=url).save(name, overwrite=True)
    out.print(f"saved block content-addressed-storage/{name} -> {url} on {api_url}")


# -- the pipeline ----------------------------------------------------------
SAMPLE_TITLE = "dvc pull fails with my S3 remote"


@app.command
def run(
    *,
    set_: Annotated[
        tuple[str, ...],
        Parameter(name=["--set", "-S"], help="Override a parameter, e.g. -S train.C=2.0 "
                  "(repeatable; the key must exist in params.yaml)."),
    ] = (),
    params: Annotated[Path | None, Parameter(help="Params file (default flows/params.yaml).")] = None,
    force: Annotated[bool, Parameter(help="Re-run every stage, ignoring the cache "
                                          "(like dvc repro --force).")] = False,
) -> int:
    """The main job: get-data -> split -> train -> evaluate -> deploy.

    Finds or starts a local Prefect server, runs the pipeline, and shows which
    stages ran and which were Cached, the champion, a prediction, and where to
    look in the Prefect and MLflow UIs. Stages re-run only when their code,
    parameters or data changed.
    """
    from . import runner, tracking

    project = runner.find_project()
    resolved = runner.resolve_params(project, params, list(set_))
    info = runner.connect()
    out.print(f"Prefect server: {info.ui_url}")
    outcome = runner.run_pipeline(project, resolved, info.api_url, force=force)
    result = outcome.result
    table = Table(title="stages", show_header=True)
    table.add_column("stage")
    table.add_column("state")
    for stage_name, state in outcome.stage_states.items():
        table.add_row(stage_name, state)
    out.print(table)
    out.print(f"data version  {result['data']['dataset']} ({result['data']['examples']} examples)")
    metrics = result["metrics"]
    out.print(f"metrics       accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    decision = result["decision"]
    when = " (deploy Cached: decided when it last ran)" if (
        outcome.stage_states.get("deploy") == "Cached") else ""
    out.print(f"model         {resolved['deploy']['model_name']} v{decision['version']}: "
              f"{decision['reason']}{when}")
    tracking.configure(get_settings().home)
    model, version = tracking.load_champion(
        resolved["deploy"]["model_name"], store=ObjectStore(outcome.store_url)
    )
    prediction = tracking.predict_label(model, SAMPLE_TITLE)
    out.print(f"champion      v{version}; predict({SAMPLE_TITLE!r}) -> {json.dumps(prediction)}")
    if outcome.all_cached:
        out.print("nothing changed: every stage Cached, results read back from the store")
    out.print(f"flow run      {info.ui_url}/runs/flow-run/{outcome.flow_run_id}")
    out.print(f"MLflow UI     mlflow ui --backend-store-uri {tracking.mlflow_uri()}")
    return 0


@app.command
def predict(text: str, /, *, model_name: str = "issue-labeler") -> None:
    """Label one issue title with the champion: prints {"label": ..., "score": ...}.

    Parameters
    ----------
    text
        An issue title, e.g. "dvc pull fails with my S3 remote".
    """
    from . import tracking

    tracking.configure(get_settings().home)
    model, _version = tracking.load_champion(model_name, store=_open_store(None))
    out.print(json.dumps(tracking.predict_label(model, text)))


@app.command
def serve(*, port: int = 5001, model_name: str = "issue-labeler") -> int:
    """Serve the champion with MLflow's scoring server (POST /invocations).

    Runs `mlflow models serve --env-manager local` on 127.0.0.1 until stopped.
    Try: curl -d '{"inputs": ["dvc pull fails"]}' -H 'Content-Type: application/json'
    http://127.0.0.1:5001/invocations
    """
    import os
    import subprocess

    from . import tracking

    uri = tracking.configure(get_settings().home)
    tracking.load_champion(model_name)  # a clear error now rather than in MLflow's log
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.exists() else "mlflow", "models", "serve",
               "-m", f"models:/{model_name}@champion", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]
    err.print(f"serving models:/{model_name}@champion on http://127.0.0.1:{port}/invocations")
    # NOTE: MLflow starts `uvicorn` by name: the venv's bin must be on PATH even
    # when uncool was started by its full path without activating the venv.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.call(command, env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path})


@app.command
def reproduce(target: str, /, *, basepath: Basepath = None) -> int:
    """Re-run a recorded run from its own config, data and code; compare every stage.

    TARGET is a flow run id, 'champion', models:/NAME/VERSION or an object id.
    The cache is bypassed and the model is registered into a scratch MLflow
    store. Exit 0 only if every stage's output is byte-identical to the
    recorded one; otherwise the first stage that diverged and the likely cause.

    Parameters
    ----------
    target
        What to reproduce: a flow run id, champion, models:/issue-labeler/3, or an object id.
    """
    from . import runner
    from .reproduce import reproduce as reproduce_run

    store = _open_store(basepath)
    info = runner.connect()
    result = reproduce_run(store, target, get_settings().home, info.api_url)
    table = Table(title=f"reproduce {result.run_id} (as {result.reproduced_run_id})")
    for column in ("stage", "recorded", "reproduced", ""):
        table.add_column(column)
    for check in result.checks:
        for key, recorded in check.recorded.items():
            again = check.reproduced.get(key)
            verdict = "identical" if recorded == again else "[red]different[/red]"
            table.add_row(f"{check.stage} {key}", str(recorded)[:16], str(again)[:16], verdict)
    table.add_row("deploy", "-", "-", "not compared (scratch registry)")
    out.print(table)
    first = result.first_divergence
    if first is None:
        out.print("every stage reproduced byte for byte")
        return 0
    err.print(f"first divergence: {first.stage}. Likely cause: {result.likely_cause()}")
    return 1


@app.command(name="sample-data")
def sample_data(dest: Path, /, *, day: int, seed: int = 0) -> None:
    """Write day DAY of the sample issues into DEST as LABEL/ID.txt files, deterministically.

    Parameters
    ----------
    dest
        Dataset folder; each new day adds new files beside the earlier ones.
    day
        Which day (1, 2, ...): later days drift in vocabulary.
    seed
        Picks one of many reproducible datasets.
    """
    from .sources import write_sample_day

    written = write_sample_day(dest, day, seed=seed)
    out.print(f"wrote {len(written)} issues for day {day} into {dest}")


# -- lineage ---------------------------------------------------------------
def _register_lineage_commands() -> None:
    from .cli_experiments import diff, exp_app
    from .cli_lineage import checkout, lineage

    app.command(lineage)
    app.command(checkout)
    app.command(exp_app)
    app.command(diff)


_register_lineage_commands()


# -- automation --------------------------------------------------------------
def _register_automation_commands() -> None:
    from .cli_automation import deploy, watch, worker

    app.command(deploy)
    app.command(worker)
    app.command(watch)


_register_automation_commands()


# -- demo ------------------------------------------------------------------
@app.command
def demo(*, runs: int = 2) -> int:
    """A tour of the store: a small flow whose results land in it, run twice.

    Finds or starts a local Prefect server, saves the store as the block
    `content-addressed-storage/uncool-demo`, runs flows/store_demo.py in a
    fresh process RUNS times (the second is all Cached), then shows `store du`.
    """
    from .demo import run_demo

    return run_demo(runs=runs, console=out)


def main() -> None:
    """Console entry point: store errors become one clear line and exit code 2."""
    # NOTE: registered first, so it runs last at exit, after Prefect's and
    # MLflow's flush handlers: the interpreter's final garbage collection over
    # their modules (and scikit-learn's) then has nothing to scan, saving ~1 s
    # per command. Python never promised to finalize objects left at exit.
    import gc as gc_module  # `gc` is the store command here

    atexit.register(gc_module.freeze)
    try:
        app()
    except StoreError as exc:
        err.print(f"error: {exc}")
        sys.exit(2)
    except Exception as exc:
        if _is_user_error(exc):
            err.print(f"error: {exc}")
            sys.exit(2)
        raise


def _is_user_error(exc: BaseException) -> bool:
    """Errors whose message already says what to do: no traceback for those."""
    from .compute import ComputeError
    from .deploy import DeployError
    from .events import WatchError
    from .params import ParamsError
    from .server import ServerError
    from .sources import DataError

    return isinstance(exc, (ServerError, ParamsError, LookupError, DataError, DeployError,
                                WatchError, ComputeError))


if __name__ == "__main__":
    main()
