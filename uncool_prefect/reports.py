"""Prefect artifacts: the evaluation report and the confusion matrix.

Artifacts are created with keys made from the model's name
(``<model>-report``, ``<model>-metrics``, ``<model>-confusion``), so the
Prefect UI keeps one versioned history per key across runs (like CML's
comment on each commit).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


def artifact_key(model_name: str, kind: str) -> str:
    """``<model>-<kind>`` as Prefect allows keys: lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-") or "model"
    return f"{slug}-{kind}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _delta(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def metrics_markdown(metrics: dict[str, float], deltas: dict[str, float] | None = None) -> str:
    deltas = deltas or {}
    lines = ["| metric | value | vs champion |", "|---|---|---|"]
    for name in sorted(metrics):
        lines.append(f"| {name} | {_fmt(metrics[name])} | {_delta(deltas.get(name))} |")
    return "\n".join(lines)


def report_markdown(*, model_name: str, decision: dict[str, Any], metrics: dict[str, float],
                    inputs: dict[str, str]) -> str:
    """The decision report: verdict, why, metrics against the champion, and what it was made from."""
    verdict = "promoted to **champion**" if decision["promoted"] else "kept as **challenger**"
    rows = [f"| {name} | `{value}` |" for name, value in inputs.items() if value]
    return "\n".join([
        f"# {model_name} v{decision['version']}: {verdict}",
        "",
        f"**Why:** {decision['reason']}",
        "",
        metrics_markdown(metrics, decision.get("deltas")),
        "",
        "| made from | version |",
        "|---|---|",
        *rows,
    ])


def publish_evaluation(model_name: str, metrics: dict[str, float],
                       confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> None:
    """Metrics and the confusion matrix as versioned table artifacts."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        key=artifact_key(model_name, "metrics"),
        table=[{"metric": name, "value": round(value, 4)} for name, value in sorted(metrics.items())],
        description="Validation metrics of the latest evaluation.",
    )
    rows = []
    for label, counts in zip(labels, confusion, strict=True):
        row: dict[str, Any] = {"true label": label}
        row.update({f"predicted {other}": int(count) for other, count in zip(labels, counts, strict=True)})
        rows.append(row)
    create_table_artifact(
        key=artifact_key(model_name, "confusion"), table=rows,
        description="Confusion matrix on the validation split (rows: true label).",
    )


def publish_report(model_name: str, markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=artifact_key(model_name, "report"), markdown=markdown,
        description=f"The latest version of {model_name}: metrics and the champion decision.",
    )
