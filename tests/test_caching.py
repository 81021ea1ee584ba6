"""ContentAware: keys from data content and project code, unit tests and one real run."""

from __future__ import annotations

import copy
import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import cloudpickle
import pytest
from prefect import task
from prefect.cache_policies import INPUTS, CachePolicy, CompoundCachePolicy

from uncool_prefect import ContentAddressedStorage
from uncool_prefect.caching import CONTENT_AWARE, ContentAware, _collect, code_hash
from uncool_prefect.store import ObjectStore


@pytest.fixture
def policy(tmp_path: Path) -> ContentAware:
    return ContentAware(store=ObjectStore(tmp_path / "store", state_dir=tmp_path / "state"))


def _ctx(fn: Any) -> Any:
    """Just what the policy reads of a TaskRunContext: the task."""
    return SimpleNamespace(task=task(fn))


def _key(policy: CachePolicy, fn: Any, **inputs: Any) -> str | None:
    return policy.compute_key(_ctx(fn), inputs, {})


def _load(folder: Path, monkeypatch: pytest.MonkeyPatch, **sources: str) -> dict[str, ModuleType]:
    """Write modules into ``folder`` and import them under names unique to this call.

    ``import helpers`` in a source imports the sibling ``helpers`` written here.
    """
    tag = uuid.uuid4().hex[:8]
    folder.mkdir(parents=True)
    for name, source in sources.items():
        source = textwrap.dedent(source)
        for other in sources:
            source = source.replace(f"import {other}\n", f"import {other}_{tag} as {other}\n")
        (folder / f"{name}_{tag}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()
    return {name: importlib.import_module(f"{name}_{tag}") for name in sources}


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_data(data: Path) -> int:
    return len(str(data))


# -- data: paths count by content ---------------------------------------------

def test_same_content_at_two_paths_gives_the_same_key(tmp_path: Path, policy: ContentAware) -> None:
    files = {"a.txt": b"alpha", "sub/b.txt": b"beta"}
    one, two = _write_tree(tmp_path / "one", files), _write_tree(tmp_path / "two", files)
    assert _key(policy, read_data, data=one) == _key(policy, read_data, data=two)
    assert _key(policy, read_data, data=one / "a.txt") == _key(policy, read_data, data=two / "a.txt")
    assert _key(policy, read_data, data=one) != _key(policy, read_data, data=one / "a.txt")


def test_one_changed_byte_in_a_folder_changes_the_key(tmp_path: Path, policy: ContentAware) -> None:
    data = _write_tree(tmp_path / "data", {"a.txt": b"alpha", "deep/er/b.bin": bytes(4096)})
    hour_ago = time.time() - 3600
    for path in (data / "a.txt", data / "deep/er/b.bin"):
        os.utime(path, (hour_ago, hour_ago))  # old enough for the stat cache to keep
    before = _key(policy, read_data, data=data)
    assert _key(policy, read_data, data=data) == before  # now answered by the stat cache
    blob = bytearray((data / "deep/er/b.bin").read_bytes())
    blob[2048] = 1
    (data / "deep/er/b.bin").write_bytes(bytes(blob))
    assert _key(policy, read_data, data=data) != before


def test_str_paths_named_in_paths_count_by_content(tmp_path: Path, policy: ContentAware) -> None:
    one = _write_tree(tmp_path / "one", {"x": b"same"})
    two = _write_tree(tmp_path / "two", {"x": b"same"})
    named = ContentAware(paths="data", store=policy.store)
    assert _key(named, read_data, data=str(one)) == _key(named, read_data, data=two)
    # Not named: a str is a str, as under INPUTS.
    assert _key(policy, read_data, data=str(one)) != _key(policy, read_data, data=str(two))


def test_paths_inside_containers_count_by_content(tmp_path: Path, policy: ContentAware) -> None:
    one = _write_tree(tmp_path / "one", {"x": b"1", "y": b"2"})
    two = _write_tree(tmp_path / "two", {"x": b"1", "y": b"2"})

    def nested(root: Path) -> dict[str, Any]:
        return {"data": [root / "x", (root / "y", 3)], "by_name": {"x": root / "x"},
                "as_set": {root / "x", root / "y"}}

    assert _key(policy, read_data, **nested(one)) == _key(policy, read_data, **nested(two))
    (two / "y").write_bytes(b"3")
    assert _key(policy, read_data, **nested(one)) != _key(policy, read_data, **nested(two))


def test_a_missing_path_is_a_clear_error(tmp_path: Path, policy: ContentAware) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as info:
        _key(policy, read_data, data=[missing])
    assert str(info.value) == (
        f"cannot make the cache key of task 'read_data': argument 'data' is the path "
        f"'{missing}', which does not exist. Create it before the task runs; for a path "
        "the task writes, pass it as a str (its name goes into the key) or leave it out: "
        "ContentAware(exclude=['data'])."
    )
    # Left out, it is neither hashed nor an error; subtracting is the same as exclude=.
    excluded = ContentAware(exclude=["data"], store=policy.store)
    assert _key(excluded, read_data, data=missing) == _key(policy - "data", read_data, data=missing)


# -- code: the task and the project code it reaches ----------------------------

TASKS = """\
import helpers

def run(x):
    return helpers.outer(x)
"""
HELPERS = """\
import deep

SCALE = 2

def outer(x):
    return Scaler(SCALE).apply(x)

class Scaler:
    def __init__(self, k):
        self.k = k

    def apply(self, x):
        return deep.inner(x) * self.k

def unrelated():
    return "not called"
"""
DEEP = """\
def inner(x):
    return x + 1
"""


def _variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
             helpers: str = HELPERS, deep: str = DEEP) -> Any:
    modules = _load(tmp_path / name, monkeypatch, deep=deep, helpers=helpers, tasks=TASKS)
    return modules["tasks"].run


EDITS = [
    ("nothing", HELPERS, DEEP, False),
    ("an unrelated function", HELPERS.replace('"not called"', '"edited"'), DEEP, False),
    ("the called helper", HELPERS.replace("return Scaler", "return 0 + Scaler"), DEEP, True),
    ("a method", HELPERS.replace("* self.k", "* self.k * 1"), DEEP, True),
    ("a constant the helper reads", HELPERS.replace("SCALE = 2", "SCALE = 3"), DEEP, True),
    ("a helper of a helper", HELPERS, DEEP.replace("x + 1", "x + 2"), True),
]


@pytest.mark.parametrize(("what", "helpers", "deep", "changes"), EDITS, ids=[e[0] for e in EDITS])
def test_code_edits_change_the_key_only_where_the_task_reaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: ContentAware,
    what: str, helpers: str, deep: str, changes: bool,
) -> None:
    data = _write_tree(tmp_path / "data", {"x": b"1"})
    # The same code in another folder, under other module names: the same key.
    before = _key(policy, _variant(tmp_path, monkeypatch, "before"), data=data)
    edited = _variant(tmp_path, monkeypatch, "after", helpers=helpers, deep=deep)
    assert (_key(policy, edited, data=data) != before) is changes, what


def test_what_is_followed_and_what_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modules = _load(tmp_path / "proj", monkeypatch, deep=DEEP, helpers=HELPERS + (
        "import json\nimport prefect\nfrom json import dumps\nfrom pytest import approx\n\n"
        "def uses_libraries(x):\n    return dumps(json.loads(prefect.task(approx(x))))\n"
    ), tasks=TASKS + "\ndef run2(x):\n    return helpers.uses_libraries(x)\n")
    names = {name for name, _ in _collect(modules["tasks"].run, (str(tmp_path / "proj"),))}
    assert names == {"run", "outer", "Scaler", "SCALE", "inner"}
    # Neither the standard library nor site-packages, even under a project root.
    roots = (str(tmp_path / "proj"), os.path.dirname(json.__file__), os.path.dirname(pytest.__file__))
    names = {name for name, _ in _collect(modules["tasks"].run2, roots)}
    assert names == {"run2", "uses_libraries"}


@pytest.mark.timeout(30)
def test_cycles_do_not_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ping = "import pong\n\ndef ping(n):\n    return pong.pong(n - 1) if n else 0\n"
    pong = "import ping\n\ndef pong(n):\n    return ping.ping(n - 1) if n else 1\n"
    modules = _load(tmp_path / "cycle", monkeypatch, ping=ping, pong=pong)
    names = {name for name, _ in _collect(modules["ping"].ping, (str(tmp_path / "cycle"),))}
    assert names == {"ping", "pong"}
    assert len(code_hash(modules["ping"].ping)) == 64


def test_code_hash_is_kept_per_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fn = _load(tmp_path / "memo", monkeypatch, deep=DEEP)["deep"].inner
    first = code_hash(fn)
    # The code that runs is the code that was imported: an edit on disk is not
    # seen by the same function object (a new import is a new object).
    (tmp_path / "memo" / f"{fn.__module__}.py").write_text(DEEP.replace("x + 1", "x + 9"))
    assert code_hash(fn) == first


# -- Prefect's policy interface -----------------------------------------------

def test_configure_copies_and_pickles_keep_the_key(tmp_path: Path, policy: ContentAware) -> None:
    data = _write_tree(tmp_path / "data", {"x": b"1"})
    key = _key(policy, read_data, data=data)
    configured = policy.configure(key_storage=str(tmp_path / "keys"), isolation_level="SERIALIZABLE")
    assert isinstance(configured, ContentAware)
    assert configured.key_storage == str(tmp_path / "keys") and policy.key_storage is None
    assert configured.isolation_level == "SERIALIZABLE"
    assert configured.store is not None and configured.store.state_dir == tmp_path / "state"
    for other in (configured, copy.deepcopy(policy), pickle.loads(pickle.dumps(policy)),
                  cloudpickle.loads(cloudpickle.dumps(policy))):
        assert _key(other, read_data, data=data) == key


def test_composes_with_prefect_policies(tmp_path: Path, policy: ContentAware) -> None:
    data = _write_tree(tmp_path / "data", {"x": b"1"})
    compound = policy + INPUTS
    assert isinstance(compound, CompoundCachePolicy)
    assert _key(compound, read_data, data=data) not in (None, _key(policy, read_data, data=data))
    assert _key(CONTENT_AWARE, read_data, n=1) is not None  # settings' store, no path


def test_no_key_only_where_prefect_gives_none(policy: ContentAware) -> None:
    assert policy.compute_key(None, {}, {}) is None  # type: ignore[arg-type]
    assert policy.compute_key(_ctx(read_data), {}, {}) is not None  # code alone is a key
    assert policy.compute_key(None, {"n": 1}, {}) is not None  # type: ignore[arg-type]


# -- end to end: a real server, flows in fresh processes -----------------------

FLOW = """\
import json, sys
from pathlib import Path

from prefect import flow, task
from prefect.runtime import flow_run

import helpers
from uncool_prefect import ContentAddressedStorage
from uncool_prefect.caching import ContentAware

STORAGE = ContentAddressedStorage.load("{block}")

@task(result_storage=STORAGE, cache_policy=ContentAware(store=STORAGE.store), persist_result=True)
def summarize(data: Path) -> dict:
    return helpers.summarize([p.read_text() for p in sorted(data.iterdir())])

@flow(result_storage=STORAGE, persist_result=True)
def pipeline(data: str) -> dict:
    return {{"flow_run_id": str(flow_run.id), "summary": summarize(Path(data))}}

if __name__ == "__main__":
    print("RESULT", json.dumps(pipeline(sys.argv[1])))
"""
FLOW_HELPERS = """\
def summarize(texts):
    return {"files": len(texts), "words": count(texts)}

def count(texts):
    return sum(len(t.split()) for t in texts)
"""


def _run_flow(flow_file: Path, data: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(flow_file), str(data)], capture_output=True, text=True,
        timeout=180, cwd=flow_file.parent, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    from uncool_prefect.project.runner import task_states

    result["states"] = list(task_states(str(result["flow_run_id"])).values())
    return result


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_real_runs_recompute_on_new_data_and_new_code_only(tmp_path: Path) -> None:
    ContentAddressedStorage(basepath=str(tmp_path / "store")).save("caching-e2e", overwrite=True)
    project = tmp_path / "project"
    project.mkdir()
    flow_file = project / "flow.py"
    flow_file.write_text(FLOW.format(block="caching-e2e"))
    (project / "helpers.py").write_text(FLOW_HELPERS)
    data = _write_tree(tmp_path / "data", {"a.txt": b"one two", "b.txt": b"three"})

    runs = [_run_flow(flow_file, data), _run_flow(flow_file, data)]
    (data / "c.txt").write_text("four five six")
    runs.append(_run_flow(flow_file, data))
    (project / "helpers.py").write_text(FLOW_HELPERS.replace("len(t.split())", "len(t)"))
    runs += [_run_flow(flow_file, data), _run_flow(flow_file, data)]
    shutil.copytree(data, tmp_path / "moved")
    runs.append(_run_flow(flow_file, tmp_path / "moved"))  # same bytes, another path

    assert [r["states"] for r in runs] == [
        ["Completed"], ["Cached"], ["Completed"], ["Completed"], ["Cached"], ["Cached"],
    ]
    assert [r["summary"] for r in runs] == [
        {"files": 2, "words": 3}, {"files": 2, "words": 3}, {"files": 3, "words": 6},
        {"files": 3, "words": 25}, {"files": 3, "words": 25}, {"files": 3, "words": 25},
    ]
