"""The issue labeler itself: plain scikit-learn, no Prefect, no MLflow.

Kept apart from the flow so that the content-aware cache policy can follow it:
editing a function here re-runs exactly the stages that call it.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import os
import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

# NOTE: scikit-learn is imported where it is used: importing it takes about a
# second, and a deployment's flow run is Running only once this module (the
# flow's) is imported; the first stages do not need it.
if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

CLASSIFIERS = ("logistic_regression", "ridge")


def split_rows(
    rows: Sequence[dict[str, str]], test_size: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Stratified, seeded split of ``{"id", "text", "label"}`` rows."""
    from sklearn.model_selection import train_test_split

    labels = [row["label"] for row in rows]
    train, val = train_test_split(
        list(rows), test_size=test_size, random_state=seed, stratify=labels
    )
    return sorted(train, key=lambda r: r["id"]), sorted(val, key=lambda r: r["id"])


def build_model(params: dict[str, Any]) -> Pipeline:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.pipeline import Pipeline

    tfidf = params.get("tfidf", {})
    vectorizer = TfidfVectorizer(
        ngram_range=(1, int(tfidf.get("ngram_max", 1))),
        min_df=int(tfidf.get("min_df", 1)),
        sublinear_tf=bool(tfidf.get("sublinear_tf", False)),
        lowercase=True,
    )
    name = params.get("classifier", "logistic_regression")
    if name == "logistic_regression":
        classifier: Any = LogisticRegression(
            C=float(params.get("C", 1.0)), max_iter=int(params.get("max_iter", 1000)),
            random_state=int(params.get("seed", 0)),
        )
    elif name == "ridge":
        classifier = RidgeClassifier(alpha=1.0 / float(params.get("C", 1.0)),
                                     random_state=int(params.get("seed", 0)))
    else:
        raise ValueError(f"train.classifier {name!r} is unknown; choose one of {CLASSIFIERS}")
    return Pipeline([("tfidf", vectorizer), ("classifier", classifier)])


def fit(rows: Sequence[dict[str, str]], params: dict[str, Any], device: str = "cpu") -> Pipeline:
    """Fit the model; ``device="gpu"`` fits the classifier on the GPU (see :func:`fit_on_device`)."""
    model = build_model(params)
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    if device == "cpu":
        model.fit(texts, labels)
        return model
    if device != "gpu":
        raise ValueError(f"device {device!r} is unknown; choose cpu or gpu")
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError("this trial was sent to a GPU worker, but CuPy is not installed there; "
                           "pip install 'uncool-prefect[gpu]' on the GPU workers") from exc
    return fit_on_device(model, texts, labels, cupy)


def fit_on_device(model: Pipeline, texts: Sequence[str], labels: Sequence[str], xp: Any) -> Pipeline:
    """TF-IDF on the CPU, the classifier on ``xp``'s device, the result in CPU arrays.

    The features go dense (``float32``) to the device, where scikit-learn's
    array-API dispatch fits the classifier; the fitted arrays come back as
    NumPy, so the stored model predicts on any machine (sparse input works:
    the model is linear). ``xp`` is CuPy on a GPU; any array-API module
    (NumPy included) works, which is how this runs in tests without a GPU.
    SciPy reads ``SCIPY_ARRAY_API=1`` once, at import: set it before Python starts.
    """
    import sklearn
    from sklearn.utils._array_api import _estimator_with_converted_arrays

    if os.environ.get("SCIPY_ARRAY_API") != "1":
        raise RuntimeError("training on the GPU needs SCIPY_ARRAY_API=1 in the worker's environment "
                           "before it starts (the Dask-CUDA cluster of uncool-prefect sets it)")
    vectorizer, classifier = model.named_steps["tfidf"], model.named_steps["classifier"]
    features = vectorizer.fit_transform(texts)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    X_device = xp.asarray(features.toarray().astype(np.float32, copy=False))
    y_device = xp.asarray(y.astype(np.int64))
    with sklearn.config_context(array_api_dispatch=True):
        classifier.fit(X_device, y_device)
    on_cpu = _estimator_with_converted_arrays(classifier, _to_numpy)
    # The device saw class indices; the model answers with the labels.
    on_cpu.classes_ = classes
    if hasattr(on_cpu, "_label_binarizer"):  # RidgeClassifier keeps them there too
        on_cpu._label_binarizer.classes_ = classes
    model.steps[-1] = ("classifier", on_cpu)
    return model


def _to_numpy(array: Any) -> np.ndarray:
    return np.asarray(array.get() if hasattr(array, "get") else array)


def expand_grid(grid: dict[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """Every point of a grid ``{"C": [1, 4], "tfidf.ngram_max": [1, 2]}``, in a stable order.

    An empty grid is one point: the ``train.*`` values as they are.
    """
    grid = grid or {}
    names = sorted(grid)
    for name in names:
        if not isinstance(grid[name], list | tuple) or not grid[name]:
            raise ValueError(f"train.sweep.grid.{name} must be a non-empty list of values, "
                             f"got {grid[name]!r}")
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(grid[n] for n in names))]


def trial_params(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """``base`` (the ``train.*`` section, without ``sweep``) with a grid point's dotted keys set."""
    params = copy.deepcopy({k: v for k, v in base.items() if k != "sweep"})
    for dotted, value in point.items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params


def run_trial(rows: Sequence[dict[str, str]], params: dict[str, Any], metric: str,
              val_size: float, seed: int, device: str = "cpu") -> tuple[Pipeline, dict[str, float]]:
    """One point of the sweep: its score on a held-out part of ``rows``, then a fit on all of them.

    The validation split of the pipeline stays unseen until evaluate: the
    sweep selects on a stratified, seeded split of the training rows.

    Returns:
        the model fitted on all ``rows``, and its validation metrics (``metric`` among them).
    """
    inner_train, inner_val = split_rows(rows, val_size, seed)
    labels = sorted({r["label"] for r in rows})
    scores, _ = evaluate_model(fit(inner_train, params, device), inner_val, labels)
    if metric not in scores:
        raise ValueError(f"train.sweep.metric {metric!r} is unknown; choose one of {sorted(scores)}")
    return fit(rows, params, device), scores


def dump_model(model: Pipeline) -> bytes:
    """Pickle the model so that the same training gives the same bytes.

    That is what makes a retrained model's hash comparable with the recorded
    one (`uncool reproduce`).
    """
    for _name, step in model.steps:
        # NOTE: TfidfVectorizer caches id(stop_words), a memory address that
        # differs in every process; sklearn reads it with a default, so it can go.
        if hasattr(step, "_stop_words_id"):
            del step._stop_words_id
    buffer = io.BytesIO()
    pickle.dump(model, buffer, protocol=5)
    return buffer.getvalue()


def load_model(data: bytes) -> Pipeline:
    return pickle.loads(data)


def evaluate_model(
    model: Pipeline, rows: Sequence[dict[str, str]], labels: Sequence[str]
) -> tuple[dict[str, float], list[list[int]]]:
    """Accuracy, macro-F1, per-class precision/recall, and the confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    truth = [r["label"] for r in rows]
    predicted = list(model.predict([r["text"] for r in rows]))
    metrics = {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=list(labels), average="macro",
                                   zero_division=0)),
    }
    precision, recall, _, _ = precision_recall_fscore_support(
        truth, predicted, labels=list(labels), zero_division=0
    )
    for label, p, r in zip(labels, precision, recall, strict=True):
        metrics[f"precision_{label}"] = float(p)
        metrics[f"recall_{label}"] = float(r)
    matrix = confusion_matrix(truth, predicted, labels=list(labels))
    return metrics, [[int(x) for x in row] for row in np.asarray(matrix)]


def rows_to_jsonl(rows: Sequence[dict[str, str]]) -> bytes:
    return b"".join(
        json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
        for row in rows
    )


def jsonl_to_rows(data: bytes) -> list[dict[str, str]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
