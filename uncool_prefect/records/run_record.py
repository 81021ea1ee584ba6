"""Run records: everything needed to find, check out and re-create a pipeline run.

Every ``@pipeline`` run writes ``runs/<flow-run-id>.json`` into the store:

- ``params`` (the flow's parameters) and ``params_hash``;
- ``code``: the project's code as one folder object (the folder of the
  pipeline's file, the project's pyproject.toml and this plugin), with the git
  commit and, if the tree was dirty, the diff as an object;
- ``environment``: Python, platform and installed packages, as an object;
- ``inputs``: every path argument of a stage, ``"<stage>.<argument>"`` ->
  ``{"url", "version"}`` (the version is the object id it was stored as), and
  ``data``: the first of those versions (the run's data version);
- ``stages``: each task run in call order, keyed by task name (``name[1]``,
  ``name[2]``... when a task runs more than once): its state, the object id of
  its stored result, the object ids named in its return value (``outputs``),
  the object ids its arguments named (``uses``) and the stages whose results
  were its arguments (``after``): the lineage edges;
- ``models``: what ``register_model`` registered (name, version, decision);
  ``mlflow``: the last of those, as MLflow ids;
- timestamps, the run's final state and what started it.

A record is plain JSON: readable without Prefect or MLflow running.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from ..recording import Recorder, StageRun
from ..store import ObjectRef, ObjectStore

RECORD_VERSION = 2


CODE_SUFFIXES = (".py", ".yaml", ".yml", ".toml", ".json", ".cfg", ".txt", ".md")
SKIPPED_DIRS = {"__pycache__", "node_modules", "venv", "site-packages"}


def code_files(root: Path) -> list[Path]:
    """Source files under ``root``: no hidden folders, caches or virtualenvs."""
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        files.extend(Path(folder) / n for n in sorted(names)
                     if Path(n).suffix in CODE_SUFFIXES and not n.startswith("."))
    return files


def store_code(store: ObjectStore, roots: dict[str, Path],
               files: dict[str, Path] | None = None) -> ObjectRef:
    """Store the code under ``roots`` ({name in the snapshot: folder}) and ``files`` as one folder object."""
    with tempfile.TemporaryDirectory(prefix="uncool-code-") as tmp:
        staging = Path(tmp) / "code"
        staging.mkdir()
        for name, root in sorted(roots.items()):
            for path in code_files(root):
                target = staging / name / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        for name, path in sorted((files or {}).items()):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staging / name)
        return store.put_dir(staging)


def snapshot_code(store: ObjectStore, roots: dict[str, Path],
                  files: dict[str, Path] | None = None) -> dict[str, Any]:
    """:func:`store_code`, with the git commit of the first root and its uncommitted diff."""
    snapshot = store_code(store, roots, files)
    return {"snapshot": snapshot.name, **_git_state(store, next(iter(roots.values())))}


def project_code(source_file: str | None) -> tuple[dict[str, Path], dict[str, Path]]:
    """What a pipeline's code snapshot holds: ``(folders, files)``, by their names in it.

    In a project (a pyproject.toml with ``[tool.uncool]``): the folder of the
    pipeline's file, at its place in the project, and the pyproject.toml, so
    the snapshot is a project again; outside one, the file's folder. This
    plugin's own modules always go along as ``uncool_prefect/``.
    """
    from ..config import PYPROJECT, config_for_file

    roots: dict[str, Path] = {}
    files: dict[str, Path] = {}
    if source_file:
        folder = Path(source_file).resolve().parent
        config = config_for_file(source_file)
        if config is not None and folder != config.root:
            roots[folder.relative_to(config.root).as_posix()] = folder
            files[PYPROJECT] = config.root / PYPROJECT
        else:
            roots["."] = folder
    roots["uncool_prefect"] = Path(__file__).resolve().parents[1]  # this plugin
    return roots, files


def _git_state(store: ObjectStore, folder: Path) -> dict[str, Any]:
    """The git commit of ``folder`` and, if the tree is dirty, the diff as an object."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=folder, capture_output=True,
                                  timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None, "git_diff": None}
    diff = git("diff", "HEAD") or ""
    return {
        "git_commit": commit.strip(),
        "git_dirty": bool(diff),
        "git_diff": store.put_bytes(diff.encode("utf-8")).oid if diff else None,
    }


def snapshot_environment(store: ObjectStore) -> str:
    """Store the Python version, platform and installed packages; return the object id.

    NOTE: listing the installed packages reads every dist-info (~0.25 s, a
    tenth of a no-op run), so the object id is kept in the store's state
    folder under a fingerprint of the import path: each folder's mtime changes
    when a package is installed, upgraded or removed there.
    """
    fingerprint = hashlib.sha256(json.dumps(
        [sys.version, *(f"{entry}:{_mtime_ns(entry)}" for entry in sys.path)]).encode()).hexdigest()
    memo = Path(store.state_dir) / "environments" / fingerprint[:32]
    with contextlib.suppress(OSError, ValueError):
        known = memo.read_text(encoding="utf-8").strip()
        if store.has(known):
            return known
    oid = _store_environment(store)
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(oid, encoding="utf-8")
        os.replace(partial, memo)
    return oid


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return 0


def _store_environment(store: ObjectStore) -> str:
    packages = sorted(
        {f"{dist.metadata['Name']}=={dist.version}" for dist in metadata.distributions()
         if dist.metadata["Name"]},
        key=str.lower,
    )
    document = {"python": sys.version, "platform": platform.platform(), "packages": packages}
    data = json.dumps(document, sort_keys=True, indent=1).encode("utf-8")
    return store.put_bytes(data).oid


def run_trigger() -> dict[str, Any]:
    """What started the current flow run: a user, a schedule, or an event."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    if flow_run is None:
        return {"kind": "user", "user": getpass.getuser()}
    created_by = getattr(flow_run, "created_by", None)
    kind = "user"
    if getattr(flow_run, "auto_scheduled", False):
        kind = "schedule"
    elif created_by is not None and str(getattr(created_by, "type", "")).upper() == "AUTOMATION":
        kind = "event"
    elif flow_run.deployment_id is not None:
        kind = "deployment"
    trigger: dict[str, Any] = {"kind": kind, "user": getpass.getuser()}
    if flow_run.deployment_id is not None:
        trigger["deployment_id"] = str(flow_run.deployment_id)
    if created_by is not None:
        trigger["created_by"] = getattr(created_by, "display_value", None) or str(created_by)
    if os.environ.get("UNCOOL_REPRODUCING"):
        trigger = {**trigger, "kind": "reproduce", "of": os.environ["UNCOOL_REPRODUCING"]}
    return trigger


def _plain_task_runs(flow_run_id: str, known: set[str]) -> list[StageRun]:
    """Task runs of the flow run that no ``@stage`` hook reported (plain ``@task`` s), from the server.

    NOTE: task run states reach the server as events, so a plain task that
    just finished may still show its previous state there; ``@stage`` s are
    recorded in-process and are exact.
    """
    try:
        runs = read_task_runs(flow_run_id)
    except Exception:  # noqa: BLE001 - the record is still worth writing without them
        return []
    found = []
    for run in runs:
        if str(run.id) in known or run.state is None:
            continue
        started = (run.start_time or run.expected_start_time or run.created)
        found.append(StageRun(task=task_name_of(run.name), task_run_id=str(run.id),
                              state=str(run.state.name),
                              started=started.timestamp() if started else time.time()))
    return found


def read_task_runs(flow_run_id: str) -> list[Any]:
    """Every task run of a flow run, as the Prefect server has them."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return list(client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))))


def task_name_of(task_run_name: str) -> str:
    """Task run names are ``<task name>-<3 hex>``."""
    return task_run_name.rsplit("-", 1)[0]


def stage_entries(runs: list[StageRun]) -> dict[str, dict[str, Any]]:
    """Task runs keyed by task name in call order; ``name[i]`` (from 1) where a name repeats."""
    ordered = sorted(runs, key=lambda r: r.started)
    counts = Counter(run.task for run in ordered)
    seen: Counter[str] = Counter()
    keys: dict[str, str] = {}
    for run in ordered:
        seen[run.task] += 1
        keys[run.task_run_id] = run.task if counts[run.task] == 1 else f"{run.task}[{seen[run.task]}]"
    entries: dict[str, dict[str, Any]] = {}
    for run in ordered:
        entry: dict[str, Any] = {"task": run.task, "task_run_id": run.task_run_id,
                                 "state": run.state, "result": run.result,
                                 "outputs": run.outputs, "uses": run.uses,
                                 "after": [keys[r] for r in run.after if r in keys]}
        if run.inputs:
            entry["inputs"] = run.inputs
        if run.key:
            entry["key"] = run.key
        if run.error:
            entry["error"] = run.error
        entries[keys[run.task_run_id]] = entry
    return entries


def write_run_record(recorder: Recorder, *, started: float, error: BaseException | None) -> str:
    """Build the run record of the current flow run from what ``recorder`` collected; store it."""
    from prefect.context import FlowRunContext
    from prefect.logging import get_run_logger

    from ..config import config_for_file

    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    flow_run_id = str(flow_run.id) if flow_run else f"local-{int(started * 1000)}"
    store = recorder.store
    runs = list(recorder.stages.values())
    if flow_run is not None:
        runs += _plain_task_runs(flow_run_id, set(recorder.stages))
    stages = stage_entries(runs)
    inputs: dict[str, dict[str, str]] = {}
    for key, entry in stages.items():
        for argument, found in entry.get("inputs", {}).items():
            inputs[f"{key}.{argument}"] = found
    source_file = recorder.source_file
    config = config_for_file(source_file) if source_file else None
    models = list(recorder.models)
    last = models[-1] if models else None
    record = {
        "version": RECORD_VERSION,
        "flow_run_id": flow_run_id,
        "flow_name": context.flow.name if context and context.flow else None,
        "entrypoint": config.entrypoint if config else None,
        "started": started,
        "finished": time.time(),
        "state": "Failed" if error is not None else "Completed",
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "trigger": run_trigger(),
        "params": recorder.params,
        "params_hash": recorder.params_hash,
        "code": recorder.code,
        "environment": snapshot_environment(store),
        "inputs": inputs,
        "data": next((found["version"] for found in inputs.values()), None),
        "stages": stages,
        "models": models,
        "mlflow": {} if last is None else {
            "run_id": last.get("run_id"), "model_name": last.get("name"),
            "model_version": last.get("version"), "tracking_uri": last.get("tracking_uri")},
        "store": store.url,
    }
    url = store.put_run_record(flow_run_id, record)
    if flow_run is not None:
        get_run_logger().info("run record: %s", url)
    return url


# -- reading records --------------------------------------------------------------
def data_version(record: dict[str, Any]) -> str | None:
    """The run's data version (records of version 1 kept it as ``inputs.data``)."""
    if "data" in record:
        return record["data"]
    legacy = record.get("inputs", {}).get("data")
    return legacy if isinstance(legacy, str) else None


def input_versions(record: dict[str, Any]) -> dict[str, str]:
    """``"<stage>.<argument>"`` -> object id of every input of the run."""
    inputs = record.get("inputs", {})
    if record.get("version", 1) < 2:
        return {"data": inputs["data"]} if isinstance(inputs.get("data"), str) else {}
    return {key: str(found["version"]) for key, found in inputs.items()
            if isinstance(found, dict) and found.get("version")}
