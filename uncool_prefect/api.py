"""``@stage`` and ``@pipeline``: Prefect tasks and flows that version and record what they do.

A ``@stage`` is a plain :class:`prefect.Task` with three defaults: the
:class:`~uncool_prefect.caching.ContentAware` cache policy (code, arguments,
and the *content* of path arguments), results persisted to the project's
:class:`~uncool_prefect.blocks.ContentAddressedStorage` block, and
``persist_result=True``. A ``@pipeline`` is a plain :class:`prefect.Flow`
whose every run writes a run record, ``runs/<flow-run-id>.json``, into that
store (see :mod:`uncool_prefect.records.run_record`).

Example:
    A two-stage pipeline over a folder; run it twice and the second run is
    all ``Cached``:

    ```python
    from pathlib import Path
    from uncool_prefect import pipeline, stage

    @stage
    def count_files(folder: Path) -> int:      # hashed by content, stored as an input
        return sum(1 for p in folder.rglob("*") if p.is_file())

    @stage(name="report", retries=1)           # any @task option passes through
    def report(n: int) -> str:
        return f"{n} files"

    @pipeline
    def survey(folder: str = "data") -> str:
        return report(count_files(Path(folder)))
    ```

Everything ``@task`` and ``@flow`` accept passes through; the results are
still a Task and a Flow (``.submit``, ``.map``, ``.serve``, ``.deploy``,
``from_source`` and prefect.yaml work as with any other).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

from prefect import Flow, Task
from prefect.utilities.hashing import file_hash

from .caching import ContentAware
from .settings import get_settings
from .store import InvalidKeyError, ObjectStore, parse_oid

F = TypeVar("F", bound=Callable[..., Any])

# NOTE: set by the environment of `uncool reproduce`: {"<stage>.<argument>": local path}.
# A stage's path argument is replaced by the recorded data, materialized from the store.
REPLAY_INPUTS_ENV = "UNCOOL_REPLAY_INPUTS"

_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "uncool_pipeline_recorder", default=None)


# -- what a pipeline run collects ---------------------------------------------
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
    error: str | None = None


@dataclass
class Recorder:
    """What one pipeline run collects while it runs: stages, inputs, registered models."""

    store: ObjectStore
    params: dict[str, Any] = field(default_factory=dict)
    source_file: str | None = None
    stages: dict[str, StageRun] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    _inputs: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    _uses: dict[str, list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def note_input(self, task_run_id: str, argument: str, url: str, version: str) -> None:
        with self._lock:
            self._inputs.setdefault(task_run_id, {})[argument] = {"url": url, "version": version}

    def note_uses(self, task_run_id: str, object_ids: list[str]) -> None:
        with self._lock:
            self._uses[task_run_id] = object_ids

    def note_model(self, registration: dict[str, Any]) -> None:
        with self._lock:
            if not any(m.get("name") == registration.get("name")
                       and m.get("version") == registration.get("version") for m in self.models):
                self.models.append(registration)

    @functools.cached_property
    def params_hash(self) -> str:
        from .project.params import params_hash

        return params_hash(self.params)

    @functools.cached_property
    def code(self) -> dict[str, Any]:
        """The code snapshot of the run (taken once, when first needed)."""
        from .records.run_record import project_code, snapshot_code

        return snapshot_code(self.store, *project_code(self.source_file))

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

    def note_state(self, task: Task[Any, Any], task_run: Any, state: Any) -> None:
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
        with self._lock:
            self.stages[run_id] = StageRun(
                task=task.name, task_run_id=run_id, state=str(state.name), started=started,
                result=result_oid, outputs=self._outputs(value),
                inputs=self._inputs.get(run_id, {}), uses=self._uses.get(run_id, []),
                error=error,
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
    """Model registrations (what ``register_model`` returns) inside a stage's return value."""
    from .tracking import Registration

    if isinstance(value, Registration):
        yield value.as_record()
    elif isinstance(value, dict):
        for item in value.values():
            yield from _registrations_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _registrations_in(item)


def active_recorder() -> Recorder | None:
    """The recorder of the pipeline run this code runs in, if any."""
    return _RECORDER.get()


def get_store() -> ObjectStore:
    """The project's object store, for files and folders in stages (``put_dir``, ``get_bytes``...).

    Inside a pipeline run, the store its results go to; elsewhere, the one the
    ``UNCOOL_*`` settings name, through the project's block when one is saved.
    """
    recorder = _RECORDER.get()
    if recorder is not None:
        return recorder.store
    return _block_store(get_settings().block)


@functools.lru_cache(maxsize=4)
def _block_store(block_name: str) -> ObjectStore:
    from prefect.exceptions import ObjectNotFound

    from .blocks import ContentAddressedStorage
    from .settings import open_store

    try:
        block: Any = ContentAddressedStorage.load(block_name)
    except (ValueError, ObjectNotFound):
        return open_store()
    return block.store


# -- @stage ---------------------------------------------------------------------
def _record_state(task: Task[Any, Any], task_run: Any, state: Any) -> None:
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


def replayed_input(stage_name: str, argument: str) -> Path | None:
    """The recorded data of a stage's path argument while `uncool reproduce` re-runs a run.

    A stage's path arguments are swapped for their recorded data by itself; a
    flow that reads a path *before* handing it to a stage (to validate it,
    say) asks here, and uses the answer when there is one.
    """
    found = _replayed_inputs().get(f"{stage_name}.{argument}")
    return Path(found) if found else None


def _replaying(fn: Callable[..., Any], task_name: Callable[[], str]) -> Callable[..., Any]:
    """``fn``, with path arguments swapped for replayed data when a reproduction asks for it."""
    signature = inspect.signature(fn)

    def swapped(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not _replayed_inputs():
            return args, kwargs
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            bound.arguments[name] = replayed_path(task_name(), name, value)
        return bound.args, bound.kwargs

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = swapped(args, kwargs)
            return await fn(*args, **kwargs)
        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = swapped(args, kwargs)
        return fn(*args, **kwargs)
    return run


def storage_slug() -> str:
    """The result storage of stages: the project's ContentAddressedStorage block, by name."""
    return f"content-addressed-storage/{get_settings().block}"


@overload
def stage(fn: F, /) -> Task[Any, Any]: ...
@overload
def stage(*, name: str | None = None, paths: tuple[str, ...] | list[str] = (),
          **task_options: Any) -> Callable[[F], Task[Any, Any]]: ...


def stage(fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
          paths: tuple[str, ...] | list[str] = (), **task_options: Any) -> Any:
    """A pipeline stage: a Prefect task that is cached by content and stored by hash.

    Args:
        fn: The function (``@stage`` without parentheses).
        name: The task name, which the run record and ``uncool run`` show
            (default: the function's name, as with ``@task``).
        paths: Names of ``str`` arguments that are paths to hash by content,
            as ``os.PathLike`` arguments always are.
        **task_options: Anything ``@task`` accepts (``retries``,
            ``cache_policy``, ``result_storage``, ``tags``...), overriding the
            defaults: ``ContentAware(paths=paths)``, the project's block,
            ``persist_result=True``.

    Returns:
        A ``prefect.Task``.
    """
    def decorate(function: Callable[..., Any]) -> Task[Any, Any]:
        options: dict[str, Any] = {
            "cache_policy": ContentAware(paths=tuple(paths)),
            "result_storage": storage_slug(),
            "persist_result": True,
            **task_options,
        }
        hooks = {"on_completion": _record_state, "on_failure": _record_state}
        for option, hook in hooks.items():
            options[option] = [*(options.get(option) or []), hook]
        if name:
            options["name"] = name
        made: list[Task[Any, Any]] = []
        task = Task(fn=_replaying(function, lambda: made[0].name), **options)
        made.append(task)
        return task

    return decorate(fn) if fn is not None else decorate


# -- @pipeline --------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _recording(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run under a :class:`Recorder`; the run record is written when it returns or fails."""
    from .records.run_record import write_run_record

    signature = inspect.signature(fn)
    source_file = inspect.getsourcefile(fn)

    def start(args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[inspect.BoundArguments, Recorder, contextvars.Token[Recorder | None], float]:
        from .blocks import ensure_store_block

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        _fill_from_params_file(bound, source_file)
        store = ensure_store_block(get_settings().block)
        recorder = Recorder(store, params=_json_safe(dict(bound.arguments)), source_file=source_file)
        return bound, recorder, _RECORDER.set(recorder), time.time()

    def finish(bound: inspect.BoundArguments, recorder: Recorder, started: float,
               failed: BaseException | None) -> None:
        if failed is not None and not recorder.stages:
            return  # it stopped before any stage ran: nothing to record
        write_run_record(recorder, started=started, error=failed)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            bound, recorder, token, started = start(args, kwargs)
            try:
                result = await fn(*bound.args, **bound.kwargs)
            except BaseException as exc:
                finish(bound, recorder, started, exc)
                raise
            finally:
                _RECORDER.reset(token)
            finish(bound, recorder, started, None)
            return result
        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound, recorder, token, started = start(args, kwargs)
        try:
            result = fn(*bound.args, **bound.kwargs)
        except BaseException as exc:
            finish(bound, recorder, started, exc)
            raise
        finally:
            _RECORDER.reset(token)
        finish(bound, recorder, started, None)
        return result
    return run


def _fill_from_params_file(bound: inspect.BoundArguments, source_file: str | None) -> None:
    """Parameters left at ``None`` take their value from the project's params file.

    So a deployment, a schedule or ``python flows/pipeline.py`` runs with the
    params versioned beside the code, as ``uncool run`` does.
    """
    from .project.config import config_for_file
    from .project.params import load_params

    missing = [name for name, value in bound.arguments.items() if value is None]
    if not missing or source_file is None:
        return
    config = config_for_file(source_file)
    if config is None or config.params_file is None:
        return
    document = load_params(config.params_file)
    for name in missing:
        if name in document:
            bound.arguments[name] = document[name]


@overload
def pipeline(fn: F, /) -> Flow[Any, Any]: ...
@overload
def pipeline(**flow_options: Any) -> Callable[[F], Flow[Any, Any]]: ...


def pipeline(fn: Callable[..., Any] | None = None, /, **flow_options: Any) -> Any:
    """A pipeline: a Prefect flow whose every run writes a run record into the store.

    The record (``runs/<flow-run-id>.json``) holds the flow's parameters and
    their hash, a snapshot of the project's code, the environment, every path
    input of its stages with its data version, each task run's state and the
    object ids it produced (in call order), the models it registered, and what
    started the run. ``uncool exp show``, ``lineage``, ``checkout`` and
    ``reproduce`` read it. Parameters left at ``None`` take their value from
    the project's params file (``[tool.uncool] params``).

    Args:
        fn: The function (``@pipeline`` without parentheses).
        **flow_options: Anything ``@flow`` accepts (``name``, ``log_prints``,
            ``task_runner``, ``retries``...).

    Returns:
        A ``prefect.Flow``.
    """
    def decorate(function: Callable[..., Any]) -> Flow[Any, Any]:
        options = dict(flow_options)
        source = inspect.getsourcefile(function)
        # NOTE: Prefect versions a flow by the file of its function; that is
        # the wrapper's file here, so name the user's file instead.
        if not options.get("version") and source and os.path.exists(source):
            options["version"] = file_hash(source)
        flow = Flow(fn=_recording(function), **options)
        flow._entrypoint = f"{function.__module__}:{function.__qualname__}"
        return flow

    return decorate(fn) if fn is not None else decorate


def note_path_input(task_name: str, task_run_id: str | None, argument: str, path: str) -> str | None:
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


def note_object_uses(task_run_id: str | None, inputs: dict[str, Any]) -> None:
    """Object ids a stage's arguments name: the edges of its lineage."""
    recorder = _RECORDER.get()
    if recorder is None or task_run_id is None:
        return
    used = sorted({oid for _, oid in _object_ids_in(inputs)})
    recorder.note_uses(task_run_id, used)
