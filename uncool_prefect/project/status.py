"""``uncool status``: which stages the next ``uncool run`` would re-run, and why, without running them.

Like ``dvc status``, but from the same cache keys Prefect uses: the pipeline
function's body runs in this process, with no flow run and no server, and
every task call is answered by a lookup instead of a run. A stage's key is
made exactly as :class:`~uncool_prefect.caching.ContentAware` makes it for
the run (its code, its arguments, the content of its path arguments); if the
store holds a result under that key the stage is ``cached`` and its stored
result is handed to the body, so the next stage's key can be made too. If not,
the stage ``runs``, and every stage that takes its result ``depends``: it runs
unless the re-run gives the same result as before (then it stays Cached).

Why a stage runs comes from the last run record of the pipeline, which keeps
what each stage's key was made of: its code, each argument's hash, each path
argument's content id.

What runs for real here is the pipeline function's own body (reading the
params, checking the data...), never a stage or task.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ..config import ProjectConfig
from ..params import flatten
from ..store import ObjectStore, StoreError


class _NotYet:
    """A value the body cannot have yet: the result of a stage that would run.

    Anything taken from it (an item, an attribute) is not there yet either, so
    the body goes on and the stages given such a value are known to run.
    """

    def __init__(self, origin: str) -> None:
        self._origin = origin

    def __getitem__(self, _key: Any) -> _NotYet:
        return self

    def __getattr__(self, name: str) -> _NotYet:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __repr__(self) -> str:
        return f"<result of {self._origin}, not computed>"


def _not_yet_in(value: Any) -> list[str]:
    """The stages whose results a value waits for."""
    if isinstance(value, _NotYet):
        return [value._origin]
    if isinstance(value, dict):
        return [o for item in value.values() for o in _not_yet_in(item)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [o for item in value for o in _not_yet_in(item)]
    return []


@dataclass
class StageStatus:
    name: str
    # "cached"; "runs" (its own key changed); "depends": it takes the result of a
    # stage that re-runs, and runs only if that result comes out different.
    state: str
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.name, "state": self.state, "reasons": self.reasons}


@dataclass
class PipelineStatus:
    flow_name: str
    stages: list[StageStatus]
    params_changed: list[str]
    last_run: str | None
    stopped: str | None = None  # the body could not go on (what it raised)

    @property
    def up_to_date(self) -> bool:
        return bool(self.stages) and all(s.state == "cached" for s in self.stages) \
            and self.stopped is None

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.flow_name, "up_to_date": self.up_to_date,
                "last_run": self.last_run, "params_changed": self.params_changed,
                "stages": [s.as_dict() for s in self.stages], "stopped": self.stopped}


class _Probe:
    """Answers the body's task calls with cache lookups, and keeps what it found."""

    def __init__(self, store: ObjectStore, last: dict[str, Any] | None) -> None:
        self.store = store
        self.last_stages: dict[str, Any] = (last or {}).get("stages", {})
        self.found: list[StageStatus] = []
        self._calls: dict[str, int] = {}

    def _entry_name(self, task_name: str) -> str:
        """The name the run record gives this call: ``name``, then ``name[2]``... (see finish)."""
        self._calls[task_name] = self._calls.get(task_name, 0) + 1
        count = self._calls[task_name]
        return task_name if count == 1 else f"{task_name}[{count}]"

    def finish(self) -> None:
        """A task called more than once is ``name[1]``, ``name[2]``... as in the run record."""
        for found in self.found:
            if self._calls.get(found.name, 0) > 1:
                found.name = f"{found.name}[1]"

    def _last(self, name: str) -> dict[str, Any]:
        return dict(self.last_stages.get(name) or self.last_stages.get(f"{name}[1]") or {})

    def call(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        from prefect.utilities.callables import get_call_parameters

        from ..caching import ContentAware

        name = self._entry_name(task.name)
        parameters = get_call_parameters(task.fn, args, kwargs)
        waits = sorted(set(_not_yet_in(parameters)))
        if waits:
            one = len(waits) == 1
            return self._runs(name, [f"runs if the result of {', '.join(waits)} changes "
                                     f"({'it re-runs' if one else 'they re-run'})"], state="depends")
        policy = task.cache_policy
        if policy is None or not hasattr(policy, "compute_key"):
            return self._runs(name, ["not cached (a task without a cache policy runs every time)"])
        if not _results_in_this_store(task):
            return self._runs(name, ["not predicted: its results are not kept in the project's "
                                     "store (status predicts @stage tasks)"])
        context = SimpleNamespace(task=task, task_run=None, parameters=parameters)
        try:
            if isinstance(policy, ContentAware):  # the key, and what it is made of for "why"
                key, ingredients = policy.key_with_ingredients(context, parameters, {})  # type: ignore[arg-type]
            else:
                key, ingredients = policy.compute_key(task_ctx=context, inputs=parameters,
                                                      flow_parameters={}), None
        except Exception as exc:  # noqa: BLE001 - shown as the reason
            return self._runs(name, [f"not predicted: its cache key cannot be made outside a run "
                                     f"({type(exc).__name__}: {exc})"])
        if key is None:
            return self._runs(name, ["not cached (its cache policy gives no key)"])
        found, why = self._stored_result(str(key))
        if found is not None:
            self.found.append(StageStatus(name, "cached"))
            return found[0]
        return self._runs(name, self._why(name, ingredients) or [why])

    def _runs(self, name: str, reasons: list[str], state: str = "runs") -> _NotYet:
        self.found.append(StageStatus(name, state, reasons))
        return _NotYet(name)

    def _stored_result(self, key: str) -> tuple[tuple[Any] | None, str]:
        """``((value,), "")`` if the store holds a readable, unexpired result under ``key``."""
        from prefect.results import ResultRecord
        from prefect.types._datetime import now

        from ..store.keys import normalize_key

        try:
            document = self.store.get_ref(normalize_key(key, "result key"))
        except FileNotFoundError:
            return None, "no stored result for its key"
        except StoreError as exc:
            return None, f"its stored result is unreadable ({exc})"
        try:
            data = self.store.get_bytes(document["oid"])
            if "record_metadata" in document:
                data = json.dumps({"metadata": document["record_metadata"],
                                   "result": data.decode("utf-8")}).encode("utf-8")
            record: ResultRecord[Any] = ResultRecord.deserialize(data)
            expiration = record.metadata.expiration
            if expiration is not None and expiration < now("UTC"):
                return None, "its cached result expired"
            return (record.result,), ""
        except (OSError, StoreError, ValueError) as exc:
            return None, f"its stored result is missing or damaged ({exc}); the run heals it"

    def _why(self, name: str, now_parts: dict[str, Any] | None) -> list[str]:
        """What differs from the last run's key of this stage (``now_parts``: this key's
        ingredients; None for a policy that keeps none)."""
        last = self._last(name)
        before = last.get("key")
        if not before:
            if last:  # recorded by a version that kept no key details
                return ["its key differs from the last run's (that record has no details)"]
            return ["not in the last run" if self.last_stages else "never ran"]
        if now_parts is None:
            return []
        reasons = []
        if now_parts["code"] != before.get("code"):
            reasons.append("code changed")
        old_args: dict[str, Any] = before.get("args") or {}
        for arg, digest in now_parts["args"].items():
            if arg not in old_args:
                reasons.append(f"new argument {arg}")
            elif digest != old_args[arg]:
                if str(digest).startswith("content:"):
                    old = str(old_args[arg]).rsplit(":", 1)[-1][:12]
                    reasons.append(f"input {arg} changed ({old} -> {str(digest).rsplit(':', 1)[-1][:12]})")
                else:
                    reasons.append(f"argument {arg} changed")
        reasons += [f"argument {arg} removed" for arg in old_args if arg not in now_parts["args"]]
        return reasons


def _results_in_this_store(task: Any) -> bool:
    """A ``@stage`` whose results go to the project's block (its default), as the run's would."""
    from ..api import Stage

    storage = task.__dict__.get("_result_storage")
    return isinstance(task, Stage) and storage is not None and storage == task._default_storage


@contextlib.contextmanager
def _answering_calls(probe: _Probe) -> Iterator[None]:
    """Task calls (``task()``, ``.submit``) go to the probe; a subflow or ``.map`` is not run."""
    from prefect import Flow, Task

    saved = Task.__call__, Task.submit, Task.map, Flow.__call__

    def call(self: Any, *args: Any, return_state: bool = False, wait_for: Any = None,
             **kwargs: Any) -> Any:
        value = probe.call(self, args, kwargs)
        if inspect.iscoroutinefunction(self.fn):
            async def done() -> Any:
                return value
            return done()
        return value

    def submit(self: Any, *args: Any, wait_for: Any = None, **kwargs: Any) -> Any:
        value = probe.call(self, args, kwargs)
        return SimpleNamespace(result=lambda *a, **k: value, wait=lambda *a, **k: None)

    def not_predicted(what: str) -> Any:
        def answer(self: Any, *args: Any, **kwargs: Any) -> Any:
            return probe._runs(self.name, [f"not predicted: status does not look into {what}"])
        return answer

    Task.__call__, Task.submit = call, submit  # type: ignore[method-assign,assignment]
    Task.map = not_predicted("mapped tasks")  # type: ignore[method-assign]
    Flow.__call__ = not_predicted("subflows")  # type: ignore[method-assign]
    try:
        yield
    finally:
        Task.__call__, Task.submit, Task.map, Flow.__call__ = saved  # type: ignore[method-assign,assignment]


def last_run_record(store: ObjectStore, flow_name: str) -> dict[str, Any] | None:
    """The newest run record of ``flow_name`` (one listing; records read newest first)."""
    from ..store.objects import RUNS_DIR

    listed = sorted(store.backend.list(RUNS_DIR), key=lambda item: item[1].mtime, reverse=True)
    for rel, _ in listed:
        try:
            record: dict[str, Any] = json.loads(store.backend.read_bytes(rel))
        except (FileNotFoundError, ValueError):
            continue
        if record.get("flow_name") == flow_name:
            return dict(record)
    return None


def pipeline_status(config: ProjectConfig, params: dict[str, Any]) -> PipelineStatus:
    """What the next ``uncool run`` with ``params`` would re-run, and why."""
    from ..api import _fill_from_params_file, _json_safe
    from ..recording import Recorder, start_recording, stop_recording
    from ..settings import open_store
    from .runner import check_parameters, load_flow

    flow = load_flow(config)
    check_parameters(flow, params, config.params_file)
    function = getattr(flow.fn, "__wrapped__", flow.fn) if getattr(
        flow.fn, "_uncool_recording", False) else flow.fn
    bound = inspect.signature(function).bind(**params)
    bound.apply_defaults()
    _fill_from_params_file(bound, inspect.getsourcefile(function))
    store = open_store()
    last = last_run_record(store, flow.name)
    probe = _Probe(store, last)
    stopped = None
    token = start_recording(Recorder(store, params=_json_safe(dict(bound.arguments))))
    try:
        with _answering_calls(probe):
            result = function(*bound.args, **bound.kwargs)
            if inspect.iscoroutine(result):
                asyncio.run(result)
    except Exception as exc:  # noqa: BLE001 - what stopped the body is part of the answer
        stopped = f"{type(exc).__name__}: {exc}"
    finally:
        stop_recording(token)
    probe.finish()
    seen = {s.name for s in probe.found}
    for name in (last or {}).get("stages", {}):
        if name not in seen and stopped is not None:
            probe.found.append(StageStatus(name, "runs", ["not reached: the pipeline stopped"]))
    changed = _params_changed((last or {}).get("params") or {}, _json_safe(dict(bound.arguments)))
    return PipelineStatus(flow.name, probe.found, changed,
                          (last or {}).get("flow_run_id"), stopped)


def _params_changed(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    old, new = dict(flatten(before)), dict(flatten(now))
    lines = [f"{key}: {old.get(key, '(none)')} -> {new.get(key, '(none)')}"
             for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return lines

