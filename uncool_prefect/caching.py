"""``ContentAware``: a Prefect cache policy keyed on what a task reads and runs.

Prefect's ``INPUTS`` hashes a ``Path`` argument as its text, so new bytes under
the same name hit the old cache; ``TASK_SOURCE`` hashes the task's own lines,
not the helpers it calls. ``ContentAware`` keys a task run on:

1. the source of the task and of every function or class of the project that it
   reaches, transitively (see :func:`code_hash`);
2. its arguments, hashed as ``INPUTS`` does, except that
3. every path argument (any ``os.PathLike``, or a ``str`` named in ``paths=``)
   counts by its content id (``ObjectStore.hash_path``): the same bytes under
   another name hit the cache, changed bytes under the same name do not.

Example:
    ``@task(cache_policy=ContentAware(paths=("source",)), persist_result=True)``
    on ``def count_rows(data: Path, source: str)`` hashes both by content. It
    composes and configures as Prefect's own policies do:

    >>> from prefect.cache_policies import RUN_ID
    >>> policy = ContentAware(paths="src").configure(key_storage="/tmp/keys")
    >>> policy.paths, policy.key_storage, type(policy + RUN_ID).__name__
    (('src',), '/tmp/keys', 'CompoundCachePolicy')
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import site
import sysconfig
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import CodeType, FunctionType
from typing import Any
from weakref import WeakKeyDictionary

from prefect import Flow, Task
from prefect.cache_policies import CachePolicy, Inputs
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from .settings import get_settings
from .store import ObjectStore

# NOTE: part of every key, so that a change to how keys are made retires old keys.
_KEY_VERSION = "uncool-content-aware/2"
_CONSTANTS = (type(None), bool, int, float, complex, str, bytes)
_MEMO: WeakKeyDictionary[Callable[..., Any], dict[tuple[str, ...], str]] = WeakKeyDictionary()
_MEMO_LOCK = threading.Lock()


@dataclass
class ContentAware(CachePolicy):
    """Cache key = project code reached by the task + arguments, paths by content.

    Args:
        paths: names of arguments that are paths even when given as ``str``.
        project_roots: folders whose code is followed besides the folder of the
            task's module (e.g. the repository root, for code in a package).
        store: the store whose stat cache and hash algorithm hash path
            arguments; default: the one ``UNCOOL_*`` settings name.
        exclude: arguments left out of the key, as in Prefect's ``Inputs``.
    """

    paths: Sequence[str] = ()
    project_roots: Sequence[str | os.PathLike[str]] = ()
    store: ObjectStore | None = None
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        self.project_roots = tuple(os.path.realpath(os.fspath(r)) for r in self.project_roots)
        self.exclude = list(self.exclude)

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        """The key of one task run; ``None`` (no caching) only with no task and no inputs.

        Raises:
            ValueError: a path argument names nothing on disk.
        """
        return self.key_with_ingredients(task_ctx, inputs, flow_parameters)[0]

    def key_with_ingredients(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                             flow_parameters: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """The key and what it was made of (:func:`key_ingredients`), noted for the run record.

        Raises:
            ValueError: a path argument names nothing on disk.
        """
        from .recording import note_key, note_object_uses, note_path_input, replayed_path

        code_key = code_hash(task_ctx.task.fn, self.project_roots) if task_ctx else None
        task_name = task_ctx.task.name if task_ctx else "?"
        task_run = getattr(task_ctx, "task_run", None)  # a key can be asked for outside a run
        run_id = str(task_run.id) if task_run is not None else None

        def content_id(path: str, name: str) -> str:
            # In a @pipeline run the path is stored as it is hashed, and noted
            # as an input of the run: the data is read once for both.
            noted = note_path_input(run_id, name, path)
            if noted is not None:
                return noted
            hashing = self._store()
            return f"{hashing.algorithm}:{hashing.hash_path(path)}"

        data = {
            name: value if name in self.exclude
            else _by_content(replayed_path(task_name, name, value), name, name in self.paths,
                             task_name, content_id)
            for name, value in (inputs or {}).items()
        }
        note_object_uses(run_id, inputs or {})
        # NOTE: Prefect's own Inputs does the hashing, so unhashable arguments,
        # DataFrames and empty inputs behave exactly as they do under INPUTS.
        inputs_key = Inputs(exclude=self.exclude).compute_key(task_ctx, data, flow_parameters)
        key = None if code_key is None and inputs_key is None else hash_objects(
            _KEY_VERSION, code_key, inputs_key, raise_on_failure=True)
        ingredients = key_ingredients(key, code_key, data, self.exclude)
        note_key(run_id, ingredients)
        return key, ingredients

    def __sub__(self, other: str) -> CachePolicy:
        """``policy - "name"`` leaves an argument out of the key, as with ``INPUTS``."""
        if not isinstance(other, str):
            raise TypeError("Can only subtract strings from key policies.")
        return replace(self, exclude=[*self.exclude, other])

    def _store(self) -> ObjectStore:
        if self.store is not None:
            return self.store
        settings = get_settings()
        state_dir = str(settings.state_dir) if settings.state_dir else None
        return _settings_store(settings.store_url, settings.algorithm, state_dir)

    # NOTE: a store holds per-thread SQLite connections, which neither deepcopy
    # (configure) nor pickle (Dask ships tasks and their policy to workers) can
    # copy. Hashing needs only its algorithm and machine-local stat cache, so a
    # copy reopens the store by URL; it never reads or writes objects there.
    def __getstate__(self) -> dict[str, Any]:
        store = self.store
        spec = None if store is None else (store.url, store.algorithm, str(store.state_dir))
        return {**self.__dict__, "store": spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if state["store"] is not None:
            self.store = _settings_store(*state["store"])


def key_ingredients(key: str | None, code_key: str | None, data: dict[str, Any],
                    exclude: Iterable[str] = ()) -> dict[str, Any]:
    """What a cache key was made of, per part, so that a changed key can say why.

    ``args`` maps each argument to the content id of the path it named
    (``content:<algorithm>:<id>``) or a short hash of its value; ``uncool
    status`` compares them with the last run's.
    """
    args: dict[str, str | None] = {}
    for name, value in data.items():
        if name in exclude:
            continue
        if isinstance(value, str) and value.startswith("content:"):
            args[name] = value
        else:
            digest = hash_objects(value)  # None where unhashable: "cannot tell" later
            args[name] = digest[:16] if digest else None
    return {"key": key, "code": code_key, "args": args}


CONTENT_AWARE = ContentAware()
"""Ready to use: ``@task(cache_policy=CONTENT_AWARE)``."""


@functools.lru_cache(maxsize=16)
def _settings_store(url: str, algorithm: str, state_dir: str | None) -> ObjectStore:
    # One store per configuration: each opens its own SQLite stat cache.
    return ObjectStore(url, algorithm=algorithm, state_dir=state_dir)


def _by_content(value: Any, name: str, as_path: bool, task_name: str,
                content_id: Callable[[str, str], str]) -> Any:
    """``value`` with every path in it replaced by the content id of what it names."""
    if isinstance(value, os.PathLike) or (as_path and isinstance(value, str)):
        path = os.fspath(value)
        if not os.path.exists(path):
            raise ValueError(
                f"cannot make the cache key of task {task_name!r}: argument {name!r} is the "
                f"path {str(path)!r}, which does not exist. Create it before the task runs; "
                f"for a path the task writes, pass it as a str (its name goes into the key) "
                f"or leave it out: ContentAware(exclude=[{name!r}])."
            )
        return f"content:{content_id(path, name)}"
    recurse = functools.partial(_by_content, name=name, as_path=as_path,
                                task_name=task_name, content_id=content_id)
    if type(value) in (list, tuple):
        return type(value)(recurse(v) for v in value)
    if type(value) is dict:
        return {k: recurse(v) for k, v in value.items()}
    if type(value) in (set, frozenset):
        # NOTE: set order follows hash randomization; sorted, the key is stable.
        return sorted((recurse(v) for v in value), key=repr)
    return value


def code_hash(fn: Callable[..., Any], project_roots: Iterable[str | os.PathLike[str]] = ()) -> str:
    """Hash of the source of ``fn`` and of all project code it reaches, transitively.

    From ``fn``, every name its code uses (globals, closure variables, attributes
    of project modules, as in ``helpers.clean(...)``) is resolved; a function or
    class defined in a file under a project root (the folder of ``fn``'s module
    and ``project_roots``) is hashed by its source and followed in turn, as are
    plain constants (numbers, strings) those functions read. The standard
    library and site-packages are never followed. Kept per function object.
    """
    fn = _unwrap(fn)
    if not (inspect.isfunction(fn) or inspect.isclass(fn)):
        fn = type(fn)  # a callable object: its class holds the code, as in TASK_SOURCE
    extra = tuple(sorted({os.path.realpath(os.fspath(r)) for r in project_roots}))
    with _MEMO_LOCK:
        known = _MEMO.setdefault(fn, {})
        if extra in known:
            return known[extra]
    own = _file_of(fn)
    roots = (*extra, os.path.dirname(own)) if own else extra
    pairs = sorted(_collect(fn, roots))
    with _MEMO_LOCK:
        known[extra] = hashlib.sha256(json.dumps(pairs).encode("utf-8")).hexdigest()
    return known[extra]


def _collect(start: Any, roots: tuple[str, ...]) -> set[tuple[str, str]]:
    """``(name, source or repr)`` of ``start`` and every project object it reaches."""
    found: set[tuple[str, str]] = set()
    seen: dict[int, Any] = {}  # NOTE: holds the objects so their ids stay unique
    todo = [start]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        if obj is not start and not _in_project(obj, roots):
            continue
        found.add((getattr(obj, "__qualname__", repr(obj)), _source(obj)))
        if inspect.isclass(obj):
            todo.extend(obj.__mro__[1:])
        for fn in _functions_of(obj):
            for name, value in _referenced(fn, roots):
                value = _unwrap(value)
                if _is_constant(value):
                    found.add((name, repr(value)))
                elif inspect.isfunction(value) or inspect.isclass(value):
                    todo.append(value)
                elif not inspect.ismodule(value):
                    todo.append(type(value))  # an instance of a project class
    return found


def _referenced(fn: FunctionType, roots: tuple[str, ...]) -> list[tuple[str, Any]]:
    """The ``(name, value)`` pairs that names in ``fn``'s code resolve to."""
    names = sorted(_names(fn.__code__))
    pairs = [(n, fn.__globals__[n]) for n in names if n in fn.__globals__]
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        try:
            pairs.append((name, cell.cell_contents))
        except ValueError:  # a cell not yet assigned
            continue
    # ``helpers.clean(x)`` puts both names in co_names: look every name up in
    # each project module reached (a superset of what runs; never fewer).
    modules = [v for _, v in pairs if inspect.ismodule(v) and _in_project(v, roots)]
    for module in modules:  # grows while looping: ``pkg.sub.fn``
        for name in names:
            value = vars(module).get(name)
            if value is None:
                continue
            pairs.append((name, value))
            if inspect.ismodule(value) and _in_project(value, roots) and value not in modules:
                modules.append(value)
    return pairs


def _names(code: CodeType) -> set[str]:
    """Global and attribute names used by ``code`` and the code nested in it."""
    nested = (_names(c) for c in code.co_consts if isinstance(c, CodeType))
    return set(code.co_names).union(*nested)


def _functions_of(obj: Any) -> Iterator[FunctionType]:
    """The functions whose code runs as ``obj``: itself, or a class's methods."""
    if inspect.isfunction(obj):
        yield obj
    elif inspect.isclass(obj):
        for member in vars(obj).values():
            if isinstance(member, property):
                yield from (f for f in (member.fget, member.fset, member.fdel) if inspect.isfunction(f))
            elif inspect.isfunction(member := _unwrap(member)):
                yield member


def _unwrap(obj: Any) -> Any:
    """The plain function behind a Prefect task or flow, a method or a decorator."""
    if isinstance(obj, Task | Flow):
        obj = obj.fn
    if isinstance(obj, functools.partial):
        obj = obj.func
    if isinstance(obj, staticmethod | classmethod) or inspect.ismethod(obj):
        obj = obj.__func__
    if not callable(obj) or inspect.isclass(obj):
        return obj
    try:  # functools.wraps and functools.cache wrappers name what they wrap
        return inspect.unwrap(obj)
    except ValueError:  # a cycle of __wrapped__
        return obj


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        # NOTE: no source file (exec'd code, a frozen app): the bytecode still
        # changes whenever the code does.
        return repr([_fingerprint(fn.__code__) for fn in _functions_of(obj)])


def _fingerprint(code: CodeType) -> tuple[Any, ...]:
    """Bytecode, names and constants of ``code``, without file names or lines."""
    consts = tuple(_fingerprint(c) if isinstance(c, CodeType)  # frozensets: order is per process
                   else repr(sorted(c, key=repr) if isinstance(c, frozenset) else c)
                   for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, consts)


def _is_constant(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_is_constant(v) for v in value)
    return isinstance(value, _CONSTANTS)


def _file_of(obj: Any) -> str | None:
    try:
        path = inspect.getfile(obj)
    except TypeError:  # builtins, and modules or classes without a file
        return None
    return None if path.startswith("<") else _realpath(path)


def _in_project(obj: Any, roots: tuple[str, ...]) -> bool:
    """Defined in a file under a root, and not in the standard library or site-packages."""
    path = _file_of(obj)
    if path is None or {"site-packages", "dist-packages"} & set(path.split(os.sep)):
        return False
    if any(path.startswith(lib + os.sep) for lib in _library_dirs()):
        return False
    return any(path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


# NOTE: every name a function uses is checked against the roots; resolving the
# same few files' symlinks again each time would be most of the work.
_realpath = functools.lru_cache(maxsize=4096)(os.path.realpath)


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.update(site.getsitepackages())
    return tuple(sorted(os.path.realpath(d) for d in dirs))
