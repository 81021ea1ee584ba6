"""``uncool run``: the pipeline, from params to a champion, against a real server.

Finds the project (the folder holding ``flows/pipeline.py``), resolves params
and ``-S`` overrides, finds or starts a Prefect server, makes sure the store
block exists, runs the flow in this process, and reads the stage states back
from the server to say what ran and what was Cached.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast
from uuid import UUID

from . import compute, server
from .params import apply_overrides, load_params
from .settings import PROJECT_MARKER, get_settings, project_root
from .sources import load_examples

PIPELINE = PROJECT_MARKER
PARAMS = Path("flows") / "params.yaml"
STAGES = ("get-data", "split", "train", "evaluate", "deploy")


def find_project(marker: Path = PIPELINE, start: Path | None = None) -> Path:
    """The folder at or above ``start`` that holds ``marker`` (flows/pipeline.py)."""
    root = project_root(start, marker)
    if root is not None:
        return root
    raise server.ServerError(
        f"cannot find {marker} here or above; run uncool from the project folder"
    )


def load_pipeline(project: Path) -> ModuleType:
    """Import flows/pipeline.py the way Prefect loads an entrypoint."""
    flows_dir = str(project / "flows")
    if flows_dir not in sys.path:
        sys.path.insert(0, flows_dir)
    spec = importlib.util.spec_from_file_location("uncool_pipeline", project / PIPELINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def resolve_params(project: Path, params_file: Path | None, overrides: list[str]) -> dict[str, Any]:
    return apply_overrides(load_params(params_file or project / PARAMS), overrides)


def connect() -> server.ServerInfo:
    """Use (or start) a Prefect server and point this process at it."""
    info = server.ensure(get_settings().home)
    os.environ["PREFECT_API_URL"] = info.api_url
    return info


def ensure_block(block_name: str) -> str:
    """Point the store block the flows write to at this project's store.

    The block lives on the (often shared) Prefect server while the store and
    MLflow live in the project folder; a block left pointing at another
    project's store would hand this project cached results whose MLflow runs
    it does not have.
    """
    from prefect.exceptions import ObjectNotFound

    from .blocks import ContentAddressedStorage

    wanted = get_settings().store_url
    try:
        block = cast(ContentAddressedStorage, ContentAddressedStorage.load(block_name))
        existing: str | None = block.basepath
    except (ValueError, ObjectNotFound):
        existing = None
    if wanted != existing:
        ContentAddressedStorage(basepath=wanted).save(block_name, overwrite=True)
        if existing:
            # NOTE: deployed runs load the block by name at run time: another
            # project's worker would now read and write this project's store.
            print(f"warning: block {block_name!r} pointed at {existing}; it now points at "
                  f"{wanted}. Projects that share a Prefect server need a block each, or "
                  "their deployed runs use each other's store: unset UNCOOL_BLOCK (one block "
                  "per store by default) or give each project its own.",
                  file=sys.stderr)
    return wanted


@dataclass
class RunOutcome:
    flow_run_id: str
    result: dict[str, Any]
    stage_states: dict[str, str]
    store_url: str

    @property
    def all_cached(self) -> bool:
        return bool(self.stage_states) and all(s == "Cached" for s in self.stage_states.values())


def task_states(flow_run_id: str) -> dict[str, str]:
    """Task name -> final state name of every task run of a flow run, from the server."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
        )
    # Task run names are "<task name>-<3 hex>".
    return {run.name.rsplit("-", 1)[0]: str(run.state.name) for run in runs if run.state}


def stage_states(flow_run_id: str) -> dict[str, str]:
    """Each pipeline stage's final state name, in pipeline order."""
    states = task_states(flow_run_id)
    return {name: states[name] for name in STAGES if name in states}


def run_pipeline(project: Path, params: dict[str, Any], api_url: str,
                 force: bool = False) -> RunOutcome:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_TASKS_REFRESH_CACHE,
        temporary_settings,
    )

    # NOTE: Prefect read its settings when first imported; the environment
    # alone would leave this process on an ephemeral server.
    updates = {PREFECT_API_URL: api_url, PREFECT_TASKS_REFRESH_CACHE: force}
    with temporary_settings(updates=updates):
        pipeline = load_pipeline(project)
        store_url = ensure_block(pipeline.BLOCK)
        source = pipeline.materialize_source(params["data"])
        # Bad data, or a Dask scheduler that does not answer, fails here with
        # one clear line, before any stage starts.
        load_examples(source, list(params["data"]["labels"]))
        compute.preflight()
        state = pipeline.train_evaluate_deploy(params=params, source=str(source),
                                               return_state=True)
        flow_run_id = str(state.state_details.flow_run_id)
        result = state.result()  # raises the flow's error if it failed
        return RunOutcome(flow_run_id, result, stage_states(flow_run_id), store_url)
