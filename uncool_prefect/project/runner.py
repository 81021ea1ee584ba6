"""``uncool run``: the project's pipeline, from its params to a run record, on a real server.

Reads ``[tool.uncool]``, resolves the params file and ``-S`` overrides, finds
or starts a Prefect server, loads the pipeline's entrypoint as Prefect loads a
deployment's, runs the flow in this process, and reads its run record back to
say which stages ran, which were Cached, and what was registered.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ProjectConfig
from ..params import ParamsError, apply_overrides, load_params
from . import server


class PipelineError(RuntimeError):
    """The pipeline cannot be loaded or called as configured; the message says what to fix."""


def load_flow(config: ProjectConfig) -> Any:
    """The flow ``[tool.uncool] pipeline`` names, imported the way Prefect loads an entrypoint."""
    from prefect import Flow

    folder = str(config.pipeline_file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"uncool_pipeline_{config.pipeline_file.stem}"
    spec = importlib.util.spec_from_file_location(name, config.pipeline_file)
    if spec is None or spec.loader is None:
        raise PipelineError(f"cannot import {config.pipeline_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    flow = getattr(module, config.pipeline_function, None)
    if not isinstance(flow, Flow):
        what = "is missing" if flow is None else f"is a {type(flow).__name__}, not a flow"
        raise PipelineError(
            f"{config.entrypoint} {what}; [tool.uncool] pipeline must name a function "
            "decorated with @pipeline (from uncool_prefect) or @flow")
    return flow


def resolve_params(config: ProjectConfig, params_file: Path | None,
                   overrides: list[str]) -> dict[str, Any]:
    """The params file (``--params`` or ``[tool.uncool] params``) with ``-S`` overrides applied."""
    source = params_file or config.params_file
    if source is None:
        if overrides:
            raise ParamsError("-S needs a params file: add params = \"params.yaml\" to "
                              "[tool.uncool] or pass --params FILE")
        return {}
    return apply_overrides(load_params(source), overrides)


def check_parameters(flow: Any, params: dict[str, Any], source: Path | None) -> None:
    """Every top-level key of the params must be a parameter of the flow."""
    import inspect

    accepted = inspect.signature(flow.fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(params) - set(accepted))
    if unknown and not takes_any:
        raise ParamsError(
            f"{source or 'the params'} has top-level key(s) {', '.join(unknown)} that flow "
            f"{flow.name!r} does not take; its parameters are {', '.join(accepted) or 'none'}")


def connect() -> server.ServerInfo:
    """Use (or start) a Prefect server and point this process at it."""
    from ..settings import get_settings

    info = server.ensure(get_settings().home)
    os.environ["PREFECT_API_URL"] = info.api_url
    return info


@dataclass
class RunOutcome:
    flow_run_id: str
    state: str
    record: dict[str, Any] | None
    error: BaseException | None = None

    @property
    def stage_states(self) -> dict[str, str]:
        stages = (self.record or {}).get("stages", {})
        return {name: str(entry.get("state")) for name, entry in stages.items()}

    @property
    def all_cached(self) -> bool:
        states = self.stage_states
        return bool(states) and all(s == "Cached" for s in states.values())


class _QuietClearErrors(logging.Filter):
    """Drop the traceback from Prefect's log of errors whose message already says what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and is_clear_error(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


def is_clear_error(exc: BaseException | None) -> bool:
    """Errors whose message says what to fix: shown as one line, without a traceback."""
    from ..compute import ComputeError
    from ..config import ProjectError
    from ..events import WatchError
    from ..sources import DataError
    from ..store import StoreError

    return isinstance(exc, (StoreError, ParamsError, DataError, ComputeError, ProjectError,
                            PipelineError, server.ServerError, WatchError))


def run_pipeline(config: ProjectConfig, params: dict[str, Any], api_url: str,
                 force: bool = False) -> RunOutcome:
    """Run the project's pipeline once in this process; its outcome with the run record."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_TASKS_REFRESH_CACHE,
        temporary_settings,
    )

    from .. import compute
    from ..blocks import ensure_store_block
    from ..settings import get_settings

    # NOTE: Prefect read its settings when first imported; the environment
    # alone would leave this process on an ephemeral server.
    # NOTE: no heartbeats for a run in the user's terminal (a crash there is seen,
    # not detected later). Prefect 3.9's heartbeat thread sleeps in 1 s steps and
    # the flow joins it at exit: ~0.5-1 s of every `uncool run`, a third of a no-op.
    # Deployed runs (a worker's) keep them.
    updates = {PREFECT_API_URL: api_url, PREFECT_TASKS_REFRESH_CACHE: force,
               PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    quiet = _QuietClearErrors()
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    with temporary_settings(updates=updates):
        flow = load_flow(config)
        check_parameters(flow, params, config.params_file)
        store = ensure_store_block(get_settings().block)
        compute.preflight()  # a Dask scheduler that does not answer: one line, before any stage
        for logger in loggers:
            logger.addFilter(quiet)
        try:
            state = flow(**params, return_state=True)
        finally:
            for logger in loggers:
                logger.removeFilter(quiet)
    flow_run_id = str(state.state_details.flow_run_id)
    try:
        record: dict[str, Any] | None = store.get_run_record(flow_run_id)
    except FileNotFoundError:
        record = None  # it failed before any stage ran
    error = None
    if not state.is_completed():
        try:
            state.result()
        except BaseException as exc:  # noqa: BLE001 - handed back to say what failed
            error = exc
    return RunOutcome(flow_run_id, str(state.name), record, error)


def task_states(flow_run_id: str) -> dict[str, str]:
    """Task name -> final state name of every task run of a flow run, as the server has them."""
    from ..records.run_record import read_task_runs, task_name_of

    return {task_name_of(run.name): str(run.state.name)
            for run in read_task_runs(flow_run_id) if run.state}
