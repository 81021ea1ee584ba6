"""``uncool reproduce``: re-create a recorded run and audit it byte for byte.

The recorded config, data snapshot and code snapshot are materialized from
the store, the recorded pipeline runs again from that code (in a subprocess
whose import path puts the snapshot first) with the cache bypassed, and every
stage's output id is compared with the recorded one. Registering the model is
a side effect, so the reproduction registers into a scratch MLflow store and
deploy is reported, not compared.
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

from .lineage import resolve_target, snapshot_environment
from .store import ObjectStore, StoreError

COMPARED = ("get-data", "split", "train", "evaluate")


class CorruptRecordError(StoreError):
    """Objects a run record names are damaged: the run cannot be re-created."""

_RUN_RECORDED = """
import json, sys
from pathlib import Path
from uncool_prefect import runner
code, data, params_file = sys.argv[1:4]
params = json.loads(Path(params_file).read_text())
pipeline = runner.load_pipeline(Path(code))
runner.ensure_block(pipeline.BLOCK)
state = pipeline.train_evaluate_deploy(params=params, source=data, return_state=True)
state.result()
print("UNCOOL_REPRODUCED", state.state_details.flow_run_id)
"""


@dataclass
class StageCheck:
    stage: str
    recorded: dict[str, Any]
    reproduced: dict[str, Any]

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


def _recorded_objects(store: ObjectStore, record: dict[str, Any]) -> list[str]:
    """Every object the record names, with the files of its folder objects."""
    names = [record["inputs"]["data"], record["code"]["snapshot"], record["environment"]]
    for stage in COMPARED:
        names.extend(str(v) for v in record["stages"][stage]["outputs"].values())
    for folder in (record["inputs"]["data"], record["code"]["snapshot"]):
        if store.has(folder):
            names.extend(entry.oid for entry in store.read_manifest(folder).entries)
    return list(dict.fromkeys(names))


def reproduce(store: ObjectStore, target: str, home: Path, api_url: str) -> Reproduction:
    """Re-run the run ``target`` resolves to from its own inputs; compare every stage."""
    record = resolve_target(store, target, home)
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
        data = store.get_dir(record["inputs"]["data"], scratch / "data")
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
        }
        done = subprocess.run(
            [sys.executable, "-c", _RUN_RECORDED, str(code), str(data), str(params_file)],
            capture_output=True, text=True, env=env, cwd=scratch, check=False,
        )
    new_run = next((line.split()[1] for line in done.stdout.splitlines()
                    if line.startswith("UNCOOL_REPRODUCED ")), None)
    if done.returncode != 0 or new_run is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise RuntimeError("the recorded pipeline failed to run again:\n" + "\n".join(tail))
    again = store.get_run_record(new_run)
    # NOTE: the reproduction's own record says what it was, and that its model
    # version lived in a scratch registry that is gone now.
    again["trigger"] = {**again.get("trigger", {}), "kind": "reproduce",
                        "of": record["flow_run_id"]}
    again["mlflow"] = {**again.get("mlflow", {}), "model_version": None,
                       "tracking_uri": None}
    store.put_run_record(new_run, again)
    result = Reproduction(record["flow_run_id"], new_run)
    for stage in COMPARED:
        result.checks.append(StageCheck(stage, record["stages"][stage]["outputs"],
                                        again["stages"][stage]["outputs"]))
    recorded_env = json.loads(store.get_bytes(record["environment"]))
    current_env = json.loads(store.get_bytes(snapshot_environment(store)))
    result.environment_changes = _package_changes(recorded_env, current_env)
    return result
