"""``uncool run``, ``init``, ``predict``, ``serve``, ``reproduce``, ``sample-data``, ``demo``.

Each reads the project's ``[tool.uncool]`` table (see
:mod:`uncool_prefect.project.config`) where it needs the pipeline or the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

from cyclopts import Parameter
from rich.table import Table

from ..settings import get_settings
from .common import Basepath, app, err, open_cli_store, out

SHOWN_METRICS = 3
ModelName = Annotated[str | None, Parameter(
    help="Registered model name; default: model in [tool.uncool].")]


@app.command
def run(
    *,
    set_: Annotated[
        tuple[str, ...],
        Parameter(name=["--set", "-S"], help="Override a value of the params file, e.g. "
                  "-S train.C=2.0 (repeatable; the key must exist there, the type must match)."),
    ] = (),
    params: Annotated[Path | None, Parameter(
        help="Params file; default: params in [tool.uncool]. Its top-level keys are the "
             "flow's parameters.")] = None,
    force: Annotated[bool, Parameter(help="Re-run every stage, ignoring the cache "
                                          "(like dvc repro --force).")] = False,
) -> int:
    """The main job: the project's pipeline ([tool.uncool] pipeline), on a real Prefect server.

    Finds or starts a local Prefect server, runs the pipeline with the params
    file (and -S overrides) as its parameters, and shows each stage's state
    (Completed, or Cached when its code, parameters and input data are
    unchanged), the data version, the model decision, and where to look in
    the Prefect and MLflow UIs. Exit 1 if the pipeline failed.
    """
    from ..config import load_config
    from ..project import runner

    config = load_config()
    resolved = runner.resolve_params(config, params, list(set_))
    info = runner.connect()
    out.print(f"Prefect server: {info.ui_url}")
    outcome = runner.run_pipeline(config, resolved, info.api_url, force=force)
    print_summary(outcome, info.ui_url)
    if outcome.error is not None:
        if runner.is_clear_error(outcome.error):
            raise outcome.error
        err.print(f"error: the pipeline failed: {type(outcome.error).__name__}: {outcome.error} "
                  f"(its log above has the traceback)")
        return 1
    return 0


@app.command
def status(
    *,
    set_: Annotated[
        tuple[str, ...],
        Parameter(name=["--set", "-S"], help="As for uncool run: the status of a run with "
                  "these overrides."),
    ] = (),
    params: Annotated[Path | None, Parameter(help="Params file, as for uncool run.")] = None,
    json_: Annotated[bool, Parameter(name="--json", help="Print JSON for scripts.")] = False,
) -> int:
    """Which stages `uncool run` would re-run, and why; runs nothing (like dvc status).

    Each stage's cache key is made as the run would make it (code, arguments,
    the content of path arguments) and looked up in the store: no flow run,
    no server. A stage that would run says why, compared with the pipeline's
    last run: code changed, an argument changed, an input's content changed,
    or (maybe) a stage it takes a result from re-runs. The pipeline function's own
    body does run (it reads the params and may check the data), its stages
    never. Exit 0 when up to date, 1 when something would run.
    """
    from ..config import load_config
    from ..project import runner
    from ..project.status import pipeline_status

    config = load_config()
    resolved = runner.resolve_params(config, params, list(set_))
    found = pipeline_status(config, resolved)
    if json_:
        print(json.dumps(found.as_dict(), indent=1))
        return 0 if found.up_to_date else 1
    out.print(f"pipeline {found.flow_name} (compared with run {found.last_run or '-: none yet'})",
              markup=False)
    table = Table(show_header=True)
    table.add_column("stage")
    table.add_column("next run")
    table.add_column("why")
    for stage in found.stages:
        shown = {"cached": "Cached", "runs": "runs", "depends": "maybe"}[stage.state]
        table.add_row(stage.name, shown, "; ".join(stage.reasons))
    out.print(table)
    for line in found.params_changed:
        out.print(f"params changed  {line}", markup=False)
    if found.stopped:
        err.print(f"the pipeline body stopped: {found.stopped}", markup=False)
    out.print("up to date: uncool run would find every stage Cached" if found.up_to_date
              else "uncool run would re-run the stages marked runs (and those marked maybe "
                   "if their inputs come out different)")
    return 0 if found.up_to_date else 1


def print_summary(outcome: Any, ui_url: str) -> None:
    """What ran and what was Cached, the data version, the model decision, the links."""
    from .. import tracking

    record = outcome.record or {}
    if outcome.stage_states:
        table = Table(title="stages", show_header=True)
        table.add_column("stage")
        table.add_column("state")
        for stage_name, state in outcome.stage_states.items():
            table.add_row(stage_name, state)
        out.print(table)
    if record.get("data"):
        out.print(f"data version  {record['data']}")
    for model in record.get("models", []):
        metrics = model.get("metrics") or {}
        if metrics:
            # The gate's metric first; the rest are in `uncool exp show`.
            names = sorted(metrics, key=lambda n: (n != model.get("metric"), n))[:SHOWN_METRICS]
            more = len(metrics) - len(names)
            out.print("metrics       " + ", ".join(f"{n} {metrics[n]:.3f}" for n in names)
                      + (f" (+{more} in uncool exp show)" if more else ""), markup=False)
        out.print(f"model         {model['name']} v{model['version']}: {model.get('reason')}",
                  markup=False)
    if record.get("models") and outcome.all_cached:
        out.print("              (registered when the run that computed it ran; nothing new now)")
    if outcome.all_cached:
        out.print("nothing changed: every stage Cached, results read back from the store")
    out.print(f"flow run      {ui_url}/runs/flow-run/{outcome.flow_run_id}")
    if record.get("models"):
        out.print(f"MLflow UI     mlflow ui --backend-store-uri {tracking.tracking_uri(get_settings().home)}")


@app.command
def init(dest: Path, /) -> None:
    """Start a new project in DEST: the issue-labeler example, ready for `uncool run`.

    Writes the example's flows/, its params file, deployments/prefect.yaml and a
    pyproject.toml with its [tool.uncool] table into DEST (new or empty), so
    that `cd DEST && uncool run` trains, evaluates and registers a model with
    nothing else installed than this package.

    Parameters
    ----------
    dest
        A new or empty folder.
    """
    from ..project.init import init_project

    written = init_project(dest)
    out.print(f"wrote the example project into {dest}: {', '.join(written)}")
    out.print(f"next: cd {dest} && uncool run")


def _model_name(model_name: str | None, what: str) -> str:
    from ..config import load_config

    return model_name or load_config().require_model(what)


@app.command
def predict(
    text: Annotated[str, Parameter(help="One input, e.g. an issue title; JSON is parsed.")],
    /,
    *,
    model_name: ModelName = None,
) -> None:
    """Predict one input with the champion: prints {"label": ..., "score": ...}.

    The champion is the version of the project's model (model in
    [tool.uncool], or --model-name) that holds the `champion` alias. A
    classifier answers with its label and score, any other model with its
    prediction.
    """
    from .. import tracking

    name = _model_name(model_name, "`uncool predict`")
    tracking.configure(get_settings().home)
    model, _version = tracking.load_champion(name, store=open_cli_store(None))
    out.print(json.dumps(tracking.predict_one(model, _parse_input(text))))


def _parse_input(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (list, dict)) else text


@app.command
def serve(*, port: int = 5001, model_name: ModelName = None) -> int:
    """Serve the champion with MLflow's scoring server (POST /invocations).

    Runs `mlflow models serve --env-manager local` on 127.0.0.1 for
    models:/MODEL@champion until stopped. Try: curl -d '{"inputs": ["dvc pull
    fails"]}' -H 'Content-Type: application/json' http://127.0.0.1:5001/invocations
    """
    import os
    import subprocess

    from .. import tracking

    name = _model_name(model_name, "`uncool serve`")
    uri = tracking.configure(get_settings().home)
    tracking.load_champion(name)  # a clear error now rather than in MLflow's log
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.exists() else "mlflow", "models", "serve",
               "-m", f"models:/{name}@champion", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]
    err.print(f"serving models:/{name}@champion on http://127.0.0.1:{port}/invocations")
    # NOTE: MLflow starts `uvicorn` by name: the venv's bin must be on PATH even
    # when uncool was started by its full path without activating the venv.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.call(command, env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path})


@app.command
def reproduce(target: str, /, *, basepath: Basepath = None) -> int:
    """Re-run a recorded run from its own parameters, data and code; compare every stage.

    The recorded code snapshot runs in a fresh process with the cache bypassed,
    each stage's recorded input data in place of its path argument, and a
    scratch MLflow store for any model it registers. Exit 0 only if every
    object each stage produced is byte-identical to the recorded one;
    otherwise the first stage that diverged and the likely cause.

    Parameters
    ----------
    target
        What to reproduce: a flow run id (or its start), champion, models:/NAME/3,
        models:/NAME@ALIAS, or an object id a run produced.
    """
    from ..project import runner
    from ..records.reproduce import reproduce as reproduce_run

    store = open_cli_store(basepath)
    info = runner.connect()
    result = reproduce_run(store, target, get_settings().home, info.api_url)
    table = Table(title=f"reproduce {result.run_id} (as {result.reproduced_run_id})")
    for column in ("stage", "recorded", "reproduced", ""):
        table.add_column(column)
    for check in result.checks:
        if check.note:
            table.add_row(check.stage, "-", "-", check.note)
        for key, recorded in check.recorded.items():
            again = check.reproduced.get(key)
            verdict = "identical" if recorded == again else "[red]different[/red]"
            table.add_row(f"{check.stage} {key}", str(recorded)[:16], str(again)[:16], verdict)
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
    from ..sources import write_sample_day

    written = write_sample_day(dest, day, seed=seed)
    out.print(f"wrote {len(written)} issues for day {day} into {dest}")


@app.command
def demo(*, runs: int = 2) -> int:
    """A tour of the store: a small flow whose results land in it, run twice.

    Finds or starts a local Prefect server, saves the store as the block
    `content-addressed-storage/uncool-demo`, runs the store demo flow in a
    fresh process RUNS times (the second is all Cached), then shows `store du`.
    """
    from ..project.demo import run_demo

    return run_demo(runs=runs, console=out)
