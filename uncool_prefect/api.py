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

import contextlib
import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast, overload

from prefect import Flow, Task
from prefect.utilities.hashing import file_hash

from .caching import ContentAware
from .recording import (
    REPLAY_INPUTS_ENV,
    Recorder,
    active_recorder,
    record_state,
    replayed_path,
    start_recording,
    stop_recording,
)
from .records.run_record import project_code, snapshot_code, write_run_record
from .settings import get_settings
from .store import ObjectStore

F = TypeVar("F", bound=Callable[..., Any])
BLOCK_SLUG = "content-addressed-storage"


def get_store() -> ObjectStore:
    """The project's object store, for files and folders in stages (``put_dir``, ``get_bytes``...).

    Inside a pipeline run, the store its results go to. In a stage that runs
    elsewhere (a Dask worker, with settings of its own), the store of the
    stage's result storage, as the flow's process named it. Otherwise the one
    the ``UNCOOL_*`` settings name, through the project's block when one is saved.
    """
    from prefect.context import TaskRunContext

    from .blocks import ContentAddressedStorage

    recorder = active_recorder()
    if recorder is not None:
        return recorder.store
    context = TaskRunContext.get()
    storage = getattr(getattr(context, "task", None), "result_storage", None)
    if isinstance(storage, ContentAddressedStorage):
        return storage.store
    if isinstance(storage, str) and storage.startswith(BLOCK_SLUG + "/"):
        return _block_store(storage.removeprefix(BLOCK_SLUG + "/"))
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
def replayed_input(stage_name: str, argument: str) -> Path | None:
    """The recorded data of a stage's path argument while `uncool reproduce` re-runs a run.

    A stage's path arguments are swapped for their recorded data by itself; a
    flow that reads a path *before* handing it to a stage (to validate it,
    say) asks here, and uses the answer when there is one.
    """
    found = replayed_path(stage_name, argument, None)
    return Path(found) if found else None


def _check_storage_key() -> None:
    """A ``result_storage_key`` the store refuses fails the stage now, before it runs.

    NOTE: Prefect persists results when the task's transaction commits and only
    logs a storage error there: the run would be Completed with nothing stored.
    """
    from prefect.context import TaskRunContext
    from prefect.transactions import get_transaction

    from .store.keys import normalize_key

    context = TaskRunContext.get()
    transaction = get_transaction()
    if context is None or transaction is None or context.task.result_storage_key is None:
        return
    normalize_key(str(transaction.key), f"result_storage_key of stage {context.task.name!r}")


def _stage_body(fn: Callable[..., Any], task_name: Callable[[], str]) -> Callable[..., Any]:
    """``fn`` as a stage runs it: its storage key checked, and path arguments swapped for the
    recorded data when a reproduction asks for it."""
    signature = inspect.signature(fn)

    def swapped(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        _check_storage_key()
        if not os.environ.get(REPLAY_INPUTS_ENV):
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


class Stage(Task[Any, Any]):
    """A Prefect task whose default result storage, inside a pipeline run, is the block
    the run already loaded.

    NOTE: Prefect resolves a storage given by slug on every task run: a call to
    the server, and the first time, an import of every installed Prefect
    collection (prefect-dask and distributed among them: ~0.25 s of a no-op
    run). Outside a pipeline run, a process that loaded the block in the last
    minute (a sweep's trials, run beside the pipeline's recording) uses it too.
    Elsewhere (a Dask worker, a plain call) the slug stands.
    """

    _default_storage: str | None = None

    @property
    def result_storage(self) -> Any:
        storage = self.__dict__.get("_result_storage")
        if storage is not None and storage == self._default_storage:
            recorder = active_recorder()
            if recorder is not None and recorder.result_storage is not None:
                return recorder.result_storage
            blocks = sys.modules.get(f"{__package__}.blocks")  # never imported for this
            loaded = blocks.recently_loaded_store_block() if blocks else None
            if loaded is not None:
                return loaded
        return storage

    @result_storage.setter
    def result_storage(self, value: Any) -> None:
        self.__dict__["_result_storage"] = value

    def with_options(self, *args: Any, **kwargs: Any) -> Any:
        copy = super().with_options(*args, **kwargs)
        # NOTE: Prefect's with_options builds a plain Task; a Stage adds no state
        # of its own but the storage, so the copy becomes a Stage again (else a
        # copy, e.g. each of a sweep's trials, resolves the slug on every run).
        given = copy.__dict__.pop("result_storage", None)
        copy.__class__ = type(self)
        stage_copy = cast(Stage, copy)
        if "result_storage" in kwargs:
            stage_copy.result_storage = given
        else:  # keep the slug, not this run's block
            stage_copy.result_storage = self.__dict__.get("_result_storage")
            stage_copy._default_storage = self._default_storage
        return stage_copy


def storage_slug() -> str:
    """The result storage of stages: the project's ContentAddressedStorage block, by name."""
    return f"{BLOCK_SLUG}/{get_settings().block}"


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
        from prefect.cache_policies import CachePolicy

        options: dict[str, Any] = {
            "cache_policy": ContentAware(paths=tuple(paths)),
            "result_storage": storage_slug(),
            "persist_result": True,
            **task_options,
        }
        policy = options["cache_policy"]
        # Two runs that reach this stage with the same inputs compute it once: the
        # other waits on the key's lock in the store, then finds the result (Cached).
        if isinstance(policy, CachePolicy) and policy.isolation_level is None \
                and policy.lock_manager is None:
            from .locking import StoreLockManager

            options["cache_policy"] = policy.configure(isolation_level="SERIALIZABLE",
                                                       lock_manager=StoreLockManager())
        hooks = {"on_completion": record_state, "on_failure": record_state}
        for option, hook in hooks.items():
            options[option] = [*(options.get(option) or []), hook]
        if name:
            options["name"] = name
        made: list[Stage] = []
        task = Stage(fn=_stage_body(function, lambda: made[0].name), **options)
        task._default_storage = storage_slug()
        made.append(task)
        return task

    return decorate(fn) if fn is not None else decorate


# -- @pipeline --------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _recording(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run under a :class:`Recorder`; the run record is written when it returns or fails."""
    signature = inspect.signature(fn)
    source_file = inspect.getsourcefile(fn)

    @contextlib.contextmanager
    def recorded(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[inspect.BoundArguments]:
        from .blocks import saved_store_block

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        _fill_from_params_file(bound, source_file)
        block = saved_store_block(get_settings().block)
        store = block.store
        recorder = Recorder(store, params=_json_safe(dict(bound.arguments)), source_file=source_file,
                            snapshot_code=lambda: snapshot_code(store, *project_code(source_file)),
                            result_storage=block)
        started, token = time.time(), start_recording(recorder)
        try:
            yield bound
        except BaseException as exc:
            if recorder.stages:  # one that stopped before any stage ran has nothing to record
                write_run_record(recorder, started=started, error=exc)
            raise
        else:
            write_run_record(recorder, started=started, error=None)
        finally:
            stop_recording(token)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with recorded(args, kwargs) as bound:
                return await fn(*bound.args, **bound.kwargs)
        run_async._uncool_recording = True  # type: ignore[attr-defined]
        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with recorded(args, kwargs) as bound:
            return fn(*bound.args, **bound.kwargs)
    run._uncool_recording = True  # type: ignore[attr-defined]
    return run


def _fill_from_params_file(bound: inspect.BoundArguments, source_file: str | None) -> None:
    """Parameters left at ``None`` take their value from the project's params file.

    So a deployment, a schedule or ``python flows/pipeline.py`` runs with the
    params versioned beside the code, as ``uncool run`` does.
    """
    from .config import config_for_file
    from .params import load_params

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
