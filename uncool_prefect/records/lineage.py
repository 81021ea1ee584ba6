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

from ..params import flatten
from ..store import InvalidKeyError, ObjectStore, StoreError, parse_oid
from .reading import read_records
from .run_record import data_version, input_versions
from .targets import resolve_target


class CheckoutError(StoreError):
    """A checkout that cannot be written (destination in use, run incomplete)."""


def _digest(name: Any) -> str | None:
    try:
        return parse_oid(name)[0]
    except (InvalidKeyError, TypeError, AttributeError):
        return None


def slots(record: dict[str, Any]) -> dict[str, str]:
    """Every object of a run by its slot, in pipeline order: ``"<stage>.<argument>"`` for an
    input, ``"<stage>.<output>"`` for what a stage produced."""
    found: dict[str, str] = {}
    for key, version in input_versions(record).items():
        found[key] = version
    for name, stage in record.get("stages", {}).items():
        outputs = stage.get("outputs") or {}
        for key, oid in outputs.items():
            if isinstance(oid, str):
                found[f"{name}.{key}"] = oid
        if not outputs and isinstance(stage.get("result"), str):
            found[f"{name}.result"] = stage["result"]  # a value of its own, stored by content
    return found


def _stage_of(slot: str, record: dict[str, Any]) -> str:
    """The stage a slot belongs to (stage names may hold dots; slots are matched against them)."""
    stages = sorted(record.get("stages", {}), key=len, reverse=True)
    return next((name for name in stages if slot.startswith(name + ".")), slot.split(".")[0])


def made_from(record: dict[str, Any]) -> dict[str, list[str]]:
    """Slot -> the slots it was made from: its stage's inputs and the objects its arguments named."""
    every = slots(record)
    by_digest: dict[str, str] = {}
    for slot, oid in every.items():
        by_digest.setdefault(_digest(oid) or oid, slot)  # the first producer of an object
    edges: dict[str, list[str]] = {}
    for slot in every:
        stage_name = _stage_of(slot, record)
        stage = record.get("stages", {}).get(stage_name, {})
        own_inputs = [f"{stage_name}.{arg}" for arg in stage.get("inputs", {})]
        if slot in own_inputs:
            edges[slot] = []
            continue
        used = [by_digest[d] for d in (_digest(u) for u in stage.get("uses", [])) if d in by_digest]
        edges[slot] = [s for s in dict.fromkeys([*own_inputs, *used, *_values_from(stage, used, record)])
                       if s != slot]
    return edges


def _values_from(stage: dict[str, Any], used: list[str], record: dict[str, Any]) -> list[str]:
    """Slots of the stages whose results ``stage`` took as arguments (Prefect's ``after``).

    Where the arguments named some of a parent's objects by id, those (in
    ``used``) say exactly what was read; otherwise every slot of the parent.
    """
    every = slots(record)
    found: list[str] = []
    for parent in stage.get("after", []):
        mine = [s for s in every if _stage_of(s, record) == parent]
        if not set(mine) & set(used):
            found.extend(mine)
    return found


def _ancestors(starts: list[str], record: dict[str, Any]) -> list[str]:
    """``starts`` and everything they are made from, in pipeline order (one walk for all)."""
    edges = made_from(record)
    seen = set(starts)
    todo = list(starts)
    while todo:
        for parent in edges.get(todo.pop(), []):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return [s for s in slots(record) if s in seen]


def _stage_ancestors(stage_name: str, record: dict[str, Any]) -> list[str]:
    """The slots a stage read (its inputs, the objects its arguments named) and their ancestors."""
    every = slots(record)
    stage = record.get("stages", {}).get(stage_name, {})
    used = {_digest(u) for u in stage.get("uses", [])}
    named = [s for s, oid in every.items() if _digest(oid) in used]
    direct = [s for s in every if s in named
              or s in {f"{stage_name}.{arg}" for arg in stage.get("inputs", {})}
              or s in _values_from(stage, named, record)]
    return _ancestors(direct, record)


def _find_slot(record: dict[str, Any], digest: str) -> str | None:
    """The slot of ``record`` that holds the object ``digest``."""
    return next((slot for slot, oid in slots(record).items() if _digest(oid) == digest), None)


def _registering_stage(record: dict[str, Any]) -> str | None:
    models = record.get("models") or []
    return models[-1].get("stage") if models else None


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


def _model_versions(record: dict[str, Any], home: Path) -> dict[str, Any]:
    """The MLflow model versions the run registered, with their aliases now (``error`` if unreachable)."""
    from .. import tracking

    uri = tracking.tracking_uri(home)
    registered = [(m.get("name"), str(m.get("version"))) for m in record.get("models", [])]
    if not registered and record.get("mlflow", {}).get("model_version") is not None:
        mlflow = record["mlflow"]
        registered = [(mlflow.get("model_name"), str(mlflow["model_version"]))]
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return {"tracking_uri": uri, "versions": [], "error": "no MLflow database yet"}
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        versions = []
        for name, number in registered:
            full = client.get_model_version(name, number)
            versions.append({"name": name, "version": str(full.version),
                             "aliases": sorted(full.aliases),
                             "flow_run_id": full.tags.get("prefect_flow_run_id")})
    except Exception as exc:  # noqa: BLE001 - lineage still works without MLflow
        return {"tracking_uri": uri, "versions": [], "error": f"{type(exc).__name__}: {exc}"}
    return {"tracking_uri": uri, "versions": versions}


def _focus(target: str, record: dict[str, Any]) -> tuple[str, str | None]:
    """(kind of target, the slot it names; None: the whole run)."""
    if target == "champion" or target.startswith("models:/"):
        return "model-version", None
    digest = _digest(target)
    if digest is not None:
        return "object", _find_slot(record, digest)
    return "run", None


def lineage_tree(store: ObjectStore, target: str, home: Path) -> dict[str, Any]:
    """Upstream and downstream lineage of ``target`` as a JSON-serializable dict.

    ``target`` is anything :func:`~uncool_prefect.records.targets.resolve_target`
    accepts; an unknown one raises :class:`~uncool_prefect.records.targets.TargetError`.
    """
    record = resolve_target(store, target, home)
    kind, slot = _focus(target, record)
    code = record.get("code", {})
    every = slots(record)
    registering = _registering_stage(record)
    made = _stage_ancestors(registering, record) if registering else list(every)
    chain_slots = made if kind == "model-version" else (_ancestors([slot], record) if slot
                                                          else list(every))
    stages = record.get("stages", {})
    chain = [{"slot": s, "stage": _stage_of(s, record), "id": every[s],
              "state": stages.get(_stage_of(s, record), {}).get("state")} for s in chain_slots]
    upstream = {
        "run": _run_summary(record),
        "config": {"params_hash": record.get("params_hash"), "params": record.get("params", {})},
        "data": data_version(record),
        "inputs": input_versions(record),
        "stages": {name: entry.get("state") for name, entry in stages.items()},
        "code": {"snapshot": code.get("snapshot"), "git_commit": code.get("git_commit"),
                 "git_dirty": code.get("git_dirty"), "git_diff": code.get("git_diff")},
        "environment": record.get("environment"),
        "chain": chain,
    }
    records = read_records(store)
    consumers: list[dict[str, Any]] = []
    digest = _digest(target) if kind == "object" else None
    if digest is not None:
        for other in records:
            for name, info in other.get("stages", {}).items():
                uses = {_digest(u) for u in info.get("uses", [])}
                uses |= {_digest(f.get("version")) for f in info.get("inputs", {}).values()}
                if digest in uses:
                    consumers.append({"flow_run_id": other.get("flow_run_id"), "stage": name,
                                      "input": _find_slot(other, digest), "state": info.get("state"),
                                      "outputs": info.get("outputs", {}),
                                      "started_at": _when(other.get("started"))})
    watched = {_stage_of(slot, record)} if slot else set(stages)
    reused_by = []
    for other in records:
        if other.get("flow_run_id") == record.get("flow_run_id") or \
                other.get("started", 0) < record.get("started", 0):
            continue
        cached = [name for name, info in other.get("stages", {}).items()
                  if name in watched and info.get("state") == "Cached"
                  and info.get("outputs") == stages.get(name, {}).get("outputs")]
        if cached:
            reused_by.append({"flow_run_id": other.get("flow_run_id"), "stages": cached,
                              "started_at": _when(other.get("started"))})
    downstream: dict[str, Any] = {"consumers": consumers, "reused_by": reused_by}
    if record.get("models") and (slot is None or slot in made):
        downstream["model_versions"] = _model_versions(record, home)
    return {"target": target, "kind": kind, "slot": slot,
            "flow_run_id": record.get("flow_run_id"), "store": store.url,
            "upstream": upstream, "downstream": downstream}


def render_tree(tree: dict[str, Any]) -> Tree:
    """The lineage dict of :func:`lineage_tree` as a rich tree for the terminal."""
    up, down = tree["upstream"], tree["downstream"]
    run = up["run"]
    trigger = run.get("trigger") or {}
    what = f" ({tree['slot']})" if tree["kind"] == "object" and tree["slot"] else ""
    mlflow = run.get("mlflow") or {}
    if tree["kind"] != "object" and mlflow.get("model_name"):
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
    for key, version in up["inputs"].items():
        upstream.add(f"input {key} {version}")
    stages_node = upstream.add("[bold]stages[/]")
    for name, state in up["stages"].items():
        stages_node.add(f"{name} [dim]({state})[/]")
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
{model_line}

| file | what it is |
|---|---|
| `params.yaml` | the flow's parameters in this run (params hash `{params_hash}`) |
| `data/` | the run's input data, version `{data}` |
{input_rows}{model_rows}| `code/` | the code that ran (snapshot `{snapshot}`) |
| `environment.json` | Python version, platform and installed packages |
| `run.json` | the full run record (every object id, stage states, MLflow ids) |
{git_row}
Git commit: `{git_commit}`{dirty}.

## Re-run it

    uncool reproduce {run_id}

or by hand: `cd code && uncool run --params ../params.yaml`, with the data of
`data/` where the params point. Unchanged stages come back Cached.
"""


def _registered(record: dict[str, Any]) -> dict[str, Any]:
    models = record.get("models") or []
    return models[-1] if models else {}


def _run_md(record: dict[str, Any]) -> str:
    code = record.get("code", {})
    model = _registered(record)
    inputs = input_versions(record)
    extra = list(inputs.items())[1:]
    model_line = (f"Model: {model.get('name')} v{model.get('version')}"
                  + (" (promoted to champion)" if model.get("promoted") else "")
                  + (f"; model object `{model['model_oid']}`." if model.get("model_oid") else ".")
                  if model else "No model registered.")
    model_rows = ""
    if model.get("model_oid"):
        model_rows += (f"| `model.pkl` | the registered model (`pickle.load`), "
                       f"object `{model['model_oid']}` |\n")
    if model.get("metrics"):
        model_rows += "| `metrics.json` | the metrics it was registered with |\n"
    return RUN_MD.format(
        run_id=record.get("flow_run_id"), flow=record.get("flow_name"),
        started=_when(record.get("started")), trigger=record.get("trigger", {}).get("kind", "?"),
        model_line=model_line, params_hash=record.get("params_hash"), data=data_version(record),
        input_rows="".join(f"| `inputs/{key}/` | input `{key}`, version `{version}` |\n"
                           for key, version in extra),
        model_rows=model_rows, snapshot=code.get("snapshot"),
        git_commit=code.get("git_commit") or "none",
        dirty=" with uncommitted changes" if code.get("git_dirty") else "",
        git_row="| `git.diff` | the uncommitted changes on top of that commit |\n"
        if code.get("git_diff") else "",
    )


def _get(store: ObjectStore, oid: str, dest: Path) -> None:
    if oid.endswith(".dir"):
        store.get_dir(oid, dest)
    else:
        store.get_file(oid, dest)


def checkout(store: ObjectStore, target: str, dest: Path, home: Path) -> Path:
    """Write the run behind ``target`` into the new (or empty) folder ``dest``.

    The folder holds params.yaml, data/ (the first input; others in
    inputs/<stage>.<argument>/), model.pkl and metrics.json if the run
    registered a model, code/, environment.json, run.json, git.diff (if the
    tree was dirty) and a RUN.md explaining them. It is built beside ``dest``
    and renamed into place, so a failure leaves nothing behind; a non-empty
    ``dest`` is refused untouched.
    """
    import yaml

    record = resolve_target(store, target, home)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckoutError(f"{dest} already exists and is not an empty folder; "
                            "choose a new destination or remove it first")
    code, environment = record.get("code", {}).get("snapshot"), record.get("environment")
    if not code or not environment:
        raise CheckoutError(f"run {record.get('flow_run_id')} records no code or environment; "
                            "it cannot be checked out")
    inputs = input_versions(record)
    model = _registered(record)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{uuid.uuid4().hex[:16]}.uncool-checkout"
    try:
        staging.mkdir()
        (staging / "params.yaml").write_text(
            yaml.safe_dump(record.get("params", {}), sort_keys=False), encoding="utf-8")
        for index, (key, version) in enumerate(inputs.items()):
            _get(store, version, staging / "data" if index == 0 else staging / "inputs" / key)
        if model.get("model_oid"):
            store.get_file(model["model_oid"], staging / "model.pkl")
        if model.get("metrics"):
            (staging / "metrics.json").write_text(
                json.dumps(model["metrics"], indent=1, sort_keys=True) + "\n")
        store.get_dir(code, staging / "code")
        store.get_file(environment, staging / "environment.json")
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
