"""The issue labeler itself: plain scikit-learn, no Prefect, no MLflow.

Kept apart from the flow so that the content-aware cache policy can follow it:
editing a function here re-runs exactly the stages that call it.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

CLASSIFIERS = ("logistic_regression", "ridge")


def split_rows(
    rows: Sequence[dict[str, str]], test_size: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Stratified, seeded split of ``{"id", "text", "label"}`` rows."""
    labels = [row["label"] for row in rows]
    train, val = train_test_split(
        list(rows), test_size=test_size, random_state=seed, stratify=labels
    )
    return sorted(train, key=lambda r: r["id"]), sorted(val, key=lambda r: r["id"])


def build_model(params: dict[str, Any]) -> Pipeline:
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


def fit(rows: Sequence[dict[str, str]], params: dict[str, Any]) -> Pipeline:
    model = build_model(params)
    model.fit([r["text"] for r in rows], [r["label"] for r in rows])
    return model


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
