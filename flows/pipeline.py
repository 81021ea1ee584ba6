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
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import labeler
from prefect import flow, get_run_logger
from prefect.context import SettingsContext
from prefect.runtime import flow_run

from uncool_prefect import (
    Gate,
    compute,
    get_store,
    pipeline,
    register_model,
    replayed_input,
    reports,
    stage,
    tracking,
)
from uncool_prefect.params import ParamsError
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


def _rows_from_dataset(dataset: str, labels: list[str]) -> list[dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="uncool-data-") as tmp:
        folder = get_store().get_dir(dataset, Path(tmp) / "data")
        examples = load_examples(folder, labels)
    return [{"id": e.id, "text": e.text, "label": e.label} for e in examples]


@stage(name="get-data")
def get_data(source: Path, label_counts: dict[str, int]) -> dict[str, Any]:
    """Store a snapshot of the (already validated) data; its manifest hash is the data version.

    ``source`` is a path: stored and recorded as the run's input as its cache
    key is made, so the put below finds every file there already.
    """
    ref = get_store().put_dir(source)
    get_run_logger().info("data version %s: %d examples %s", ref.name,
                          sum(label_counts.values()), label_counts)
    return {"dataset": ref.name, "examples": sum(label_counts.values()), "label_counts": label_counts}


@stage(name="split")
def split_data(dataset: str, labels: list[str], test_size: float, seed: int) -> dict[str, str]:
    rows = _rows_from_dataset(dataset, labels)
    train_rows, val_rows = labeler.split_rows(rows, test_size, seed)
    store = get_store()
    return {
        "train": store.put_bytes(labeler.rows_to_jsonl(train_rows)).oid,
        "val": store.put_bytes(labeler.rows_to_jsonl(val_rows)).oid,
    }


@stage(name="trial")
def trial(train_split: str, params: dict[str, Any], selection: dict[str, Any],
          device: str) -> dict[str, Any]:
    """One point of the sweep (a thread, or a Dask worker): fit, score on held-out rows, refit, store.

    Cached by content like every stage: the same split, params, selection and
    device (and code) give the stored model back without training.
    """
    store = get_store()
    rows = labeler.jsonl_to_rows(store.get_bytes(train_split))
    model, scores = labeler.run_trial(rows, params, selection["metric"], float(selection["val_size"]),
                                      int(selection["seed"]), device)
    return {"model": store.put_bytes(labeler.dump_model(model)).oid, "params": params,
            "scores": scores, "device": device}


@flow(name="sweep")
def sweep(train_split: str, points: list[dict[str, Any]], selection: dict[str, Any], device: str,
          gpu: bool, refresh: bool = False) -> list[dict[str, Any]]:
    """Every trial submitted at once to the flow's task runner (threads, or a Dask cluster).

    Returns each trial's result with its final state (``Completed`` or ``Cached``).
    """
    import sys

    import cloudpickle

    # Workers cannot import this file (it is loaded by path) nor, on another
    # machine, labeler.py: both travel by value with the task.
    for module in (trial.fn.__module__, labeler.__name__):
        cloudpickle.register_pickle_by_value(sys.modules[module])
    futures = []
    for params, point in points_and_labels(points):
        task_ = trial.with_options(task_run_name=f"trial[{point}]", refresh_cache=refresh or None)
        # One GPU per trial on Dask; on threads there is nothing to annotate (nor dask to import).
        with _one_gpu_each() if gpu else contextlib.nullcontext():
            futures.append(task_.submit(train_split, params, selection, device))
    results = []
    for future in futures:
        result = future.result()  # a failed trial fails the sweep, with its error
        results.append({**result, "state": future.state.name})
    return results


def _one_gpu_each() -> Any:
    import dask

    return dask.annotate(resources={"GPU": 1})


def points_and_labels(points: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """Each trial's params with a short label naming what the grid set (for run names)."""
    return [(p["params"], ",".join(f"{k}={v}" for k, v in sorted(p["point"].items())) or "base")
            for p in points]


@stage(name="train")
def train_model(train_split: str, params: dict[str, Any], lineage: dict[str, str],
          tracking_uri: str) -> dict[str, Any]:
    """The sweep over ``params["sweep"]``, the best trial's model stored and logged to MLflow.

    Where the trials run is chosen here, only on a cache miss (a no-op run
    starts nothing): a small sweep on threads in this process, a big one on a
    Dask cluster (see uncool_prefect.compute; the log says which and why).
    Each trial is an MLflow child run of this stage's run. The tracking URI is
    an input because the result names an MLflow run: a result cached against
    another MLflow store would name a run it lacks.
    """
    import mlflow
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

    logger = get_run_logger()
    config = dict(params.get("sweep") or {})
    metric = str(config.get("metric", "macro_f1"))
    selection = {"metric": metric, "val_size": float(config.get("val_size", 0.25)),
                 "seed": int(params.get("seed", 0))}
    points = [{"point": point, "params": labeler.trial_params(params, point)}
              for point in labeler.expand_grid(config.get("grid"))]
    train_rows = len(labeler.jsonl_to_rows(get_store().get_bytes(train_split)))
    choice = compute.probe(compute.choose(work=train_rows * len(points)))
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
    model = labeler.load_model(get_store().get_bytes(chosen["model"]))
    tracking.configure_default()
    tags = {**lineage, "prefect_flow_run_id": str(flow_run.id or "")}
    with mlflow.start_run(run_name=f"train-{chosen['model'][:8]}") as run:
        mlflow.log_params({**dict(_flat(chosen["params"])),
                           **{f"sweep.{k}": v for k, v in _flat(config)}})
        mlflow.set_tags({**tags, "model_oid": chosen["model"], "prefect_sweep_flow_run_id": sweep_run_id,
                         "sweep.trials": str(len(trials)),
                         "sweep.best": labels[best], "device": device})
        logged = tracking.log_model(
            model, pip_requirements=["scikit-learn", "numpy", "scipy"],
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
def evaluate_model(model: str, val_split: str, labels: list[str], model_name: str) -> dict[str, Any]:
    """Metrics and the confusion matrix on the validation split, stored and shown in the UI."""
    store = get_store()
    fitted = labeler.load_model(store.get_bytes(model))
    rows = labeler.jsonl_to_rows(store.get_bytes(val_split))
    metrics, confusion = labeler.evaluate_model(fitted, rows, labels)
    reports.publish_evaluation(model_name, metrics, confusion, labels)
    return {"metrics": store.put_bytes(labeler.rows_to_jsonl([metrics])).oid,  # type: ignore[list-item]
            "values": metrics, "confusion": confusion}


@stage(name="deploy")
def deploy_model(trained: dict[str, Any], evaluated: dict[str, Any], deploy: dict[str, Any],
                 data_version: str, val_split: str, labels: list[str]) -> Any:
    """Register a version; champion only if it beats the current one on the same rows.

    The gate scores the new model and the current champion on this run's
    validation split (see the README): a champion registered on older data is
    judged on today's rows, not by the number it logged then.
    """
    rows = labeler.jsonl_to_rows(get_store().get_bytes(val_split))

    def score(model: Any) -> dict[str, float]:
        return labeler.evaluate_model(model, rows, labels)[0]

    registration = register_model(
        trained["mlflow_model_uri"], deploy["model_name"], evaluated["values"],
        gate=Gate(metric=deploy["gate_metric"], min_improvement=float(deploy["min_improvement"]),
                  score=score, scored_on=f"validation split {val_split}"),
        tags={"data_hash": data_version, "model_oid": trained["model"]},
    )
    get_run_logger().info("v%s: %s", registration.version, registration.decision.reason)
    return registration


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
    state = last_announced(get_store(), dataset.removeprefix("watch:"))
    return str(state["oid"]) if state else None


def dataset_folder(dataset: str) -> Path:
    """A local copy of a dataset already in the store (as the watcher announced it)."""
    dest = get_settings().home.absolute() / "data" / "datasets" / dataset
    if not dest.is_dir():  # get_dir builds aside and renames: a folder here is complete
        get_store().get_dir(dataset, dest)
    return dest


@pipeline(name="train-evaluate-deploy", log_prints=True)
def train_evaluate_deploy(data: dict[str, Any] | None = None, split: dict[str, Any] | None = None,
                          train: dict[str, Any] | None = None,
                          evaluate: dict[str, Any] | None = None,
                          deploy: dict[str, Any] | None = None,
                          dataset: str | None = None) -> dict[str, Any]:
    """The whole pipeline on one data snapshot.

    Args:
        data, split, train, evaluate, deploy: The sections of params.yaml
            (`uncool run -S` overrides them); left out, they come from the
            params.yaml shipped with this code.
        dataset: The object id of a dataset in the store, e.g. from an
            ``uncool.dataset.updated`` event, or ``watch:<name>`` for the
            snapshot the watcher of <name> announced last; wins over ``data``.
    """
    missing = [name for name, section in (("data", data), ("split", split), ("train", train),
                                          ("deploy", deploy)) if not section]
    if missing:
        raise ParamsError(f"the pipeline needs the params sections {', '.join(missing)}; "
                          "run it with flows/params.yaml (uncool run) or pass them")
    # NOTE: deployment triggers pass "" for a payload field that is missing.
    snapshot = resolve_dataset(dataset) if dataset else None
    replayed = replayed_input("get-data", "source")  # `uncool reproduce`: the recorded data
    if replayed:
        source = replayed
    elif snapshot:
        source = dataset_folder(snapshot)
    else:
        if dataset:
            get_run_logger().warning("no dataset announced yet for %s: using the data "
                                     "params.yaml names", dataset)
        source = materialize_source(data)
    labels = list(data["labels"])
    # Bad data stops the run here, with one clear line, before any stage starts.
    counts = Counter(e.label for e in load_examples(source, labels))

    got = get_data(source, dict(sorted(counts.items())))
    splits = split_data(got["dataset"], labels, float(split["test_size"]), int(split["seed"]))
    # NOTE: each stage gets only what it depends on, so that its cache key
    # changes with those inputs and nothing else (a deploy setting must not
    # retrain the model).
    trained = train_model(splits["train"], train, {"data_hash": got["dataset"]},
                          tracking.tracking_uri(get_settings().home))
    evaluated = evaluate_model(trained["model"], splits["val"], labels, deploy["model_name"])
    registration = deploy_model(trained, evaluated, deploy, got["dataset"], splits["val"], labels)
    return {"data": got, "model": trained["model"], "metrics": evaluated["values"],
            "version": registration.version, "promoted": registration.promoted,
            "mlflow_run_id": trained["mlflow_run_id"]}
