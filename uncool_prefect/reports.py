"""Prefect artifacts: the evaluation report and the confusion matrix.

Artifacts are created with fixed keys, so the Prefect UI keeps one versioned
history per key across runs (like CML's comment on each commit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPORT_KEY = "issue-labeler-report"
CONFUSION_KEY = "issue-labeler-confusion"
METRICS_KEY = "issue-labeler-metrics"


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


def report_markdown(
    *,
    model_name: str,
    decision: dict[str, Any],
    metrics: dict[str, float],
    dataset: str,
    model_oid: str,
    params_hash: str,
    mlflow_run_id: str,
) -> str:
    verdict = "promoted to **champion**" if decision["promoted"] else "kept as **challenger**"
    return "\n".join([
        f"# {model_name} v{decision['version']}: {verdict}",
        "",
        f"**Why:** {decision['reason']}",
        "",
        metrics_markdown(metrics, decision.get("deltas")),
        "",
        "| input | version |",
        "|---|---|",
        f"| data | `{dataset}` |",
        f"| params | `{params_hash[:16]}` |",
        f"| model object | `{model_oid}` |",
        f"| MLflow run | `{mlflow_run_id}` |",
    ])


def publish_evaluation(
    metrics: dict[str, float], confusion: Sequence[Sequence[int]], labels: Sequence[str]
) -> None:
    """Metrics and the confusion matrix as versioned table artifacts."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        key=METRICS_KEY,
        table=[{"metric": name, "value": round(value, 4)} for name, value in sorted(metrics.items())],
        description="Validation metrics of the latest evaluation.",
    )
    rows = []
    for label, counts in zip(labels, confusion, strict=True):
        row: dict[str, Any] = {"true label": label}
        row.update({f"predicted {other}": int(count) for other, count in zip(labels, counts, strict=True)})
        rows.append(row)
    create_table_artifact(
        key=CONFUSION_KEY, table=rows,
        description="Confusion matrix on the validation split (rows: true label).",
    )


def publish_report(markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=REPORT_KEY, markdown=markdown,
        description="Evaluation and deploy decision of the issue labeler.",
    )
