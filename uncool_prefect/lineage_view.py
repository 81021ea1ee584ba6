"""Lineage of a result, both ways, and a readable checkout of the run behind it.

``lineage_tree`` answers "where did this come from, and what used it?" from the
run records alone (plus the MLflow registry when it is reachable): upstream, the
run, its config, data, code, environment and the chain of stage outputs leading
to the target; downstream, the stages that consumed the target, the MLflow model
versions of a model, and later runs that reused the outputs from the cache.

``checkout`` writes everything a newcomer needs to read and re-run a result
into one new folder. Neither imports Prefect.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from rich.tree import Tree

from .lineage import iter_records, resolve_target
from .params import flatten
from .store import InvalidKeyError, ObjectStore, StoreError, parse_oid

# Pipeline order of the stage outputs ("stage.output"), and what each one is made from.
SLOTS = ("get-data.dataset", "split.train", "split.val", "train.model",
         "evaluate.metrics", "deploy.model_version")
MADE_FROM: dict[str, tuple[str, ...]] = {
    "get-data.dataset": (),
    "split.train": ("get-data.dataset",),
    "split.val": ("get-data.dataset",),
    "train.model": ("split.train",),
    "evaluate.metrics": ("train.model", "split.val"),
    "deploy.model_version": ("train.model", "evaluate.metrics"),
}
# Which stages take each output as an input.
CONSUMED_BY: dict[str, tuple[str, ...]] = {
    "get-data.dataset": ("split",),
    "split.train": ("train",),
    "split.val": ("evaluate",),
    "train.model": ("evaluate", "deploy"),
    "evaluate.metrics": ("deploy",),
    "deploy.model_version": (),
}


class CheckoutError(StoreError):
    """A checkout that cannot be written (destination in use, run incomplete)."""


def _digest(name: str) -> str | None:
    try:
        return parse_oid(name)[0]
    except (InvalidKeyError, TypeError):
        return None


def _output(record: dict[str, Any], slot: str) -> Any:
    stage, _, key = slot.partition(".")
    return record.get("stages", {}).get(stage, {}).get("outputs", {}).get(key)


def _find_slot(record: dict[str, Any], digest: str) -> str | None:
    """The ``stage.output`` of ``record`` that holds the object ``digest``."""
    for slot in SLOTS:
        value = _output(record, slot)
        if isinstance(value, str) and _digest(value) == digest:
            return slot
    return None


def _ancestors(slot: str) -> list[str]:
    """``slot`` and everything it is made from, in pipeline order."""
    seen = {slot}
    todo = [slot]
    while todo:
        for parent in MADE_FROM.get(todo.pop(), ()):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return [s for s in SLOTS if s in seen]


def _when(timestamp: Any) -> str | None:
    if not isinstance(timestamp, (int, float)):
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))


def _run_summary(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "flow_run_id": record.get("flow_run_id"), "flow": record.get("flow_name"),
        "started": record.get("started"), "started_at": _when(record.get("started")),
        "finished": record.get("finished"), "trigger": record.get("trigger", {}),
        "states": {name: s.get("state") for name, s in record.get("stages", {}).items()},
        "mlflow": record.get("mlflow", {}),
    }


def _model_versions(record: dict[str, Any], model_oid: str, home: Path) -> dict[str, Any]:
    """MLflow model versions tagged with ``model_oid`` (an ``error`` if MLflow is unreachable)."""
    from . import tracking

    uri = tracking.tracking_uri(home)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return {"tracking_uri": uri, "versions": [], "error": "no MLflow database yet"}
    name = str(record.get("mlflow", {}).get("model_name") or "issue-labeler")
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = [v for v in client.search_model_versions(f"name='{name}'")
                 if v.tags.get("model_oid") == model_oid]
        versions = []
        for version in sorted(found, key=lambda v: int(v.version)):
            full = client.get_model_version(name, version.version)  # search omits aliases
            versions.append({"name": name, "version": str(full.version),
                             "aliases": sorted(full.aliases),
                             "flow_run_id": full.tags.get("prefect_flow_run_id")})
    except Exception as exc:  # noqa: BLE001 - lineage still works without MLflow
        return {"tracking_uri": uri, "versions": [], "error": f"{type(exc).__name__}: {exc}"}
    return {"tracking_uri": uri, "versions": versions}


def _focus(target: str, record: dict[str, Any]) -> tuple[str, str | None]:
    """(kind of target, the output slot it names)."""
    if target == "champion" or target.startswith("models:/"):
        return "model-version", "train.model"
    digest = _digest(target)
    if digest is not None:
        return "object", _find_slot(record, digest)
    return "run", "deploy.model_version"


def lineage_tree(store: ObjectStore, target: str, home: Path) -> dict[str, Any]:
    """Upstream and downstream lineage of ``target`` as a JSON-serializable dict.

    ``target`` is anything :func:`~uncool_prefect.lineage.resolve_target` accepts;
    an unknown one raises :class:`~uncool_prefect.lineage.TargetError`.
    """
    record = resolve_target(store, target, home)
    kind, slot = _focus(target, record)
    code = record.get("code", {})
    chain = [{"slot": s, "stage": s.split(".")[0], "id": _output(record, s),
              "state": record.get("stages", {}).get(s.split(".")[0], {}).get("state")}
             for s in (_ancestors(slot) if slot else [])]
    upstream = {
        "run": _run_summary(record),
        "config": {"params_hash": record.get("params_hash"), "params": record.get("params", {})},
        "data": record.get("inputs", {}).get("data"),
        "code": {"snapshot": code.get("snapshot"), "git_commit": code.get("git_commit"),
                 "git_dirty": code.get("git_dirty"), "git_diff": code.get("git_diff")},
        "environment": record.get("environment"),
        "chain": chain,
    }
    records = iter_records(store)
    consumers: list[dict[str, Any]] = []
    if kind == "object" and slot:
        digest = _digest(target)
        for other in records:
            other_slot = _find_slot(other, digest) if digest else None
            for stage in CONSUMED_BY.get(other_slot or "", ()):
                info = other.get("stages", {}).get(stage)
                if info is not None:
                    consumers.append({"flow_run_id": other.get("flow_run_id"), "stage": stage,
                                      "input": other_slot, "state": info.get("state"),
                                      "outputs": info.get("outputs", {}),
                                      "started_at": _when(other.get("started"))})
    mine = record.get("stages", {})
    watched = {slot.split(".")[0]} if kind == "object" and slot else set(mine)
    reused_by = []
    for other in records:
        if other.get("flow_run_id") == record.get("flow_run_id") or \
                other.get("started", 0) < record.get("started", 0):
            continue
        cached = [name for name, info in other.get("stages", {}).items()
                  if name in watched and info.get("state") == "Cached"
                  and info.get("outputs") == mine.get(name, {}).get("outputs")]
        if cached:
            reused_by.append({"flow_run_id": other.get("flow_run_id"), "stages": cached,
                              "started_at": _when(other.get("started"))})
    model = _output(record, "train.model")
    downstream: dict[str, Any] = {"consumers": consumers, "reused_by": reused_by}
    if slot in ("train.model", "deploy.model_version") and isinstance(model, str):
        downstream["model_versions"] = _model_versions(record, model, home)
    return {"target": target, "kind": kind, "slot": slot,
            "flow_run_id": record.get("flow_run_id"), "store": store.url,
            "upstream": upstream, "downstream": downstream}


def render_tree(tree: dict[str, Any]) -> Tree:
    """The lineage dict of :func:`lineage_tree` as a rich tree for the terminal."""
    up, down = tree["upstream"], tree["downstream"]
    run = up["run"]
    trigger = run.get("trigger") or {}
    what = f" ({tree['slot']})" if tree["kind"] == "object" and tree["slot"] else ""
    if tree["kind"] != "object":
        mlflow = run.get("mlflow") or {}
        what = f" -> {mlflow.get('model_name')} v{mlflow.get('model_version')}"
    root = Tree(f"[bold]{tree['target']}[/]{what}")
    upstream = root.add("[bold cyan]upstream[/]")
    upstream.add(f"run {run['flow_run_id']} ({run['flow']}), started {run['started_at']}, "
                 f"trigger {trigger.get('kind', '?')}"
                 + (f" by {trigger['user']}" if trigger.get("user") else ""))
    config = upstream.add(f"config params {up['config']['params_hash']}")
    for key, value in flatten(up["config"]["params"]):
        config.add(f"{key} = {json.dumps(value)}")
    upstream.add(f"data {up['data']}")
    code = up["code"]
    dirty = " [yellow](dirty)[/]" if code["git_dirty"] else ""
    upstream.add(f"code {code['snapshot']}, git {(code['git_commit'] or 'none')[:12]}{dirty}")
    upstream.add(f"environment {up['environment']}")
    node = upstream.add("[bold]chain[/]") if up["chain"] else upstream
    for link in up["chain"]:
        node = node.add(f"{link['slot']} {link['id']} [dim]({link['state']})[/]")
    downstream = root.add("[bold magenta]downstream[/]")
    for used in down["consumers"]:
        outputs = ", ".join(f"{k} {v}" for k, v in used["outputs"].items())
        downstream.add(f"{used['stage']} of run {used['flow_run_id']} ({used['state']}) "
                       f"-> {outputs}")
    registry = down.get("model_versions")
    if registry is not None:
        for version in registry["versions"]:
            aliases = f" @{', @'.join(version['aliases'])}" if version["aliases"] else ""
            downstream.add(f"MLflow {version['name']} v{version['version']}{aliases}")
        if registry.get("error"):
            downstream.add(f"[dim]MLflow at {registry['tracking_uri']}: {registry['error']}[/]")
    for reuse in down["reused_by"]:
        downstream.add(f"reused by run {reuse['flow_run_id']} ({reuse['started_at']}): "
                       f"{', '.join(reuse['stages'])} Cached")
    if not downstream.children:
        downstream.add("[dim]nothing has used it yet[/]")
    return root


RUN_MD = """# Run {run_id}

A checkout of flow run `{run_id}` ({flow}), started {started}, trigger {trigger}.
Model: {model_name} v{model_version}{promoted}; model object `{model}`.

| file | what it is |
|---|---|
| `params.yaml` | the resolved parameters of the run (params hash `{params_hash}`) |
| `data/` | the input dataset, version `{data}` |
| `model.pkl` | the trained scikit-learn pipeline (`pickle.load`), object `{model}` |
| `metrics.json` | its metrics on the validation split |
| `code/` | the code that ran, snapshot `{snapshot}`: `flows/` (the pipeline), `uncool_prefect/` |
| `environment.json` | Python version, platform and installed packages |
| `run.json` | the full run record (every object id, stage states, MLflow run `{mlflow_run}`) |
{git_row}
Git commit: `{git_commit}`{dirty}.

## Re-run it

    uncool reproduce {run_id}

or by hand, from this folder:

    cd code && uncool run --params ../params.yaml -S data.source=folder -S data.folder.url=../data

Unchanged stages come back Cached; the model trained again should hash to `{model}`.
"""


def _run_md(record: dict[str, Any]) -> str:
    code, mlflow = record.get("code", {}), record.get("mlflow", {})
    deploy = record.get("stages", {}).get("deploy", {}).get("outputs", {})
    return RUN_MD.format(
        run_id=record.get("flow_run_id"), flow=record.get("flow_name"),
        started=_when(record.get("started")), trigger=record.get("trigger", {}).get("kind", "?"),
        model_name=mlflow.get("model_name"), model_version=mlflow.get("model_version"),
        promoted=" (promoted to champion)" if deploy.get("promoted") else "",
        model=_output(record, "train.model"), params_hash=record.get("params_hash"),
        data=record.get("inputs", {}).get("data"), snapshot=code.get("snapshot"),
        mlflow_run=mlflow.get("run_id"), git_commit=code.get("git_commit") or "none",
        dirty=" with uncommitted changes" if code.get("git_dirty") else "",
        git_row="| `git.diff` | the uncommitted changes on top of that commit |\n"
        if code.get("git_diff") else "",
    )


def checkout(store: ObjectStore, target: str, dest: Path, home: Path) -> Path:
    """Write the run behind ``target`` into the new (or empty) folder ``dest``.

    The folder holds params.yaml, data/, model.pkl, metrics.json, code/,
    environment.json, run.json, git.diff (if the tree was dirty) and a RUN.md
    explaining them. It is built beside ``dest`` and renamed into place, so a
    failure leaves nothing behind; a non-empty ``dest`` is refused untouched.
    """
    import yaml

    record = resolve_target(store, target, home)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckoutError(f"{dest} already exists and is not an empty folder; "
                            "choose a new destination or remove it first")
    needed = {"data": record.get("inputs", {}).get("data"), "model": _output(record, "train.model"),
              "metrics": _output(record, "evaluate.metrics"),
              "code": record.get("code", {}).get("snapshot"), "environment": record.get("environment")}
    missing = [name for name, oid in needed.items() if not oid]
    if missing:
        raise CheckoutError(f"run {record.get('flow_run_id')} records no {', '.join(missing)}; "
                            "it cannot be checked out")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{uuid.uuid4().hex[:16]}.uncool-checkout"
    try:
        staging.mkdir()
        (staging / "params.yaml").write_text(
            yaml.safe_dump(record.get("params", {}), sort_keys=False), encoding="utf-8")
        store.get_dir(needed["data"], staging / "data")
        store.get_file(needed["model"], staging / "model.pkl")
        lines = store.get_bytes(needed["metrics"]).decode("utf-8").splitlines()
        metrics = json.loads(lines[0]) if lines else {}
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        store.get_dir(needed["code"], staging / "code")
        store.get_file(needed["environment"], staging / "environment.json")
        (staging / "run.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        if record.get("code", {}).get("git_diff"):
            store.get_file(record["code"]["git_diff"], staging / "git.diff")
        (staging / "RUN.md").write_text(_run_md(record), encoding="utf-8")
        if dest.exists():
            dest.rmdir()  # empty: checked above
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
