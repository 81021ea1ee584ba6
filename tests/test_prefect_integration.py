"""The block inside real Prefect: a real server, flows in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from uncool_prefect import ContentAddressedStorage
from uncool_prefect.project.runner import task_states

pytestmark = pytest.mark.usefixtures("prefect_server")

PREFECT = str(Path(sys.executable).with_name("prefect"))

FLOW_SOURCE = '''
import json, sys
from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run

STORAGE = "content-addressed-storage/{block}"
POLICY = INPUTS + TASK_SOURCE
{configure}

@task(result_storage=STORAGE, cache_policy=POLICY, persist_result=True)
def featurize(n: int) -> list[int]:
    return [i * i for i in range(n)]

@task(result_storage=STORAGE, cache_policy=POLICY, persist_result=True)
def total(values: list[int]) -> int:
    return sum(values)

@task(result_storage=STORAGE, cache_policy=POLICY, persist_result=True)
def total_again(values: list[int]) -> int:
    return sum(values)

@flow(result_storage=STORAGE, persist_result=True)
def pipeline(n: int = 1000) -> int:
    values = featurize(n)
    a = total(values)
    b = total_again(values)
    assert a == b
    return a

if __name__ == "__main__":
    result = pipeline()
    print("RESULT", json.dumps({{"flow_run_id": str(pipeline_run_id[0]), "result": result}}))
'''


def _write_flow(tmp_path: Path, block: str, key_storage: bool = False) -> Path:
    configure = (
        f'POLICY = POLICY.configure(key_storage="content-addressed-storage/{block}-keys")'
        if key_storage else ""
    )
    source = FLOW_SOURCE.format(block=block, configure=configure)
    # Capture the flow run id from inside the flow.
    source = source.replace(
        "def pipeline(n: int = 1000) -> int:\n",
        "def pipeline(n: int = 1000) -> int:\n    pipeline_run_id[0] = flow_run.id\n",
    ).replace("POLICY = INPUTS", "pipeline_run_id = [None]\nPOLICY = INPUTS")
    path = tmp_path / "pipeline_flow.py"
    path.write_text(source)
    return path


def _run_flow(path: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=180,
        env=os.environ.copy(), cwd=path.parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return dict(json.loads(line.split(" ", 1)[1]))


def _save_block(name: str, basepath: Path) -> ContentAddressedStorage:
    block = ContentAddressedStorage(basepath=str(basepath))
    block.save(name, overwrite=True)
    return block


def test_block_loads_by_slug_in_a_fresh_process(tmp_path: Path) -> None:
    _save_block("fresh-process", tmp_path / "store")
    code = textwrap.dedent('''
        from prefect.blocks.core import Block
        block = Block.load("content-addressed-storage/fresh-process")
        print(type(block).__name__, block.basepath)
    ''')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ContentAddressedStorage", str(tmp_path / "store")]


def test_block_register_finds_the_block_type() -> None:
    done = subprocess.run([PREFECT, "block", "register", "-m", "uncool_prefect"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Content Addressed Storage" in done.stdout
    listing = subprocess.run([PREFECT, "block", "type", "ls"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert "content-addressed-storage" in listing.stdout


@pytest.mark.parametrize("key_storage", [False, True], ids=["record", "key_storage"])
def test_second_run_in_a_new_process_is_cached_and_deduplicated(
    tmp_path: Path, key_storage: bool
) -> None:
    block_name = f"pipeline-{'ks' if key_storage else 'rec'}"
    block = _save_block(block_name, tmp_path / "store")
    _save_block(f"{block_name}-keys", tmp_path / "keys")  # metadata lives apart
    flow_file = _write_flow(tmp_path, block_name, key_storage=key_storage)

    first = _run_flow(flow_file)
    assert first["result"] == sum(i * i for i in range(1000))
    assert set(task_states(str(first["flow_run_id"])).values()) == {"Completed"}

    second = _run_flow(flow_file)
    assert second["result"] == first["result"]
    states = task_states(str(second["flow_run_id"]))
    assert states == {"featurize": "Cached", "total": "Cached", "total_again": "Cached"}

    # total and total_again return the same value: one object, several refs.
    store = block.store
    refs = dict(store.iter_refs())
    by_task: dict[str, set[str]] = {}
    for document in refs.values():
        if "task_name" in document:
            by_task.setdefault(document["task_name"], set()).add(document["oid"])
    assert by_task["total"] == by_task["total_again"]
    for document in refs.values():
        assert store.has(document["oid"])
    task_refs = [d for d in refs.values() if "task_name" in d]
    assert {d["flow_run_id"] for d in task_refs} == {first["flow_run_id"]}
    assert all(d.get("task_run_id") for d in task_refs)
    assert store.du().dedup_ratio > 1.0


def test_key_storage_on_the_same_block_is_a_clear_error(tmp_path: Path) -> None:
    block = ContentAddressedStorage(basepath=str(tmp_path / "store"))
    block.write_path("k", b"[1, 2]", _sync=True)
    metadata = json.dumps({"storage_key": "k", "expiration": None,
                           "serializer": {"type": "json"}, "prefect_version": "3.9.1",
                           "storage_block_id": None}).encode()
    from uncool_prefect.store import StoreError

    with pytest.raises(StoreError, match="key_storage"):
        block.write_path("k", metadata, _sync=True)
    assert block.read_path("k", _sync=True) == b"[1, 2]"  # the result is intact


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("harm", ["damaged", "deleted"])
def test_a_damaged_or_deleted_cached_result_is_recomputed_not_returned(
    tmp_path: Path, request: pytest.FixtureRequest, where: str, harm: str
) -> None:
    """Prefect users' known pain: a cache entry whose result is gone. Here it recomputes and heals."""
    name = f"heal-{where}-{harm}"
    if where == "local":
        block = _save_block(name, tmp_path / "store")
    else:
        from conftest import s3_options

        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        block = ContentAddressedStorage(basepath=f"s3://{bucket}/store",
                                        storage_options=s3_options(endpoint))
        block.save(name, overwrite=True)
    flow_file = _write_flow(tmp_path, name)
    first = _run_flow(flow_file)
    store = block.store
    featurize_oid = next(d["oid"] for _, d in store.iter_refs() if d.get("task_name") == "featurize")
    url = store.url_of(featurize_oid)
    fs = store.backend.fs if where == "s3" else None  # type: ignore[attr-defined]
    data = bytearray(fs.cat_file(url) if fs else Path(url).read_bytes())
    data[len(data) // 2] ^= 0x01
    if harm == "deleted":
        fs.rm_file(url) if fs else Path(url).unlink()
    elif fs:
        fs.pipe_file(url, bytes(data))
    else:
        Path(url).chmod(0o644)
        Path(url).write_bytes(bytes(data))

    second = _run_flow(flow_file)
    assert second["result"] == first["result"]
    states = task_states(str(second["flow_run_id"]))
    assert states["featurize"] == "Completed"  # recomputed: the bad or missing copy was refused
    assert store.verify() == []  # and the store healed itself
    assert store.has(featurize_oid)


def test_pointing_a_block_at_another_store_says_what_it_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two projects on one server with the same block name: the second is told."""
    from uncool_prefect.blocks import ensure_store_block

    name = f"shared-{tmp_path.name}".lower().replace("_", "-")
    monkeypatch.setenv("UNCOOL_STORE", str(tmp_path / "a"))
    assert ensure_store_block(name).url == str(tmp_path / "a")
    assert ensure_store_block(name).url == str(tmp_path / "a")
    assert "warning" not in capsys.readouterr().err  # first use, then unchanged: quiet

    monkeypatch.setenv("UNCOOL_STORE", str(tmp_path / "b"))
    ensure_store_block(name)
    warning = capsys.readouterr().err
    assert f"pointed at {tmp_path / 'a'}; it now points at {tmp_path / 'b'}" in warning
    assert "UNCOOL_BLOCK" in warning
    assert ContentAddressedStorage.load(name).basepath == str(tmp_path / "b")  # type: ignore[attr-defined]


def test_server_status_and_block_register_use_the_server_that_answers(
    prefect_server: str, tmp_path: Path
) -> None:
    uncool = str(Path(sys.executable).with_name("uncool"))
    env = {**os.environ, "UNCOOL_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    status = subprocess.run([uncool, "server", "status"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"not started by this project; uncool commands use the server that answers at " \
           f"{prefect_server.removesuffix('/api')}" in status.stdout

    done = subprocess.run([uncool, "block", "register", "walkthrough", "--basepath", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert f"on {prefect_server}" in done.stdout and "temporary server" not in done.stderr
    assert ContentAddressedStorage.load("walkthrough").basepath == str(tmp_path / "s")  # type: ignore[attr-defined]

    # No name: the store's own block, the one `uncool run` would use for it.
    from uncool_prefect.settings import default_block_name

    unnamed = {k: v for k, v in env.items() if k != "UNCOOL_BLOCK"}
    done = subprocess.run([uncool, "block", "register", "--basepath", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120, env=unnamed)
    assert done.returncode == 0, done.stderr
    own = default_block_name(str(tmp_path / "s"))
    assert f"content-addressed-storage/{own} -> {tmp_path / 's'}" in done.stdout

    dead = {**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    status = subprocess.run([uncool, "server", "status"], capture_output=True, text=True,
                            timeout=60, env=dead)
    assert (status.returncode, status.stdout.strip()) == (1, "not running")


KEYED_FLOW = '''
from uncool_prefect import pipeline, stage

@stage(result_storage_key="./out/{parameters[x]}")
def spelled_loosely(x: int) -> int:
    return x * 3

@stage(result_storage_key="../escape-{parameters[x]}")
def escaping(x: int) -> int:
    return x * 2

@pipeline
def keyed(escape: bool = False) -> None:
    print("STATE", spelled_loosely(3, return_state=True).name)
    if escape:
        escaping(3)

if __name__ == "__main__":
    import sys
    keyed(escape=len(sys.argv) > 1)
'''


def test_result_storage_keys_a_file_system_would_accept_persist_and_a_refused_one_fails(
    tmp_path: Path,
) -> None:
    """`./out/{x}` is cached like `out/{x}`; `../escape-{x}` fails the stage instead of
    completing with nothing stored (Prefect only logs storage errors at commit)."""
    flow_file = tmp_path / "keyed.py"
    flow_file.write_text(KEYED_FLOW)
    env = {**os.environ, "UNCOOL_STORE": str(tmp_path / "store"), "UNCOOL_BLOCK": "keyed"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(flow_file), *args], capture_output=True,
                              text=True, timeout=180, env=env, cwd=tmp_path)

    first, second = run(), run()
    assert "STATE Completed" in first.stdout, first.stderr[-3000:]
    assert "STATE Cached" in second.stdout, second.stderr[-3000:]
    assert (tmp_path / "store" / "refs" / "out" / "3").is_file()
    refused = run("escape")
    assert refused.returncode != 0
    assert "result_storage_key of stage 'escaping' '../escape-3' is not allowed" in refused.stderr
    assert not (tmp_path / "escape-3").exists()


RENAMED_FLOW = '''
import sys
from uncool_prefect import pipeline, stage

@stage
def double(x: int) -> int:
    return x * 2

@pipeline
def renamed() -> None:
    copy = double.with_options(task_run_name="double-renamed")
    print("STORAGE", type(copy).__name__, type(copy.result_storage).__name__)
    print("STATE", copy(4, return_state=True).name)
    print("COLLECTIONS", "prefect_dask" in sys.modules)

if __name__ == "__main__":
    renamed()
'''


def test_a_stage_copied_with_options_stays_a_stage_on_the_runs_block(tmp_path: Path) -> None:
    """Prefect's with_options builds a plain Task: the copy (a sweep's trials are such
    copies) must keep the stage's storage, the block the run loaded, and be Cached the
    second time; resolving the slug instead imports every Prefect collection per run."""
    flow_file = tmp_path / "renamed.py"
    flow_file.write_text(RENAMED_FLOW)
    env = {**os.environ, "UNCOOL_STORE": str(tmp_path / "store"), "UNCOOL_BLOCK": "renamed"}

    def run() -> str:
        done = subprocess.run([sys.executable, str(flow_file)], capture_output=True, text=True,
                              timeout=180, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    first, second = run(), run()
    assert "STORAGE Stage ContentAddressedStorage" in first
    assert "STATE Completed" in first and "STATE Cached" in second
    assert "COLLECTIONS False" in second
