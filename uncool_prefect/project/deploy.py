"""``uncool deploy``: the pipeline as Prefect deployments on a work pool.

The deployments are declared in ``deployments/prefect.yaml`` and applied with
Prefect's own ``prefect deploy --all``; this module does what has to be true
first (a reachable server, the work pool, the block types, the store block)
and ships the code.

The code travels through the store, not through a path on the deploying
machine: ``publish_code`` stores the project's code (the folder of its
pipeline and its pyproject.toml, as a run record's code snapshot has them)
as an object and points ``refs/deployments/code`` at it; the deployments' pull step,
:func:`pull_code`, materializes that object wherever the flow run starts, so a
worker needs the installed package and the store, nothing else. The code a
run used is then a content hash, like its data and its model.
"""

from __future__ import annotations

import copy
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ..config import ProjectConfig
from ..settings import get_settings
from ..store import ObjectRef, ObjectStore
from ..store.objects import cache_dir
from . import POOL, server

WATCH_FLOW = "uncool-watch"
CODE_REF = "deployments/code"
# The pool's flow-run command: Prefect's engine, started warm where `uncool worker`
# runs a warm-start server, else exactly `python -m prefect.engine` (see warm_client).
# NOTE: a console script, found on the worker's PATH (`uncool worker` puts its
# own environment's first): it names the Python uncool-prefect is installed in,
# and the pool holds no path of the deploying machine.
FLOW_RUN_COMMAND = "uncool-flow-run -m prefect.engine"


class DeployError(RuntimeError):
    """Deploying failed; the message says why and what to do."""


def publish_code(store: ObjectStore, config: ProjectConfig) -> ObjectRef:
    """Store the project's code as one folder object; point the code ref at it."""
    from ..records.run_record import project_code, store_code

    roots, files = project_code(str(config.pipeline_file))
    roots.pop("uncool_prefect", None)  # a worker has the package installed
    ref = store_code(store, roots, files)
    store.set_ref(CODE_REF, ref, project=config.root.name)
    return ref


def pull_code(ref: str = CODE_REF, block: str | None = None) -> dict[str, str]:
    """Deployment pull step: the published code, materialized in this machine's cache.

    Returns ``{"directory": ...}``: Prefect changes into it before it loads
    the flow's entrypoint. Used from prefect.yaml as

        pull:
          - uncool_prefect.project.deploy.pull_code: {}
    """
    from ..blocks import ContentAddressedStorage

    home = os.environ.get("UNCOOL_HOME")
    if not home or not Path(home).is_absolute():
        # NOTE: the flow runs inside the code folder; a relative home would
        # put MLflow and the data cache in there, apart from the project's.
        raise DeployError(
            "UNCOOL_HOME is not an absolute path on this worker: start the worker with "
            "`uncool worker` from the project folder, or set UNCOOL_HOME (and the store "
            "block, UNCOOL_BLOCK) in the work pool's job variables"
        )
    name = block or get_settings().block
    store = cast(ContentAddressedStorage, ContentAddressedStorage.load(name)).store
    oid = store.get_ref(ref)["oid"]
    dest = cache_dir() / "code" / oid
    if not dest.is_dir():  # get_dir builds aside and renames: a folder here is complete
        store.get_dir(oid, dest)
    return {"directory": str(dest), "code": oid}


def ensure_work_pool(name: str = POOL) -> str:
    """Create the process work pool, or check the one there; returns what was done.

    Its flow-run command defaults to FLOW_RUN_COMMAND (a pool made before
    that default existed gets it; a command set by hand is kept).
    """
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process",
                base_job_template=with_flow_run_command(ProcessWorker.get_default_base_job_template()),
                description="uncool-prefect: the project's deployments (process worker)",
            ))
            return "created"
        if pool.type != "process":
            raise DeployError(f"work pool {name!r} exists with type {pool.type!r}; the deployments "
                              "of uncool deploy need a process pool: delete it or rename "
                              "work_pool.name in the project's prefect.yaml")
        command = pool.base_job_template.get("variables", {}).get("properties", {}).get("command", {})
        if command.get("default") is None:
            client.update_work_pool(name, WorkPoolUpdate(
                base_job_template=with_flow_run_command(pool.base_job_template)))
            return "exists; flow runs now start through the warm-start command"
    return "exists"


def with_flow_run_command(base_job_template: dict[str, Any]) -> dict[str, Any]:
    """A copy of a process pool's base job template whose command defaults to FLOW_RUN_COMMAND."""
    template = copy.deepcopy(base_job_template)
    properties = template.setdefault("variables", {}).setdefault("properties", {})
    properties.setdefault("command", {"title": "Command", "anyOf": [{"type": "string"}, {"type": "null"}]})
    properties["command"]["default"] = FLOW_RUN_COMMAND
    template.setdefault("job_configuration", {}).setdefault("command", "{{ command }}")
    return template


def register_blocks() -> ObjectStore:
    """Register the block types and point the store block at the project's store; that store."""
    from ..blocks import ContentAddressedStorage, ensure_store_block

    ContentAddressedStorage.register_type_and_schema()
    return ensure_store_block(get_settings().block)


def apply_deployments(config: ProjectConfig, api_url: str) -> str:
    """``prefect deploy --all`` on the project's prefect.yaml, from the project folder."""
    prefect_file = config.deployments_file
    if prefect_file is None or not prefect_file.exists():
        raise DeployError(f"{prefect_file} is missing; it declares the deployments "
                          "(set deployments = \"path/prefect.yaml\" in [tool.uncool] to use another)")
    command = [server.prefect_executable(), "--no-prompt", "deploy", "--all",
               "--prefect-file", str(prefect_file.relative_to(config.root))]
    done = subprocess.run(command, cwd=config.root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PREFECT_API_URL": api_url})
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise DeployError(f"`{' '.join(command[1:])}` failed (exit {done.returncode}):\n{tail}")
    return done.stdout


@dataclass
class DeploymentInfo:
    name: str
    schedules: list[str]
    triggers: list[str]
    work_pool: str | None


def read_deployments(config: ProjectConfig) -> list[DeploymentInfo]:
    """The deployments the project's prefect.yaml declares, as the server has them."""
    import yaml
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter

    assert config.deployments_file is not None
    declared = yaml.safe_load(config.deployments_file.read_text(encoding="utf-8")) or {}
    names = [str(d.get("name")) for d in declared.get("deployments") or [] if d.get("name")]
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
        flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter())}
        automations = client.read_automations()
    infos = []
    for deployment in deployments:
        schedules = [str(getattr(s.schedule, "cron", None) or s.schedule) for s in deployment.schedules]
        triggers = [
            ", ".join(sorted(getattr(a.trigger, "expect", ()))) for a in automations
            if any(str(getattr(action, "deployment_id", "")) == str(deployment.id)
                   for action in a.actions) and hasattr(a.trigger, "expect")
        ]
        infos.append(DeploymentInfo(f"{flows.get(deployment.flow_id, '?')}/{deployment.name}",
                                    schedules, triggers, deployment.work_pool_name))
    return sorted(infos, key=lambda d: d.name)


def watcher_deployment(infos: list[DeploymentInfo]) -> str:
    """The project's deployment of the watcher flow (``uncool-watch``)."""
    found = [info.name for info in infos if info.name.startswith(WATCH_FLOW + "/")]
    if not found:
        raise DeployError(f"--watch needs a deployment of the {WATCH_FLOW} flow in the project's "
                          "prefect.yaml (see the example's flows/watch.py); none is declared")
    return found[0]


def start_watcher(url: str, name: str, deployment: str) -> tuple[str, bool]:
    """A flow run of the watcher deployment on ``url``, unless one is already active.

    Returns the flow run id and whether it was created now.
    """
    from prefect import get_client

    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        return ensure_watcher_run(client, target.id, {"url": url, "name": name})


def ensure_watcher_run(client: Any, deployment_id: Any, parameters: dict[str, Any]) -> tuple[str, bool]:
    """The active run of the watcher deployment on the same dataset, else a new one."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    active = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=active))),
    )
    for run in runs:
        if (run.parameters.get("url"), run.parameters.get("name")) == (
                parameters.get("url"), parameters.get("name")):
            return str(run.id), False
    run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    return str(run.id), True
