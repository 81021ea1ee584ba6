"""``uncool reproduce``: re-create a recorded run and audit it byte for byte.

The recorded code snapshot and every recorded input are materialized from the
store; the recorded pipeline runs again from that code (in a subprocess whose
import path puts the snapshot first), with the recorded parameters, the cache
bypassed, and each stage's path argument replaced by its recorded data
(:data:`REPLAY_INPUTS_ENV`, read by ``@stage``). Then every object each stage
produced is compared with the recorded one. Registering a model is a side
effect, so the reproduction registers into a scratch MLflow store and the
registering stage is reported, not compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..recording import REPLAY_INPUTS_ENV
from ..store import ObjectStore, StoreError
from .run_record import input_versions, snapshot_environment
from .targets import resolve_target


class CorruptRecordError(StoreError):
    """Objects a run record names are damaged: the run cannot be re-created."""


class NotReproducibleError(StoreError):
    """The record lacks what a reproduction needs; the message says what."""


_RUN_RECORDED = """
import json, sys
from pathlib import Path
from uncool_prefect.config import config_of
from uncool_prefect.project.runner import load_flow
code, params_file = sys.argv[1:3]
flow = load_flow(config_of(Path(code)))
state = flow(**json.loads(Path(params_file).read_text()), return_state=True)
state.result()
print("UNCOOL_REPRODUCED", state.state_details.flow_run_id)
"""


@dataclass
class StageCheck:
    stage: str
    recorded: dict[str, Any]
    reproduced: dict[str, Any]
    note: str = ""

    @property
    def identical(self) -> bool:
        return self.recorded == self.reproduced


@dataclass
class Reproduction:
    run_id: str
    reproduced_run_id: str
    checks: list[StageCheck] = field(default_factory=list)
    environment_changes: list[str] = field(default_factory=list)

    @property
    def first_divergence(self) -> StageCheck | None:
        return next((check for check in self.checks if not check.identical), None)

    def likely_cause(self) -> str:
        if self.environment_changes:
            return "the environment differs from the recorded one: " + "; ".join(
                self.environment_changes[:8])
        return ("config, data, code and environment are the recorded ones, so the stage "
                "itself is not deterministic")


def _package_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    def versions(doc: dict[str, Any]) -> dict[str, str]:
        pairs = (p.split("==", 1) for p in doc.get("packages", []) if "==" in p)
        return {name.lower(): version for name, version in pairs}

    before, after = versions(recorded), versions(current)
    changes = [f"{name} {before.get(name, '-')} -> {after.get(name, '-')}"
               for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
    if recorded.get("python", "").split()[:1] != current.get("python", "").split()[:1]:
        changes.insert(0, f"python {recorded.get('python', '?').split()[0]} -> "
                          f"{current.get('python', '?').split()[0]}")
    return changes


def _compared(stage: dict[str, Any]) -> dict[str, Any]:
    """What a stage stored: the object ids its return value names, else its stored result."""
    if stage.get("outputs"):
        return dict(stage["outputs"])
    return {"result": stage["result"]} if stage.get("result") else {}


def _recorded_objects(store: ObjectStore, record: dict[str, Any]) -> list[str]:
    """Every object the record names, with the files of its folder objects."""
    inputs = list(input_versions(record).values())
    names = [*inputs, record["code"]["snapshot"], record["environment"]]
    for stage in record.get("stages", {}).values():
        names.extend(str(v) for v in stage.get("outputs", {}).values())
    for folder in [*inputs, record["code"]["snapshot"]]:
        if folder.endswith(".dir") and store.has(folder):
            names.extend(entry.oid for entry in store.read_manifest(folder).entries)
    return list(dict.fromkeys(names))


def reproduce(store: ObjectStore, target: str, home: Path, api_url: str) -> Reproduction:
    """Re-run the run ``target`` resolves to from its own inputs; compare every stage."""
    record = resolve_target(store, target, home)
    if record.get("version", 1) < 2 or not record.get("entrypoint"):
        raise NotReproducibleError(
            f"run {record['flow_run_id']} was recorded without its pipeline's entrypoint "
            "(an older record, or a @pipeline outside a [tool.uncool] project): it cannot be "
            "re-run automatically; `uncool checkout` gives its code, data and params")
    corrupt = [f"{p.name} ({p.kind})"
               for p in store.verify(names=_recorded_objects(store, record))]
    if corrupt:
        # Nothing to re-run from: the inputs themselves are damaged.
        raise CorruptRecordError(
            f"run {record['flow_run_id']} cannot be reproduced: objects it names are damaged "
            f"in {store.url}: {', '.join(corrupt)}. `uncool store verify` lists them; put "
            "the original data again to repair."
        )
    with tempfile.TemporaryDirectory(prefix="uncool-reproduce-") as tmp:
        scratch = Path(tmp)
        # Inputs come out of the store verified: a damaged one stops us here, named.
        code = store.get_dir(record["code"]["snapshot"], scratch / "code")
        replay = {}
        for key, version in input_versions(record).items():
            dest = scratch / "inputs" / key
            if version.endswith(".dir"):
                store.get_dir(version, dest)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                store.get_file(version, dest)
            replay[key] = str(dest)
        params_file = scratch / "params.json"
        params_file.write_text(json.dumps(record["params"]))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]),
            "PREFECT_API_URL": api_url,
            "PREFECT_TASKS_REFRESH_CACHE": "true",
            "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}",
            "UNCOOL_STORE": store.url,
            "UNCOOL_HOME": str(scratch / "home"),
            "UNCOOL_BLOCK": "uncool-reproduce",
            "UNCOOL_REPRODUCING": str(record["flow_run_id"]),
            REPLAY_INPUTS_ENV: json.dumps(replay),
        }
        done = subprocess.run(
            [sys.executable, "-c", _RUN_RECORDED, str(code), str(params_file)],
            capture_output=True, text=True, env=env, cwd=code, check=False,
        )
    new_run = next((line.split()[1] for line in done.stdout.splitlines()
                    if line.startswith("UNCOOL_REPRODUCED ")), None)
    if done.returncode != 0 or new_run is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise RuntimeError("the recorded pipeline failed to run again:\n" + "\n".join(tail))
    again = store.get_run_record(new_run)
    # NOTE: its model versions lived in a scratch registry that is gone now.
    again["mlflow"] = {**again.get("mlflow", {}), "model_version": None, "tracking_uri": None}
    again["models"] = [{**m, "version": None, "scratch_registry": True}
                       for m in again.get("models", [])]
    store.put_run_record(new_run, again)
    result = Reproduction(record["flow_run_id"], new_run)
    registering = {m.get("stage") for m in record.get("models", [])}
    for name, stage in record.get("stages", {}).items():
        other = again.get("stages", {}).get(name, {})
        if name in registering:
            result.checks.append(StageCheck(name, {}, {}, "registers a model: not compared "
                                                          "(scratch registry)"))
            continue
        check = StageCheck(name, _compared(stage), _compared(other))
        if not check.recorded and not check.reproduced:
            check.note = "stores no objects: nothing to compare"
        result.checks.append(check)
    recorded_env = json.loads(store.get_bytes(record["environment"]))
    current_env = json.loads(store.get_bytes(snapshot_environment(store)))
    result.environment_changes = _package_changes(recorded_env, current_env)
    return result
