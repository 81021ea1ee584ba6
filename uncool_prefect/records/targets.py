"""Which run record a target names: a run id (or its start), ``champion``, a model version, an object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import ObjectStore
from .reading import read_records
from .run_record import data_version, input_versions


class TargetError(LookupError):
    """A lineage target that names nothing known; the message says what is accepted."""


# Shorter starts of a run id would match too often to mean one run.
MIN_RUN_PREFIX = 4


def _model_version_run(target: str, home: Path) -> str:
    """The Prefect flow run id behind ``champion``, ``models:/NAME/N`` or ``models:/NAME@alias``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .. import tracking

    if target == "champion":
        from ..config import load_config

        model = load_config().require_model("`champion`")
    tracking.configure(home)
    client = MlflowClient()
    try:
        if target == "champion":
            version = client.get_model_version_by_alias(model, tracking.CHAMPION)
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
                          "tag: it was not registered by a @pipeline run")
    return str(run_id)


def named_objects(record: dict[str, Any]) -> set[str]:
    """Digests of every object a record names (inputs, stage results and outputs, code, environment)."""
    names: list[Any] = [data_version(record), record.get("code", {}).get("snapshot"),
                        record.get("environment"), *input_versions(record).values()]
    for stage in record.get("stages", {}).values():
        names.append(stage.get("result"))
        names.extend(stage.get("outputs", {}).values())
    return {str(n).removesuffix(".dir") for n in names if isinstance(n, str)}


def resolve_target(store: ObjectStore, target: str, home: Path) -> dict[str, Any]:
    """The run record a target points at.

    A target is a flow run id or a unique start of one (as `uncool exp show`
    prints them), ``champion``, ``models:/NAME/N``, ``models:/NAME@alias``, or
    an object id (the run that produced it, the earliest if several did).
    """
    from ..store import InvalidKeyError, parse_oid

    if target == "champion" or target.startswith("models:/"):
        return store.get_run_record(_model_version_run(target, home))
    try:
        digest, _ = parse_oid(target)
    except InvalidKeyError:
        try:
            return store.get_run_record(target)
        except (FileNotFoundError, InvalidKeyError) as exc:
            matches = [r for r in read_records(store)
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
    for record in read_records(store):
        if digest in named_objects(record):
            return record
    raise TargetError(f"no run record in {store.url} produced object {target}")
