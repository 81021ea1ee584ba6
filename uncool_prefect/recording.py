"""What a ``@pipeline`` run collects while it runs, for its run record (no Prefect imports).

A :class:`Recorder` lives in a context variable for the length of one
pipeline run (so task runs in threads and subflows see it too): ``@stage``
hooks report each task run's end, :class:`~uncool_prefect.caching.ContentAware`
reports the path inputs it stores and the object ids a stage's arguments name,
and ``register_model`` the versions it registers. Also here: the replay of
recorded inputs that ``uncool reproduce`` asks for.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import InvalidKeyError, ObjectStore, parse_oid

# NOTE: set by `uncool reproduce` for its re-run: {"<stage>.<argument>": local
# path}. A stage's path argument is replaced by the recorded data.
REPLAY_INPUTS_ENV = "UNCOOL_REPLAY_INPUTS"


@dataclass
class StageRun:
    """One task run of a pipeline, as its run record keeps it."""

    task: str
    task_run_id: str
    state: str
    started: float
    result: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    uses: list[str] = field(default_factory=list)
    # What its cache key was made of (see caching.key_ingredients), for `uncool status`.
    key: dict[str, Any] | None = None
    # Task runs whose results were arguments of this one (Prefect's own dependency tracking).
    after: list[str] = field(default_factory=list)
    error: str | None = None


_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "uncool_pipeline_recorder", default=None)


@dataclass
class Recorder:
    """What one pipeline run collects while it runs: stages, inputs, registered models."""

    store: ObjectStore
    params: dict[str, Any] = field(default_factory=dict)
    source_file: str | None = None
    # Takes the code snapshot ({"snapshot": object id, git...}) when first needed.
    snapshot_code: Callable[[], dict[str, Any]] | None = None
    # The saved result storage block, handed to stages in this process (see api.Stage).
    result_storage: Any = None
    stages: dict[str, StageRun] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    _inputs: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    _uses: dict[str, list[str]] = field(default_factory=dict)
    _keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def note_input(self, task_run_id: str, argument: str, url: str, version: str) -> None:
        with self._lock:
            self._inputs.setdefault(task_run_id, {})[argument] = {"url": url, "version": version}

    def note_uses(self, task_run_id: str, object_ids: list[str]) -> None:
        with self._lock:
            self._uses[task_run_id] = object_ids

    def note_key(self, task_run_id: str, ingredients: dict[str, Any]) -> None:
        with self._lock:
            self._keys[task_run_id] = ingredients

    def note_model(self, registration: dict[str, Any]) -> None:
        with self._lock:
            if not any(m.get("name") == registration.get("name")
                       and m.get("version") == registration.get("version") for m in self.models):
                self.models.append(registration)

    @functools.cached_property
    def params_hash(self) -> str:
        from .params import params_hash

        return params_hash(self.params)

    @functools.cached_property
    def code(self) -> dict[str, Any]:
        """The code snapshot of the run (taken once, when first needed)."""
        return self.snapshot_code() if self.snapshot_code else {"snapshot": None}

    def lineage_tags(self) -> dict[str, str]:
        """What a registered model version is tagged with, to find this run from it."""
        versions = self.input_versions()
        tags = {"params_hash": self.params_hash, "code_hash": str(self.code["snapshot"])}
        if versions:
            tags["data_hash"] = next(iter(versions.values()))
        return tags

    def input_versions(self) -> dict[str, str]:
        """``"<argument>": object id`` of every path input noted so far."""
        with self._lock:
            return {argument: found["version"] for inputs in self._inputs.values()
                    for argument, found in inputs.items()}

    def note_state(self, task: Any, task_run: Any, state: Any) -> None:
        """A task run ended (Completed, Cached or Failed): keep its state and outputs."""
        run_id = str(task_run.id)
        value, result_oid, error = None, None, None
        if state.is_completed():
            value = state.result(raise_on_failure=False)
            result_oid = self._result_object(state)
            for registration in _registrations_in(value):
                self.note_model(registration)
        else:
            error = state.message
        started = task_run.start_time.timestamp() if task_run.start_time else time.time()
        after = sorted({str(found.id) for inputs in (task_run.task_inputs or {}).values()
                        for found in inputs if getattr(found, "input_type", None) == "task_run"})
        with self._lock:
            self.stages[run_id] = StageRun(
                task=task.name, task_run_id=run_id, state=str(state.name), started=started,
                result=result_oid, outputs=self._outputs(value),
                inputs=self._inputs.get(run_id, {}), uses=self._uses.get(run_id, []),
                after=after, error=error, key=self._keys.get(run_id),
            )

    def _result_object(self, state: Any) -> str | None:
        """The object id the block stored the task's return value as (None if not persisted)."""
        key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
        if not key:
            return None
        try:
            return str(self.store.get_ref(str(key))["oid"])
        except (OSError, ValueError):
            return None  # persisted elsewhere (another block): not this store's object

    def _outputs(self, value: Any) -> dict[str, str]:
        """Object ids named in a return value, by where they sit in it (``train``, ``trials.0.model``)."""
        found = {where: oid for where, oid in _object_ids_in(value)}
        return {where: oid for where, oid in found.items() if self.store.has(oid)}


def _object_ids_in(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        try:
            parse_oid(value)
        except InvalidKeyError:
            return
        yield prefix or "value", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _object_ids_in(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _object_ids_in(item, f"{prefix}.{index}" if prefix else str(index))


def _registrations_in(value: Any) -> Iterator[dict[str, Any]]:
    """What ``register_model`` returned, found in a stage's return value (any ``model_record()``)."""
    if callable(getattr(value, "model_record", None)):
        yield value.model_record()
    elif isinstance(value, dict):
        for item in value.values():
            yield from _registrations_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _registrations_in(item)


def active_recorder() -> Recorder | None:
    """The recorder of the pipeline run this code runs in, if any."""
    return _RECORDER.get()


def start_recording(recorder: Recorder) -> contextvars.Token[Recorder | None]:
    return _RECORDER.set(recorder)


def stop_recording(token: contextvars.Token[Recorder | None]) -> None:
    _RECORDER.reset(token)


def record_state(task: Any, task_run: Any, state: Any) -> None:
    """A ``@stage`` hook: the task run ended (Completed, Cached or Failed)."""
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.note_state(task, task_run, state)


@functools.cache
def _replayed_inputs() -> dict[str, str]:
    raw = os.environ.get(REPLAY_INPUTS_ENV)
    return dict(json.loads(raw)) if raw else {}


def replayed_path(task_name: str, argument: str, value: Any) -> Any:
    """``value``, or the recorded data in its place when `uncool reproduce` replays a run."""
    replacement = _replayed_inputs().get(f"{task_name}.{argument}")
    if replacement is None:
        return value
    return Path(replacement) if isinstance(value, os.PathLike) else replacement


def note_path_input(task_run_id: str | None, argument: str, path: str) -> str | None:
    """Store a stage's path argument and note it as an input of the run.

    Returns ``"<algorithm>:<object id>"``, or None outside a pipeline run.

    Called by :class:`~uncool_prefect.caching.ContentAware` while it makes the
    cache key, so the data is read once for both.
    """
    recorder = _RECORDER.get()
    if recorder is None or task_run_id is None:
        return None
    version = recorder.store.put(path).name
    recorder.note_input(task_run_id, argument, os.path.abspath(path), version)
    return f"{recorder.store.algorithm}:{version}"


def note_key(task_run_id: str | None, ingredients: dict[str, Any]) -> None:
    """What a stage's cache key was made of, kept in the run record."""
    recorder = _RECORDER.get()
    if recorder is not None and task_run_id is not None:
        recorder.note_key(task_run_id, ingredients)


def note_object_uses(task_run_id: str | None, inputs: dict[str, Any]) -> None:
    """Object ids a stage's arguments name: the edges of its lineage."""
    recorder = _RECORDER.get()
    if recorder is None or task_run_id is None:
        return
    used = sorted({oid for _, oid in _object_ids_in(inputs)})
    recorder.note_uses(task_run_id, used)
