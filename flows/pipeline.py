"""The issue labeler on Prefect: get-data -> split -> train -> evaluate -> deploy.

Every stage's output is an object in the content-addressed store and the
stages pass object ids to each other, so a stage's cache key (its code, the
project code it calls, its parameters, and the content of any folder it
reads) changes exactly when its inputs do: what DVC decides with dvc.lock,
Prefect decides here with the ContentAware cache policy.

    uncool run                     # the whole pipeline, embedded defaults
    uncool run -S train.C=2.0      # train, evaluate and deploy re-run; the rest is Cached
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import labeler
from prefect import flow, get_run_logger, task
from prefect.context import SettingsContext
from prefect.runtime import flow_run

from uncool_prefect import compute, reports, tracking
from uncool_prefect.caching import ContentAware
from uncool_prefect.lineage import build_record, run_trigger, snapshot_code, snapshot_environment
from uncool_prefect.settings import get_settings
from uncool_prefect.sources import (
    DataError,
    fetch_issues,
    load_examples,
    resolve_github_token,
    snapshot_folder,
    write_examples,
    write_sample,
)

BLOCK = get_settings().block
STORAGE = f"content-addressed-storage/{BLOCK}"
FLOWS_DIR = Path(__file__).resolve().parent

stage = functools.partial(
    task, result_storage=STORAGE, persist_result=True,
    cache_policy=ContentAware(), retries=0,
)


@functools.cache
def _store() -> Any:
    from uncool_prefect import ContentAddressedStorage

    return ContentAddressedStorage.load(BLOCK).store


def _rows_from_dataset(dataset: str, labels: list[str]) -> list[dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="uncool-data-") as tmp:
        folder = _store().get_dir(dataset, Path(tmp) / "data")
        examples = load_examples(folder, labels)
    return [{"id": e.id, "text": e.text, "label": e.label} for e in examples]


@stage(name="get-data")
def get_data(source: Path, labels: list[str]) -> dict[str, Any]:
    """Validate a snapshot of the data and store it; its manifest hash is the data version."""
    examples = load_examples(source, labels)  # raises a clear DataError on bad input
    ref = _store().put_dir(source)
    counts = Counter(e.label for e in examples)
    get_run_logger().info("data version %s: %d examples %s", ref.name, len(examples), dict(counts))
    return {"dataset": ref.name, "examples": len(examples), "label_counts": dict(sorted(counts.items()))}


@stage(name="split")
def split(dataset: str, labels: list[str], test_size: float, seed: int) -> dict[str, str]:
    rows = _rows_from_dataset(dataset, labels)
    train_rows, val_rows = labeler.split_rows(rows, test_size, seed)
    store = _store()
    return {
        "train": store.put_bytes(labeler.rows_to_jsonl(train_rows)).oid,
        "val": store.put_bytes(labeler.rows_to_jsonl(val_rows)).oid,
    }


def _block_store() -> Any:
    """The store, loaded afresh: unlike ``_store`` it pickles by value.

    NOTE: Dask workers receive the train and trial tasks (and all they reach)
    pickled by value, since they cannot import this file; a functools.cache
    wrapper pickles by name only.
    """
    from uncool_prefect import ContentAddressedStorage

    return ContentAddressedStorage.load(BLOCK).store


@stage(name="trial")
def trial(train_split: str, params: dict[str, Any], selection: dict[str, Any],
          device: str) -> dict[str, Any]:
    """One point of the sweep, on a Dask worker: fit, score on held-out rows, refit, store.

    Cached by content like every stage: the same split, params, selection and
    device (and code) give the stored model back without training.
    """
    store = _block_store()
    rows = labeler.jsonl_to_rows(store.get_bytes(train_split))
    model, scores = labeler.run_trial(rows, params, selection["metric"], float(selection["val_size"]),
                                      int(selection["seed"]), device)
    return {"model": store.put_bytes(labeler.dump_model(model)).oid, "params": params,
            "scores": scores, "device": device}


@flow(name="sweep")
def sweep(train_split: str, points: list[dict[str, Any]], selection: dict[str, Any], device: str,
          gpu: bool, refresh: bool = False) -> list[dict[str, Any]]:
    """Every trial submitted at once to the flow's task runner (a Dask cluster).

    Returns each trial's result with its final state (``Completed`` or ``Cached``).
    """
    import sys

    import cloudpickle
    import dask

    # Workers cannot import this file (it is loaded by path) nor, on another
    # machine, labeler.py: both travel by value with the task.
    for module in (trial.fn.__module__, labeler.__name__):
        cloudpickle.register_pickle_by_value(sys.modules[module])
    futures = []
    for params, point in points_and_labels(points):
        task_ = trial.with_options(task_run_name=f"trial[{point}]", refresh_cache=refresh or None)
        resources = {"GPU": 1} if gpu else {}
        with dask.annotate(resources=resources):
            futures.append(task_.submit(train_split, params, selection, device))
    results = []
    for future in futures:
        result = future.result()  # a failed trial fails the sweep, with its error
        results.append({**result, "state": future.state.name})
    return results


def points_and_labels(points: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """Each trial's params with a short label naming what the grid set (for run names)."""
    return [(p["params"], ",".join(f"{k}={v}" for k, v in sorted(p["point"].items())) or "base")
            for p in points]


@stage(name="train")
def train(train_split: str, params: dict[str, Any], lineage: dict[str, str],
          tracking_uri: str) -> dict[str, Any]:
    """The sweep over ``params["sweep"]``, the best trial's model stored and logged to MLflow.

    The Dask cluster starts here, only on a cache miss: a no-op run starts none.
    Each trial is an MLflow child run of this stage's run. The tracking URI is
    an input because the result names an MLflow run: a result cached against
    another MLflow store would name a run it lacks.
    """
    import mlflow
    import mlflow.sklearn
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

    logger = get_run_logger()
    config = dict(params.get("sweep") or {})
    metric = str(config.get("metric", "macro_f1"))
    selection = {"metric": metric, "val_size": float(config.get("val_size", 0.25)),
                 "seed": int(params.get("seed", 0))}
    points = [{"point": point, "params": labeler.trial_params(params, point)}
              for point in labeler.expand_grid(config.get("grid"))]
    choice = compute.probe(compute.choose())
    device = str(config.get("device", "auto"))
    if device == "auto":
        device = "gpu" if choice.gpu else "cpu"
    elif device == "gpu" and not choice.gpu:
        raise compute.ComputeError(f"train.sweep.device is gpu but the cluster has no GPU: "
                                   f"{choice.reason}; use -S train.sweep.device=auto")
    runner = compute.task_runner(choice, log=logger)
    logger.info("sweep: %d trial(s) on %s", len(points), device)
    # NOTE: run in an empty context, so not as a subflow: a subflow adds a
    # task run to the pipeline's flow run, whose task runs are its five stages
    # (what `uncool run` reports and the run record keeps). The MLflow run and
    # the log name the sweep's flow run instead. The settings in force (the
    # server `uncool run` found) go along: without them the sweep would fall
    # back to the settings read at import and start an ephemeral server.
    settings = SettingsContext.get()
    name = f"sweep-for-{flow_run.name}"  # read here: the empty context has no flow run

    def run_sweep() -> Any:
        with settings.model_copy() if settings else contextlib.nullcontext():
            return sweep.with_options(task_runner=runner, flow_run_name=name)(
                train_split, points, selection, device, choice.gpu and device == "gpu",
                refresh=bool(PREFECT_TASKS_REFRESH_CACHE.value()), return_state=True,
            )

    swept = contextvars.Context().run(run_sweep)
    sweep_run_id = str(swept.state_details.flow_run_id)
    trials = swept.result()
    # The first of equals wins: the grid's order is stable.
    best = max(range(len(trials)), key=lambda i: (trials[i]["scores"][metric], -i))
    chosen = trials[best]
    labels = [label for _, label in points_and_labels(points)]
    model = labeler.load_model(_block_store().get_bytes(chosen["model"]))
    tracking.configure(get_settings().home)
    tags = {**lineage, "prefect_flow_run_id": str(flow_run.id or "")}
    with mlflow.start_run(run_name=f"train-{chosen['model'][:8]}") as run:
        mlflow.log_params({**dict(_flat(chosen["params"])),
                           **{f"sweep.{k}": v for k, v in _flat(config)}})
        mlflow.set_tags({**tags, "model_oid": chosen["model"], "prefect_sweep_flow_run_id": sweep_run_id,
                         "sweep.trials": str(len(trials)),
                         "sweep.best": labels[best], "device": device})
        logged = mlflow.sklearn.log_model(
            model, name="model",
            pip_requirements=["scikit-learn", "numpy", "scipy"],
        )
        for label, result in zip(labels, trials, strict=True):
            with mlflow.start_run(run_name=f"trial[{label}]", nested=True):
                mlflow.log_params(dict(_flat(result["params"])))
                mlflow.log_metrics({f"val_{k}": v for k, v in result["scores"].items()})
                mlflow.set_tags({**tags, "model_oid": result["model"], "state": result["state"],
                                 "chosen": str(result is chosen).lower(), "device": device})
    logger.info("best of %d trial(s): %s (%s %.3f); model %s, MLflow run %s, sweep flow run %s",
                len(trials), labels[best], metric, chosen["scores"][metric],
                chosen["model"], run.info.run_id, sweep_run_id)
    return {"model": chosen["model"], "mlflow_run_id": run.info.run_id,
            "mlflow_model_uri": logged.model_uri, "metric": metric, "device": device,
            "runner": choice.kind, "sweep_flow_run_id": sweep_run_id,
            "trials": [{"label": label, "state": t["state"], "model": t["model"],
                        "scores": t["scores"]}
                       for label, t in zip(labels, trials, strict=True)]}


@stage(name="evaluate")
def evaluate(model: str, val_split: str, labels: list[str], mlflow_run_id: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    fitted = labeler.load_model(_store().get_bytes(model))
    rows = labeler.jsonl_to_rows(_store().get_bytes(val_split))
    metrics, confusion = labeler.evaluate_model(fitted, rows, labels)
    metrics_oid = _store().put_bytes(labeler.rows_to_jsonl([metrics])).oid  # type: ignore[list-item]
    tracking.configure(get_settings().home)
    client = MlflowClient()
    for name, value in metrics.items():
        client.log_metric(mlflow_run_id, name, value)
    reports.publish_evaluation(metrics, confusion, labels)
    return {"metrics": metrics, "confusion": confusion, "metrics_oid": metrics_oid}


@stage(name="deploy")
def deploy(trained: dict[str, Any], evaluated: dict[str, Any], deploy_params: dict[str, Any],
           lineage: dict[str, str]) -> dict[str, Any]:
    """Register a version; champion only if it beats the current one."""
    tracking.configure(get_settings().home)
    decision = tracking.register_and_gate(
        model_name=deploy_params["model_name"],
        run_id=trained["mlflow_run_id"],
        model_uri=trained["mlflow_model_uri"],
        metrics=evaluated["metrics"],
        gate_metric=deploy_params["gate_metric"],
        min_improvement=float(deploy_params["min_improvement"]),
        # NOTE: the code hash is a tag, not an input: an edit elsewhere in
        # the plugin must not register the same model again.
        tags={**lineage, "code_hash": snapshot_code(_store(), _code_roots())["snapshot"],
              "model_oid": trained["model"],
              "prefect_flow_run_id": str(flow_run.id or "")},
    )
    summary = decision.__dict__
    reports.publish_report(reports.report_markdown(
        model_name=deploy_params["model_name"], decision=summary,
        metrics=evaluated["metrics"], dataset=lineage["data_hash"], model_oid=trained["model"],
        params_hash=lineage["params_hash"], mlflow_run_id=trained["mlflow_run_id"],
    ))
    get_run_logger().info("v%s: %s", decision.version, decision.reason)
    return summary


def materialize_source(data: dict[str, Any]) -> Path:
    """A local folder holding the data the params point at (not a stage: no caching).

    The sample is generated once per (seed, days); a local folder is used in
    place; a bucket or the GitHub API is copied into ``<UNCOOL_HOME>/data``.
    Whatever it is, get-data hashes its content, so only a real change re-runs.
    """
    home = get_settings().home.absolute() / "data"
    labels = list(data["labels"])
    kind = data.get("source")
    if kind == "sample":
        sample = data["sample"]
        dest = home / f"sample-seed{sample['seed']}-days{sample['days']}"
        done = dest.with_name(dest.name + ".complete")
        if not done.exists():
            write_sample(dest, int(sample["days"]), seed=int(sample["seed"]), labels=labels)
            done.touch()
        return dest
    if kind == "folder":
        url = data["folder"].get("url")
        if not url:
            raise DataError("data.source is folder but data.folder.url is empty; "
                            "set it, e.g. -S data.folder.url=data/issues")
        return snapshot_folder(str(url), home / "snapshot")
    if kind == "github":
        github = data["github"]
        examples = fetch_issues(
            github["repo"], labels, since=github.get("since"), until=github.get("until"),
            token=resolve_github_token(github.get("token_secret")),
            api_url=github.get("api_url") or "https://api.github.com",
        )
        dest = home / "github" / str(github["repo"]).replace("/", "__")
        write_examples(examples, dest)
        return dest
    raise DataError(f"data.source {kind!r} is unknown; choose sample, folder or github")


def _code_roots() -> dict[str, Path]:
    import uncool_prefect

    return {"flows": FLOWS_DIR, "uncool_prefect": Path(uncool_prefect.__file__).parent}


def _flat(params: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    from uncool_prefect.params import flatten

    return list(flatten(params, prefix))


def resolve_dataset(dataset: str) -> str | None:
    """An object id as it is; ``watch:<name>``: the snapshot the watcher of <name> announced last.

    None when that watcher has announced nothing yet.
    """
    from uncool_prefect.events import last_announced

    if not dataset.startswith("watch:"):
        return dataset
    state = last_announced(_store(), dataset.removeprefix("watch:"))
    return str(state["oid"]) if state else None


def dataset_folder(dataset: str) -> Path:
    """A local copy of a dataset already in the store (as the watcher announced it)."""
    dest = get_settings().home.absolute() / "data" / "datasets" / dataset
    if not dest.is_dir():  # get_dir builds aside and renames: a folder here is complete
        _store().get_dir(dataset, dest)
    return dest


@flow(name="train-evaluate-deploy", log_prints=True)
def train_evaluate_deploy(params: dict[str, Any] | None = None, source: str | None = None,
                          dataset: str | None = None) -> dict[str, Any]:
    """The whole pipeline on one data snapshot.

    Args:
        params: The resolved params.yaml (see `uncool run -S`); by default the
            params.yaml beside this file, as versioned with the code.
        source: A local data folder; by default the one ``params["data"]`` names.
        dataset: The object id of a dataset in the store, e.g. from an
            ``uncool.dataset.updated`` event, or ``watch:<name>`` for the
            snapshot the watcher of <name> announced last; wins over ``source``.
    """
    from uncool_prefect.params import load_params, params_hash

    started = time.time()
    if not params:
        params = load_params(FLOWS_DIR / "params.yaml")
    # NOTE: deployment triggers pass "" for a payload field that is missing.
    snapshot = resolve_dataset(dataset) if dataset else None
    if snapshot:
        source = str(dataset_folder(snapshot))
    elif dataset:
        get_run_logger().warning("no dataset announced yet for %s: using the data params.yaml names",
                                 dataset)
    if not source:
        source = str(materialize_source(params["data"]))
    labels = list(params["data"]["labels"])
    states: dict[str, str] = {}

    def run(stage_task: Any, *args: Any) -> Any:
        state = stage_task(*args, return_state=True)
        states[stage_task.name] = state.name
        return state.result()  # a failed stage fails the flow here

    data = run(get_data, Path(source), labels)
    splits = run(split, data["dataset"], labels, float(params["split"]["test_size"]),
                 int(params["split"]["seed"]))
    # NOTE: each stage gets only what it depends on, so that its cache key
    # changes with those inputs and nothing else (a deploy setting must not
    # retrain the model).
    trained = run(train, splits["train"], params["train"], {"data_hash": data["dataset"]},
                  tracking.tracking_uri(get_settings().home))
    evaluated = run(evaluate, trained["model"], splits["val"], labels, trained["mlflow_run_id"])
    lineage = {"data_hash": data["dataset"], "params_hash": params_hash(params)}
    decision = run(deploy, trained, evaluated, params["deploy"], lineage)

    store = _store()
    outputs = {
        "get-data": {"dataset": data["dataset"]},
        "split": {"train": splits["train"], "val": splits["val"]},
        "train": {"model": trained["model"]},
        "evaluate": {"metrics": evaluated["metrics_oid"]},
        "deploy": {"model_version": decision["version"], "promoted": decision["promoted"]},
    }
    record = build_record(
        flow_run_id=str(flow_run.id), flow_name=str(flow_run.flow_name), started=started,
        params=params, params_hash=lineage["params_hash"],
        code=snapshot_code(store, _code_roots()), environment=snapshot_environment(store),
        stages={name: {"state": states[name], "outputs": outputs[name]} for name in outputs},
        data=data["dataset"], trigger=run_trigger(), store_url=store.url,
        mlflow={"run_id": trained["mlflow_run_id"], "model_name": params["deploy"]["model_name"],
                "model_version": decision["version"], "tracking_uri":
                tracking.tracking_uri(get_settings().home)},
    )
    get_run_logger().info("run record: %s", store.put_run_record(str(flow_run.id), record))
    return {"data": data, "model": trained["model"], "metrics": evaluated["metrics"],
            "decision": decision, "mlflow_run_id": trained["mlflow_run_id"]}
