"""MLflow: where runs, models and the champion live.

One tracking store per project: SQLite at ``<UNCOOL_HOME>/mlflow.db`` with
artifacts beside it, unless ``MLFLOW_TRACKING_URI`` says otherwise. Importing
MLflow costs seconds, so it happens inside the functions that need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPERIMENT = "issue-labeler"
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


def configure(home: Path) -> str:
    """Point MLflow at the project's store and make sure the experiment exists."""
    import mlflow

    uri = tracking_uri(home)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = (home / "mlartifacts").absolute()
        artifacts.mkdir(parents=True, exist_ok=True)
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri())
        except Exception:
            if mlflow.get_experiment_by_name(EXPERIMENT) is None:
                raise
    mlflow.set_experiment(EXPERIMENT)
    return uri


@dataclass(frozen=True)
class Decision:
    """What deploy did and why."""

    version: str
    promoted: bool
    reason: str
    metric: str
    value: float
    champion_version: str | None = None
    champion_value: float | None = None
    deltas: dict[str, float] = field(default_factory=dict)


def current_champion(model_name: str) -> Any | None:
    """The ModelVersion holding the champion alias, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def register_and_gate(
    *,
    model_name: str,
    run_id: str,
    model_uri: str,
    metrics: dict[str, float],
    gate_metric: str,
    min_improvement: float,
    tags: dict[str, str],
) -> Decision:
    """Register the run's model as a new version; make it champion only if it wins.

    The first version wins by default. Later ones must beat the champion's
    ``gate_metric`` by more than ``min_improvement``; otherwise they get the
    ``challenger`` alias, and the reason is recorded as a tag.
    """
    import mlflow
    from mlflow import MlflowClient

    if gate_metric not in metrics:
        raise ValueError(
            f"deploy.gate_metric {gate_metric!r} is not a computed metric; "
            f"choose one of {', '.join(sorted(metrics))}"
        )
    client = MlflowClient()
    champion = current_champion(model_name)
    version = mlflow.register_model(model_uri, model_name, tags={**tags, "mlflow_run_id": run_id}).version
    value = float(metrics[gate_metric])
    champion_value: float | None = None
    deltas: dict[str, float] = {}
    if champion is None:
        promoted, reason = True, "first version of the model: it becomes champion"
    else:
        champion_metrics = client.get_run(champion.run_id).data.metrics
        deltas = {
            name: float(metrics[name]) - float(champion_metrics[name])
            for name in metrics
            if name in champion_metrics
        }
        champion_value = float(champion_metrics.get(gate_metric, float("-inf")))
        gain = value - champion_value
        promoted = gain > min_improvement
        comparison = (
            f"{gate_metric} {value:.4f} vs champion v{champion.version} {champion_value:.4f} "
            f"(change {gain:+.4f}, needed > {min_improvement:+.4f})"
        )
        reason = ("beats the champion: " if promoted else "does not beat the champion: ") + comparison
    alias = CHAMPION if promoted else CHALLENGER
    client.set_registered_model_alias(model_name, alias, version)
    client.set_model_version_tag(model_name, version, "decision", reason)
    return Decision(
        version=str(version), promoted=promoted, reason=reason, metric=gate_metric,
        value=value, champion_version=None if champion is None else str(champion.version),
        champion_value=champion_value, deltas=deltas,
    )


def load_champion(model_name: str, store: Any | None = None) -> tuple[Any, str]:
    """The champion model (scikit-learn) and its version; a clear error if none.

    With a ``store``, the model is read from it by the ``model_oid`` tag that
    deploy sets: verified against its hash, and without MLflow's model loader
    (which costs a second of imports). Otherwise, or if the store does not
    hold it, MLflow loads it.
    """
    import pickle

    champion = current_champion(model_name)
    if champion is None:
        raise LookupError(
            f"no champion for {model_name!r} in {mlflow_uri()}; run `uncool run` first"
        )
    oid = champion.tags.get("model_oid")
    if store is not None and oid:
        try:
            # Our own object, verified against its hash on the way out.
            model = pickle.loads(store.get_bytes(oid))
            return model, str(champion.version)
        except FileNotFoundError:
            pass
    import mlflow.sklearn

    return mlflow.sklearn.load_model(f"models:/{model_name}@{CHAMPION}"), str(champion.version)


def mlflow_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def predict_label(model: Any, text: str) -> dict[str, Any]:
    """``{"label": ..., "score": ...}`` for one issue title."""
    import numpy as np

    if hasattr(model, "predict_proba"):
        scores = model.predict_proba([text])[0]
    else:
        scores = model.decision_function([text])[0]
    best = int(np.argmax(scores))
    return {"label": str(model.classes_[best]), "score": round(float(scores[best]), 4)}
