"""Run records: everything needed to find, check out and re-create a result.

Every pipeline run writes ``runs/<flow-run-id>.json`` into the store: the
resolved config and its hash, a snapshot of the code (the project's flows and
this plugin's modules, as a folder object, plus the git commit and a hash of
uncommitted changes), the environment (Python and package versions, as an
object), the input data version, each stage's state and outputs, the MLflow
run and model version, timestamps, and what started the run. A record is
plain JSON: readable without Prefect or MLflow running.
"""

from __future__ import annotations

import getpass
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .store import ObjectStore

RECORD_VERSION = 1
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".toml")


def snapshot_code(store: ObjectStore, roots: dict[str, Path]) -> dict[str, Any]:
    """Store the source files under ``roots`` ({name: folder}) as one folder object."""
    with tempfile.TemporaryDirectory(prefix="uncool-code-") as tmp:
        staging = Path(tmp) / "code"
        for name, root in sorted(roots.items()):
            for path in sorted(root.rglob("*")):
                if (path.is_file() and path.suffix in CODE_SUFFIXES
                        and "__pycache__" not in path.parts):
                    target = staging / name / path.relative_to(root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
        snapshot = store.put_dir(staging)
    return {"snapshot": snapshot.name, **_git_state(store, next(iter(roots.values())))}


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
    """Store the Python version, platform and installed packages; return the object id."""
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
    return trigger


def build_record(*, flow_run_id: str, flow_name: str, started: float, params: dict[str, Any],
                 params_hash: str, code: dict[str, Any], environment: str,
                 stages: dict[str, dict[str, Any]], data: str, mlflow: dict[str, Any],
                 trigger: dict[str, Any], store_url: str) -> dict[str, Any]:
    return {
        "version": RECORD_VERSION,
        "flow_run_id": flow_run_id,
        "flow_name": flow_name,
        "started": started,
        "finished": time.time(),
        "trigger": trigger,
        "params": params,
        "params_hash": params_hash,
        "code": code,
        "environment": environment,
        "inputs": {"data": data},
        "stages": stages,
        "mlflow": mlflow,
        "store": store_url,
    }


class TargetError(LookupError):
    """A lineage target that names nothing known; the message says what is accepted."""


# Shorter starts of a run id would match too often to mean one run.
MIN_RUN_PREFIX = 4


def iter_records(store: ObjectStore) -> list[dict[str, Any]]:
    """Every run record in the store, oldest first."""
    records = []
    for _rel, data in store.iter_run_records():
        try:
            records.append(json.loads(data))
        except ValueError:
            continue
    return sorted(records, key=lambda r: (r.get("started", 0), r.get("flow_run_id", "")))


def _model_version_run(target: str, home: Path) -> str:
    """The Prefect flow run id behind ``champion``, ``models:/NAME/N`` or ``models:/NAME@alias``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from . import tracking

    tracking.configure(home)
    client = MlflowClient()
    try:
        if target == "champion":
            version = client.get_model_version_by_alias("issue-labeler", tracking.CHAMPION)
        else:
            name, _, rest = target[len("models:/"):].partition("/")
            if "@" in target:
                name, _, alias = target[len("models:/"):].partition("@")
                version = client.get_model_version_by_alias(name, alias)
            else:
                version = client.get_model_version(name, rest)
    except MlflowException as exc:
        raise TargetError(f"{target} is not in the MLflow registry at "
                          f"{tracking.mlflow_uri()}: {exc.message}") from exc
    run_id = version.tags.get("prefect_flow_run_id")
    if not run_id:
        raise TargetError(f"{target} (version {version.version}) has no prefect_flow_run_id "
                          "tag: it was not registered by this pipeline")
    return str(run_id)


def _named_objects(record: dict[str, Any]) -> set[str]:
    """Digests of every object a record names (stage outputs, data, code, environment)."""
    names = [record.get("inputs", {}).get("data"), record.get("code", {}).get("snapshot"),
             record.get("environment")]
    for stage in record.get("stages", {}).values():
        names.extend(stage.get("outputs", {}).values())
    return {str(n).removesuffix(".dir") for n in names if isinstance(n, str)}


def resolve_target(store: ObjectStore, target: str, home: Path) -> dict[str, Any]:
    """The run record a target points at.

    A target is a flow run id or a unique start of one (as `uncool exp show`
    prints them), ``champion``, ``models:/NAME/N``, ``models:/NAME@alias``, or
    an object id (the run that produced it, the earliest if several did).
    """
    from .store import InvalidKeyError, parse_oid

    if target == "champion" or target.startswith("models:/"):
        return store.get_run_record(_model_version_run(target, home))
    try:
        digest, _ = parse_oid(target)
    except InvalidKeyError:
        try:
            return store.get_run_record(target)
        except (FileNotFoundError, InvalidKeyError) as exc:
            matches = [r for r in iter_records(store)
                       if str(r.get("flow_run_id", "")).startswith(target)
                       ] if len(target) >= MIN_RUN_PREFIX else []
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise TargetError(f"{target!r} is the start of {len(matches)} run ids in "
                                  f"{store.url}: give more of it") from None
            raise TargetError(
                f"{target!r} is neither a run in {store.url} nor an object id, "
                "'champion' or models:/NAME/VERSION; `uncool exp show` lists the runs"
            ) from exc
    for record in iter_records(store):
        if digest in _named_objects(record):
            return record
    raise TargetError(f"no run record in {store.url} produced object {target}")
