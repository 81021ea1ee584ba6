"""Compare pipeline runs, like ``dvc exp show`` and ``dvc exp diff``, from run records.

Everything here reads the run records in the store (``runs/<flow-run-id>.json``:
one listing, then the reads, in parallel on a remote store); the metrics come
from the record (what the model was registered with). The registry is asked only
which model version is the champion: straight from its SQLite file when it is
the project's default one, through MLflow otherwise; without a registry the
champion column stays empty. No Prefect, and MLflow only for a registry that is
not a SQLite file. The table ``exp show`` prints is laid out in :mod:`.exp_table`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..params import diff_params
from ..store import ObjectStore
from . import targets as lineage
from .reading import read_records
from .run_record import data_version

FIXED_COLUMNS = ("run", "started", "flow", "trigger", "data", "model", "champion")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SCALE = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
CHAMPION_TAG = "prefect_flow_run_id"


@dataclass
class ExpRow:
    """One run: identity, the config values that differ from the baseline, and results."""

    run_id: str
    started: float
    flow: str
    trigger: str
    data: str
    config: dict[str, Any]
    metrics: dict[str, float]
    model_name: str | None
    model_version: str | None
    champion: bool = False

    def value(self, column: str) -> Any:
        """The value shown in ``column`` (a fixed column, a config key or a metric)."""
        fixed = {"run": self.run_id, "started": self.started, "flow": self.flow,
                 "trigger": self.trigger, "data": self.data, "champion": self.champion,
                 "model": _version_key(self.model_version)}
        if column in fixed:
            return fixed[column]
        if column in self.metrics:
            return self.metrics[column]
        return self.config.get(column)


@dataclass
class ExpTable:
    """The rows of ``uncool exp show`` and the columns they have."""

    baseline: str
    config_keys: list[str]
    metric_names: list[str]
    rows: list[ExpRow] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        """Every column name accepted by ``--sort``."""
        return [*FIXED_COLUMNS, *self.config_keys, *self.metric_names]


@dataclass
class RunDiff:
    """What changed from run ``a`` to run ``b``."""

    a: str
    b: str
    config: dict[str, tuple[Any, Any]]
    metrics: dict[str, tuple[float | None, float | None, float | None]]
    data_old: str
    data_new: str
    code_old: str | None
    code_new: str | None
    model_old: str | None
    model_new: str | None

    @property
    def data_changed(self) -> bool:
        return self.data_old != self.data_new

    @property
    def code_changed(self) -> bool:
        return self.code_old != self.code_new


def short(oid: str | None, length: int = 8) -> str:
    """A short form of a run id or object id (the ``.dir`` suffix is dropped)."""
    return (oid or "").removesuffix(".dir")[:length]


def parse_since(text: str, now: float | None = None) -> float:
    """A start time from ``2h``, ``30m``, ``1d``, ``1w`` (ago) or an ISO date/time (UTC if naive)."""
    match = _DURATION.match(text)
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * _SCALE[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise LookupError(f"cannot read --since {text!r}; use a duration like 2h or 1d, "
                          "or an ISO date like 2026-01-31") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def read_metrics(store: ObjectStore, record: dict[str, Any]) -> dict[str, float]:
    """The metrics of a run: those its model was registered with (empty if none).

    Records of version 1 kept them as a JSONL object of the evaluate stage.
    """
    models = record.get("models") or []
    if models:
        return {str(k): float(v) for k, v in (models[-1].get("metrics") or {}).items()
                if isinstance(v, (int, float))}
    oid = record.get("stages", {}).get("evaluate", {}).get("outputs", {}).get("metrics")
    if not oid:
        return {}
    try:
        first = store.get_bytes(oid).decode("utf-8").strip().splitlines()[0]
        document = json.loads(first)
    except (OSError, ValueError, IndexError):
        return {}
    return {str(k): float(v) for k, v in document.items() if isinstance(v, (int, float))}


def champion_run_ids(records: list[dict[str, Any]], home: Path) -> set[str]:
    """The flow run ids whose model version is its model's champion; empty without a registry."""
    names = {r.get("mlflow", {}).get("model_name") for r in records} - {None}
    if not names:
        return set()
    champions = _champions(sorted(names), home)
    found: set[str] = set()
    for name, (version, tagged) in champions.items():
        ids = [r["flow_run_id"] for r in records if r.get("flow_run_id") == tagged]
        if not ids:  # the registering run is gone: the earliest run with that version
            ids = [r["flow_run_id"] for r in records  # records are oldest first
                   if r.get("mlflow", {}).get("model_name") == name
                   and str(r.get("mlflow", {}).get("model_version")) == version]
        found |= set(ids[:1])
    return found


def _champions(names: list[str], home: Path) -> dict[str, tuple[str, str | None]]:
    """Model name -> (champion version, the flow run id it is tagged with), for those that have one."""
    from .. import tracking

    if not tracking.has_tracking_store(home):
        return {}  # no tracking store: do not create one just to look
    path = _sqlite_path(tracking.tracking_uri(home))
    if path is not None:
        found = _sqlite_champions(path, names, tracking.CHAMPION)
        if found is not None:
            return found
    try:
        tracking.configure(home)
        versions = {name: tracking.current_champion(name) for name in names}
    except Exception:  # noqa: BLE001 - MLflow missing or unreachable: no marker
        return {}
    return {name: (str(v.version), (v.tags or {}).get(CHAMPION_TAG))
            for name, v in versions.items() if v is not None}


def _sqlite_path(uri: str) -> Path | None:
    """The file of a plain ``sqlite:///`` tracking URI; None for anything else."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    # NOTE: registries with workspaces keep one alias per workspace; MLflow
    # knows which one is active, so it is asked instead.
    if os.environ.get("MLFLOW_WORKSPACE") or os.environ.get(
            "MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true", "yes"):
        return None
    return Path(uri[len("sqlite:///"):])


def _sqlite_champions(path: Path, names: list[str],
                      alias: str) -> dict[str, tuple[str, str | None]] | None:
    """:func:`_champions` read from MLflow's SQLite registry, read-only; None if it is not as expected.

    NOTE: importing MLflow to ask it costs seconds, longer than the rest of
    ``exp show`` over a thousand runs. The two tables read here (aliases and
    model version tags) are MLflow's registry schema; any surprise (another
    schema, a locked file) returns None and the caller asks MLflow instead.
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True,
                                                timeout=2.0)) as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(registered_model_aliases)")}
            if not {"name", "alias", "version"} <= columns:
                return None
            # NOTE: a registry without workspaces keeps everything in 'default'.
            where = " AND workspace = 'default'" if "workspace" in columns else ""
            found: dict[str, tuple[str, str | None]] = {}
            for name in names:
                row = db.execute("SELECT version FROM registered_model_aliases "
                                 f"WHERE name = ? AND alias = ?{where}",
                                 (name, alias)).fetchone()
                if row is None:
                    continue
                tag = db.execute("SELECT value FROM model_version_tags "
                                 f'WHERE name = ? AND version = ? AND "key" = ?{where}',
                                 (name, row[0], CHAMPION_TAG)).fetchone()
                found[name] = (str(row[0]), None if tag is None else str(tag[0]))
            return found
    except sqlite3.Error:
        return None


def _version_key(version: str | None) -> Any:
    return int(version) if version and version.isdigit() else version


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (2, 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def exp_rows(store: ObjectStore, home: Path, baseline: str | None = None,
             flow: str | None = None, since: float | None = None,
             sort: str | None = None) -> ExpTable:
    """One row per run record, with the config values that differ from ``baseline``.

    Args:
        store: Where the run records are.
        home: UNCOOL_HOME, for the MLflow registry (champion marker, model targets).
        baseline: A target (see :func:`lineage.resolve_target`); default the oldest run shown.
        flow: Only runs of this flow name.
        since: Only runs started at or after this Unix time (see :func:`parse_since`).
        sort: A column name; metrics sort best (highest) first, the rest ascending.
    """
    records = read_records(store)
    shown = [r for r in records
             if (flow is None or r.get("flow_name") == flow)
             and (since is None or float(r.get("started", 0)) >= since)]
    if baseline is not None:
        base: dict[str, Any] | None = lineage.resolve_target(store, baseline, home)
    else:
        base = shown[0] if shown else None
    base_params = base.get("params", {}) if base else {}
    champions = champion_run_ids(records, home)
    rows = []
    for record in shown:
        mlflow = record.get("mlflow", {})
        version = mlflow.get("model_version")
        rows.append(ExpRow(
            run_id=str(record.get("flow_run_id", "")),
            started=float(record.get("started", 0)),
            flow=str(record.get("flow_name", "")),
            trigger=str(record.get("trigger", {}).get("kind", "")),
            data=str(data_version(record) or ""),
            config={k: new for k, (_old, new) in
                    diff_params(base_params, record.get("params", {})).items()},
            metrics=read_metrics(store, record),
            model_name=mlflow.get("model_name"),
            model_version=None if version is None else str(version),
            champion=record.get("flow_run_id") in champions,
        ))
    table = ExpTable(
        baseline=str(base.get("flow_run_id", "")) if base else "",
        config_keys=sorted({k for row in rows for k in row.config}),
        metric_names=sorted({m for row in rows for m in row.metrics}),
        rows=rows,
    )
    if sort is not None:
        if sort not in table.columns:
            raise LookupError(f"cannot sort by {sort!r}; columns: {', '.join(table.columns)}")
        descending = sort in table.metric_names or sort == "champion"
        present = [r for r in rows if r.value(sort) is not None]
        missing = [r for r in rows if r.value(sort) is None]
        present.sort(key=lambda r: _sort_key(r.value(sort)), reverse=descending)
        table.rows = present + missing
    return table


def utc_iso(timestamp: float) -> str:
    """A Unix time as an ISO date and time in UTC, to the second."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def format_value(value: Any) -> str:
    """A config value as text: lists and mappings as JSON, None as empty."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def format_metric(value: float | None) -> str:
    """A metric as text: four decimals, None as empty."""
    return "" if value is None else f"{value:.4f}"


def table_to_dict(table: ExpTable) -> dict[str, Any]:
    """A JSON-ready form of the table (full ids, ISO times)."""
    return {
        "baseline": table.baseline, "columns": table.columns,
        "rows": [{**asdict(row), "started": utc_iso(row.started),
                  "baseline": row.run_id == table.baseline} for row in table.rows],
    }


def to_json(table: ExpTable) -> str:
    """The table as a JSON document (see :func:`table_to_dict`)."""
    return json.dumps(table_to_dict(table), indent=2, default=str)


def diff_runs(store: ObjectStore, home: Path, a: str, b: str) -> RunDiff:
    """What changed from target ``a`` to target ``b`` (see :func:`resolve`)."""
    old, new = lineage.resolve_target(store, a, home), lineage.resolve_target(store, b, home)
    old_metrics, new_metrics = read_metrics(store, old), read_metrics(store, new)
    metrics: dict[str, tuple[float | None, float | None, float | None]] = {}
    for name in sorted(set(old_metrics) | set(new_metrics)):
        before, after = old_metrics.get(name), new_metrics.get(name)
        delta = after - before if before is not None and after is not None else None
        metrics[name] = (before, after, delta)

    def model(record: dict[str, Any]) -> str | None:
        version = record.get("mlflow", {}).get("model_version")
        return None if version is None else str(version)

    return RunDiff(
        a=str(old.get("flow_run_id", "")), b=str(new.get("flow_run_id", "")),
        config=diff_params(old.get("params", {}), new.get("params", {})), metrics=metrics,
        data_old=str(data_version(old) or ""),
        data_new=str(data_version(new) or ""),
        code_old=old.get("code", {}).get("snapshot"), code_new=new.get("code", {}).get("snapshot"),
        model_old=model(old), model_new=model(new),
    )


def render_diff(diff: RunDiff) -> Group:
    """The diff as rich renderables: config and metric tables, then data, code and model."""
    parts: list[Any] = [Text(f"{short(diff.a)} -> {short(diff.b)}", style="bold")]
    if diff.config:
        config = Table(title="config", show_header=True)
        for name in ("key", "old", "new"):
            config.add_column(name)
        for key, (before, after) in diff.config.items():
            config.add_row(key, format_value(before), format_value(after))
        parts.append(config)
    else:
        parts.append(Text("config unchanged"))
    if diff.metrics:
        metrics = Table(title="metrics", show_header=True)
        for name in ("metric", "old", "new", "delta"):
            metrics.add_column(name, justify="left" if name == "metric" else "right")
        for name, (before, after, delta) in diff.metrics.items():
            metrics.add_row(name, format_metric(before), format_metric(after),
                            "" if delta is None else f"{delta:+.4f}")
        parts.append(metrics)
    parts.append(Text(f"data changed: {short(diff.data_old, 12)} -> {short(diff.data_new, 12)}"
                      if diff.data_changed else f"data unchanged ({short(diff.data_old, 12)})"))
    parts.append(Text("code changed" if diff.code_changed else "code unchanged"))
    parts.append(Text(f"model v{diff.model_old or '?'} -> v{diff.model_new or '?'}"))
    return Group(*parts)


def diff_to_dict(diff: RunDiff) -> dict[str, Any]:
    """A JSON-ready form of the diff."""
    return {
        "a": diff.a, "b": diff.b,
        "config": {k: {"old": o, "new": n} for k, (o, n) in diff.config.items()},
        "metrics": {k: {"old": o, "new": n, "delta": d} for k, (o, n, d) in diff.metrics.items()},
        "data": {"old": diff.data_old, "new": diff.data_new, "changed": diff.data_changed},
        "code": {"old": diff.code_old, "new": diff.code_new, "changed": diff.code_changed},
        "model_version": {"old": diff.model_old, "new": diff.model_new},
    }


def diff_to_json(diff: RunDiff) -> str:
    """The diff as a JSON document (see :func:`diff_to_dict`)."""
    return json.dumps(diff_to_dict(diff), indent=2, default=str)
