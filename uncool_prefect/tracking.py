"""MLflow: where runs, models and the champion live.

One tracking store per project: SQLite at ``<UNCOOL_HOME>/mlflow.db`` with
artifacts beside it, unless ``MLFLOW_TRACKING_URI`` says otherwise. Importing
MLflow costs seconds, so it happens inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHAMPION = "champion"
CHALLENGER = "challenger"


# NOTE: read once, before this process configures MLflow: mlflow.set_tracking_uri
# writes MLFLOW_TRACKING_URI into os.environ, so reading it later would return
# the last project configured here instead of what the user set.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(home: Path) -> str:
    """The tracking URI to use: MLFLOW_TRACKING_URI as the user set it, else SQLite under ``home``."""
    if _USER_TRACKING_URI:
        return _USER_TRACKING_URI
    return f"sqlite:///{(home / 'mlflow.db').absolute()}"


def has_tracking_store(home: Path) -> bool:
    """Whether there is an MLflow store to look in (without creating one)."""
    return bool(_USER_TRACKING_URI) or (home / "mlflow.db").exists()


def default_experiment() -> str:
    """The MLflow experiment of runs: the running flow's name, else the project folder's."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is not None and context.flow is not None:
        return str(context.flow.name)
    from .config import find_root

    root = find_root()
    return root.name if root is not None else "uncool"


def configure(home: Path, experiment: str | None = None) -> str:
    """Point MLflow at the project's store and make sure the experiment exists.

    Args:
        home: UNCOOL_HOME (the SQLite store and artifacts live there by default).
        experiment: The MLflow experiment; default :func:`default_experiment`.
    """
    import mlflow

    uri = tracking_uri(home)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = experiment or default_experiment()
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = (home / "mlartifacts").absolute()
        artifacts.mkdir(parents=True, exist_ok=True)
        try:
            mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
        except Exception:
            if mlflow.get_experiment_by_name(experiment) is None:
                raise
    mlflow.set_experiment(experiment)
    return uri


def configure_default() -> str:
    """:func:`configure` for the settings in force (UNCOOL_HOME, MLFLOW_TRACKING_URI)."""
    from .settings import get_settings

    return configure(get_settings().home)


@dataclass(frozen=True)
class Gate:
    """When a newly registered version becomes champion.

    Args:
        metric: The metric that decides (a key of the ``metrics`` given to
            :func:`register_model`, and of what ``score`` returns).
        min_improvement: How much a challenger must beat the champion by
            (strictly more than this). The first version always wins.
        greater_is_better: False for losses and errors (lower wins).
        score: ``model -> metrics`` on the challenger's validation rows. Given,
            the gate scores the challenger *and* the current champion with it,
            so both are judged on the same rows; a champion that cannot be
            loaded or scored keeps its alias. Without it, the challenger's
            ``metrics`` are compared with those the champion logged when it
            was registered, on the data of its own day (the reason says so).
        scored_on: What the rows are (e.g. the validation split's object id),
            recorded with the decision.
    """

    metric: str
    min_improvement: float = 0.0
    greater_is_better: bool = True
    score: Callable[[Any], dict[str, float]] | None = None
    scored_on: str | None = None


@dataclass(frozen=True)
class Decision:
    """What the gate decided for one registered version, and why."""

    version: str
    promoted: bool
    reason: str
    metric: str
    value: float
    champion_version: str | None = None
    champion_value: float | None = None
    deltas: dict[str, float] = field(default_factory=dict)
    # "same rows" (both scored by Gate.score on scored_on) or "logged metrics".
    compared_on: str = "logged metrics"
    scored_on: str | None = None


@dataclass(frozen=True)
class Registration:
    """What :func:`register_model` did: the model version and the gate's decision.

    Return it from your stage (alone or inside a dict): a run whose stage is
    ``Cached`` then still records which version it stands for.
    """

    name: str
    decision: Decision
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    model_oid: str | None = None
    stage: str | None = None
    tracking_uri: str | None = None

    @property
    def version(self) -> str:
        return self.decision.version

    @property
    def promoted(self) -> bool:
        return self.decision.promoted

    def model_record(self) -> dict[str, Any]:
        """The registration as a run record keeps it (``models`` in the record)."""
        return {"name": self.name, "version": self.decision.version, "run_id": self.run_id,
                "tracking_uri": self.tracking_uri,
                "model_uri": self.model_uri, "metrics": self.metrics, "model_oid": self.model_oid,
                "stage": self.stage,
                **{k: v for k, v in self.decision.__dict__.items() if k != "version"}}


def current_champion(model_name: str) -> Any | None:
    """The ModelVersion holding the champion alias, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def _gate(model_name: str, version: str, metrics: dict[str, float], gate: Gate,
          challenger: Any = None) -> Decision:
    """Compare a new version with the champion; move the aliases; say why.

    The whole decision (read the champion, score, move the alias) holds the
    model's gate lock, so two deploys never both compare with the same old
    champion.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    with _gate_lock(model_name):
        champion = current_champion(model_name)
        if champion is not None and str(champion.version) == str(version):
            champion = None  # registering the same version again cannot beat itself
        if gate.score is not None:
            decision = _judge_on_same_rows(model_name, version, metrics, gate, champion, challenger)
        else:
            decision = _judge_on_logged_metrics(version, metrics, gate, champion, client)
        client.set_registered_model_alias(model_name, CHAMPION if decision.promoted else CHALLENGER,
                                          version)
    tags = {"decision": decision.reason, "gate.compared_on": decision.compared_on,
            "gate.challenger_score": str(decision.value)}
    if decision.champion_value is not None:
        tags["gate.champion_score"] = str(decision.champion_value)
        tags["gate.champion_version"] = str(decision.champion_version)
    if decision.scored_on:
        tags["gate.scored_on"] = decision.scored_on
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return decision


def _verdict(gate: Gate, value: float, champion_value: float) -> tuple[bool, float]:
    gain = value - champion_value if gate.greater_is_better else champion_value - value
    return gain > gate.min_improvement, gain


def _judge_on_logged_metrics(version: str, metrics: dict[str, float], gate: Gate,
                             champion: Any, client: Any) -> Decision:
    value = float(metrics[gate.metric])
    if champion is None:
        return Decision(str(version), True, "first version of the model: it becomes champion",
                        gate.metric, value)
    champion_metrics = client.get_run(champion.run_id).data.metrics
    deltas = {name: float(metrics[name]) - float(champion_metrics[name])
              for name in metrics if name in champion_metrics}
    worst = float("-inf") if gate.greater_is_better else float("inf")
    champion_value = float(champion_metrics.get(gate.metric, worst))
    promoted, gain = _verdict(gate, value, champion_value)
    reason = (("beats the champion: " if promoted else "does not beat the champion: ")
              + f"{gate.metric} {value:.4f} vs champion v{champion.version} {champion_value:.4f} "
              f"(improvement {gain:+.4f}, needed > {gate.min_improvement:+.4f}; the champion's "
              "metric as logged on its own data: pass Gate(score=...) to judge both on the same rows)")
    return Decision(str(version), promoted, reason, gate.metric, value, str(champion.version),
                    champion_value, deltas)


def _judge_on_same_rows(model_name: str, version: str, metrics: dict[str, float], gate: Gate,
                        champion: Any, challenger: Any) -> Decision:
    """Both models scored by ``gate.score`` on the same rows; a champion that fails keeps its alias."""
    from mlflow import MlflowClient

    assert gate.score is not None
    on = f" on {gate.scored_on}" if gate.scored_on else ""
    if challenger is None:  # registered from a URI: load it as the champion is loaded
        challenger = _load_version(model_name, MlflowClient().get_model_version(model_name, version),
                                   _gate_store())
    mine = _scores(gate, challenger)
    value = float(mine[gate.metric])
    if champion is None:
        return Decision(str(version), True, "first version of the model: it becomes champion",
                        gate.metric, value, compared_on="same rows", scored_on=gate.scored_on)
    try:
        theirs = _scores(gate, _load_version(model_name, champion, _gate_store()))
        champion_value = float(theirs[gate.metric])
    except Exception as exc:  # noqa: BLE001 - the reason names it; the champion stays
        return Decision(
            str(version), False,
            f"not promoted: the champion v{champion.version} could not be loaded or scored{on} "
            f"({type(exc).__name__}: {exc}), so the two cannot be compared",
            gate.metric, value, str(champion.version), None, compared_on="same rows",
            scored_on=gate.scored_on)
    deltas = {name: float(mine[name]) - float(theirs[name]) for name in mine if name in theirs}
    promoted, gain = _verdict(gate, value, champion_value)
    reason = (("beats the champion: " if promoted else "does not beat the champion: ")
              + f"{gate.metric} {value:.4f} vs champion v{champion.version} {champion_value:.4f}, "
              f"both scored{on} (improvement {gain:+.4f}, needed > {gate.min_improvement:+.4f})")
    return Decision(str(version), promoted, reason, gate.metric, value, str(champion.version),
                    champion_value, deltas, compared_on="same rows", scored_on=gate.scored_on)


def _scores(gate: Gate, model: Any) -> dict[str, float]:
    assert gate.score is not None
    found = {str(k): float(v) for k, v in dict(gate.score(model)).items()}
    if gate.metric not in found:
        raise ValueError(f"Gate.score returned {', '.join(sorted(found)) or 'nothing'}, "
                         f"not the gate's metric {gate.metric!r}")
    return found


def _load_version(model_name: str, model_version: Any, store: Any | None) -> Any:
    """A registered version (an MLflow ModelVersion): from ``store`` by its ``model_oid`` tag,
    verified against its hash and without MLflow's loader (seconds of imports; skops refuses
    some types); else, or if the store lacks it, through MLflow."""
    import pickle

    oid = (model_version.tags or {}).get("model_oid")
    if store is not None and oid:
        with contextlib.suppress(FileNotFoundError):
            return pickle.loads(store.get_bytes(oid))
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model(f"models:/{model_name}/{model_version.version}")
    with contextlib.suppress(Exception):
        return loaded.unwrap_python_model()  # a custom pyfunc: the model itself
    implementation = getattr(loaded, "_model_impl", None)
    return getattr(implementation, "sklearn_model", None) or loaded


def _gate_store() -> Any:
    from .recording import active_recorder
    from .settings import open_store

    recorder = active_recorder()
    return recorder.store if recorder is not None else open_store()


@contextlib.contextmanager
def _gate_lock(model_name: str) -> Iterator[None]:
    """One decision per model name at a time, across processes and machines: a lease lock in
    the project's store (where the runs that deploy share their results)."""
    import hashlib
    import re
    import uuid

    from .store import StoreError
    from .store.locks import StoreLocks

    locks = StoreLocks(_gate_store().backend)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)[:80]
    key = f"gate/{safe}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"
    holder = f"gate-{uuid.uuid4().hex}"
    if not locks.acquire(key, holder, timeout=_GATE_WAIT_S):
        raise StoreError(f"the champion decision for {model_name!r} waited {_GATE_WAIT_S:.0f} s for "
                         f"another deploy of it (lock {key} in the store); run again")
    try:
        yield
    finally:
        locks.release(key, holder)


# A decision takes seconds (scoring two models); a deploy waits this long for another's.
_GATE_WAIT_S = 600.0


def register_model(model: Any, name: str, metrics: dict[str, float], *,
                   gate: Gate | None = None, tags: dict[str, str] | None = None,
                   flavor: Any = None) -> Registration:
    """Register a model in MLflow as a new version of ``name``; champion only if it wins the gate.

    Args:
        model: A fitted model (scikit-learn by default; any MLflow flavour
            with ``flavor=``), or the URI of one already logged
            (``runs:/<run id>/model``).
        name: The registered model's name.
        metrics: The new version's metrics; they are logged to its MLflow run.
        gate: What decides the champion; default: the first metric, higher
            is better, any improvement.
        tags: Tags for the version. The pipeline run's lineage (flow run id,
            data version, params hash, code snapshot) is added inside a
            ``@pipeline``.
        flavor: An MLflow flavour module (``mlflow.pytorch``...) for a model
            object that is not scikit-learn.

    Returns:
        The :class:`Registration`: version, decision, MLflow run. Inside a
        ``@pipeline`` it is also noted in the run record.
    """
    import mlflow

    from .recording import active_recorder

    if not metrics:
        raise ValueError("register_model needs the model's metrics, e.g. {'accuracy': 0.91}")
    gate = gate or Gate(metric=next(iter(metrics)))
    if gate.metric not in metrics:
        raise ValueError(f"the gate's metric {gate.metric!r} is not among the metrics given; "
                         f"choose one of {', '.join(sorted(metrics))}")
    configure_default()
    recorder = active_recorder()
    all_tags = {**_lineage_tags(), **(recorder.lineage_tags() if recorder else {}), **(tags or {})}
    if not isinstance(model, str) and "model_oid" not in all_tags:
        import pickle

        # The model by content in the store too: `uncool predict` and the gate load it
        # verified, without MLflow's loader (seconds of imports; skops refuses some types).
        all_tags["model_oid"] = _gate_store().put_bytes(pickle.dumps(model, protocol=5)).oid
    if isinstance(model, str):
        model_uri = model  # logged already: its run is the one the version names
    else:
        with mlflow.start_run(run_name=f"register-{name}", nested=mlflow.active_run() is not None):
            mlflow.set_tags(all_tags)
            model_uri = log_model(model, flavor=flavor).model_uri
    registered = mlflow.register_model(model_uri, name, tags=all_tags)
    version, run_id = str(registered.version), str(registered.run_id or "")
    if run_id:
        # NOTE: the gate reads a champion's metrics from its run, as MLflow's UI shows them.
        from mlflow import MlflowClient

        client = MlflowClient()
        client.log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items()])
        client.set_model_version_tag(name, version, "mlflow_run_id", run_id)
    decision = _gate(name, version, {k: float(v) for k, v in metrics.items()}, gate,
                     challenger=None if isinstance(model, str) else model)
    registration = Registration(name=name, decision=decision, run_id=run_id, model_uri=model_uri,
                                metrics={k: float(v) for k, v in metrics.items()},
                                model_oid=all_tags.get("model_oid"), stage=_stage_name(),
                                tracking_uri=mlflow_uri())
    if recorder is not None:
        recorder.note_model(registration.model_record())
        _publish_report(registration, recorder.input_versions(), all_tags)
    return registration


def _publish_report(registration: Registration, inputs: dict[str, str], tags: dict[str, str]) -> None:
    """The decision as a Prefect artifact of the running flow (the UI's report of each run)."""
    from . import reports

    made_from = {**inputs, "model": registration.model_uri, "MLflow run": registration.run_id,
                 **{k: v for k, v in tags.items() if k != "prefect_flow_run_id"}}
    reports.publish_report(registration.name, reports.report_markdown(
        model_name=registration.name, decision=registration.decision.__dict__,
        metrics=registration.metrics, inputs=made_from))


def _stage_name() -> str | None:
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    return context.task.name if context is not None else None


def _metric(name: str, value: float) -> Any:
    import time

    from mlflow.entities import Metric

    return Metric(key=name, value=float(value), timestamp=int(time.time() * 1000), step=0)


def log_model(model: Any, *, flavor: Any = None, name: str = "model", **options: Any) -> Any:
    """Log ``model`` to the active MLflow run; returns MLflow's ``ModelInfo``.

    A scikit-learn model (the default flavour) is saved in MLflow's ``pickle``
    format: its default, skops, imports for 1.1 s in every process that logs
    a model and refuses tree models without a list of trusted types, while
    MLflow guards loading every format alike (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``).
    Any other flavour module (``mlflow.pytorch``...) gets ``options`` as they are.
    """
    if flavor is not None:
        return flavor.log_model(model, name=name, **options)
    import mlflow.sklearn

    options.setdefault("serialization_format", mlflow.sklearn.SERIALIZATION_FORMAT_PICKLE)
    sklearn_logger = logging.getLogger("mlflow.sklearn")
    sklearn_logger.addFilter(_pickle_caution_said_here)
    try:
        return mlflow.sklearn.log_model(model, name=name, **options)
    finally:
        sklearn_logger.removeFilter(_pickle_caution_said_here)


def _pickle_caution_said_here(record: logging.LogRecord) -> bool:
    """Drop MLflow's warning about pickle on every log: :func:`log_model` says why it is chosen."""
    return "pickle or cloudpickle format" not in record.getMessage()


def _lineage_tags() -> dict[str, str]:
    """The running flow's id: `uncool lineage models:/NAME/N` goes from it to the run record."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return {}
    return {"prefect_flow_run_id": str(context.flow_run.id)}


def load_champion(model_name: str, store: Any | None = None) -> tuple[Any, str]:
    """The champion model and its version; a clear error if none.

    With a ``store``, the model is read from it by the ``model_oid`` tag that
    deploy sets (see :func:`_load_version`); otherwise MLflow loads it.
    """
    champion = current_champion(model_name)
    if champion is None:
        raise LookupError(
            f"no champion for {model_name!r} in {mlflow_uri()}; run `uncool run` first"
        )
    return _load_version(model_name, champion, store), str(champion.version)


def mlflow_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def predict_one(model: Any, value: Any) -> Any:
    """One prediction: ``{"label": ..., "score": ...}`` for a classifier, else the prediction."""
    import numpy as np

    if hasattr(model, "classes_") and (hasattr(model, "predict_proba")
                                       or hasattr(model, "decision_function")):
        scores = (model.predict_proba([value]) if hasattr(model, "predict_proba")
                  else model.decision_function([value]))[0]
        scores = np.atleast_1d(scores)
        if scores.shape[0] == len(model.classes_):
            best = int(np.argmax(scores))
            return {"label": str(model.classes_[best]), "score": round(float(scores[best]), 4)}
    prediction = model.predict([value])[0]
    return prediction.item() if hasattr(prediction, "item") else prediction
