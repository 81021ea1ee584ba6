"""Wine classes from a folder of CSV files: load-table -> make-features -> fit-model -> score -> publish.

A small project that uses only the public API of uncool-prefect. Each stage
takes no more than it needs, so a change to ``fit`` re-runs fit-model, score
and publish while load-table and make-features stay Cached:

    uncool run                  # every stage, with pipelines/params.yaml
    uncool run -S fit.alpha=2   # load-table and make-features Cached
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import RidgeClassifier
from sklearn.metrics import accuracy_score, f1_score

from uncool_prefect import Gate, pipeline, register_model, stage

PROJECT_DIR = Path(__file__).resolve().parents[1]
MODEL_NAME = "wine-classifier"
TARGET = "target"


@stage(name="load-table")
def load_table(folder: Path) -> dict[str, Any]:
    """Every ``*.csv`` in ``folder`` (13 feature columns and ``target``), in name order."""
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise ValueError(f"no CSV files in {folder}")
    columns: list[str] | None = None
    rows: list[list[float]] = []
    for path in files:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            if columns is None:
                columns = header
            elif header != columns:
                raise ValueError(f"{path.name} has columns {header}, expected {columns}")
            rows.extend([float(value) for value in row] for row in reader if row)
    assert columns is not None
    if TARGET not in columns:
        raise ValueError(f"the CSV files have no {TARGET!r} column")
    return {"rows": len(rows), "columns": columns, "table": rows}


@stage(name="make-features")
def make_features(table: dict[str, Any], prepare: dict[str, Any]) -> dict[str, list[Any]]:
    """Shuffle with ``prepare.seed``, hold out ``prepare.test_size``, standardize on the train rows."""
    data = np.asarray(table["table"], dtype=np.float64)
    target = table["columns"].index(TARGET)
    x = np.delete(data, target, axis=1)
    y = data[:, target].astype(np.int64)
    order = np.random.default_rng(int(prepare["seed"])).permutation(len(y))
    n_test = max(1, round(len(y) * float(prepare["test_size"])))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return {"x_train": x[train].tolist(), "y_train": y[train].tolist(),
            "x_test": x[test].tolist(), "y_test": y[test].tolist()}


@stage(name="fit-model")
def fit_model(features: dict[str, list[Any]], fit: dict[str, Any]) -> RidgeClassifier:
    """A RidgeClassifier on the train rows (deterministic: no randomness in its solver)."""
    model = RidgeClassifier(alpha=float(fit["alpha"]), max_iter=int(fit["max_iter"]))
    model.fit(np.asarray(features["x_train"]), np.asarray(features["y_train"]))
    return model


@stage(name="score")
def score(model: RidgeClassifier, features: dict[str, list[Any]]) -> dict[str, float]:
    """Accuracy and macro F1 on the held-out rows."""
    truth = np.asarray(features["y_test"])
    predicted = model.predict(np.asarray(features["x_test"]))
    return {"accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro"))}


@stage(name="publish")
def publish(model: RidgeClassifier, metrics: dict[str, float], gate: dict[str, Any]) -> Any:
    """Register the model; it becomes champion only if it wins the gate."""
    return register_model(model, MODEL_NAME, metrics,
                          gate=Gate(metric=str(gate["metric"]),
                                    min_improvement=float(gate["min_improvement"])))


@pipeline
def wine_quality(prepare: dict[str, Any] | None = None, fit: dict[str, Any] | None = None,
                 gate: dict[str, Any] | None = None, data_dir: str = "data") -> dict[str, Any]:
    """The pipeline; ``data_dir`` is relative to the project folder unless absolute."""
    folder = Path(data_dir)
    if not folder.is_absolute():
        folder = PROJECT_DIR / folder
    if prepare is None or fit is None or gate is None:
        raise ValueError("prepare, fit and gate are needed: run with pipelines/params.yaml")
    table = load_table(folder)
    features = make_features(table, prepare)
    model = fit_model(features, fit)
    metrics = score(model, features)
    registration = publish(model, metrics, gate)
    return {"rows": table["rows"], "metrics": metrics,
            "model_version": registration.version, "promoted": registration.promoted}
