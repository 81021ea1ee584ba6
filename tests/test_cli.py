"""The `uncool` command as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

UNCOOL = str(Path(sys.executable).with_name("uncool"))
PROJECT = Path(__file__).resolve().parents[1]


def uncool(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([UNCOOL, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "COLUMNS": "200"})
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def basepath(tmp_path: Path) -> str:
    return str(tmp_path / "store")


def test_put_get_cat_ls_du_verify_gc(tmp_path: Path, basepath: str) -> None:
    data = tmp_path / "data"
    (data / "plots").mkdir(parents=True)
    (data / "plots" / "1.txt").write_text("axis labels overlap")
    (data / "plots" / "2.txt").write_text("axis labels overlap")
    file_oid = uncool("store", "put", str(data / "plots" / "1.txt"), "--basepath", basepath,
                      check=True).stdout.strip()
    dir_oid = uncool("store", "put", str(data), "--basepath", basepath, check=True).stdout.strip()
    assert len(file_oid) == 64 and dir_oid.endswith(".dir")

    assert uncool("store", "cat", file_oid, "--basepath", basepath, check=True).stdout == (
        "axis labels overlap"
    )
    uncool("store", "get", dir_oid, str(tmp_path / "restored"), "--basepath", basepath, check=True)
    assert (tmp_path / "restored" / "plots" / "2.txt").read_text() == "axis labels overlap"

    listing = json.loads(uncool("store", "ls", "--json", "--basepath", basepath, check=True).stdout)
    assert {entry["oid"] for entry in listing} == {file_oid, dir_oid}

    usage = json.loads(uncool("store", "du", "--json", "--basepath", basepath, check=True).stdout)
    assert usage["objects"] == 2 and usage["directories"] == 1
    assert usage["logical_bytes"] > usage["stored_bytes"]  # two files, one object

    assert "verified" in uncool("store", "verify", "--basepath", basepath, check=True).stdout

    dry = uncool("store", "gc", "--grace", "0", "--dry-run", "--basepath", basepath, check=True)
    assert "would remove 2 object(s)" in dry.stdout
    kept = uncool("store", "gc", "--grace", "0", "--keep", dir_oid, "--basepath", basepath,
                  check=True)
    assert "removed 0 object(s)" in kept.stdout


def _put_and_damage(tmp_path: Path, basepath: str) -> tuple[Path, str, Path]:
    """A file put through the CLI, then its stored object overwritten: (source, oid, stored)."""
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights" * 1000)
    oid = uncool("store", "put", str(source), "--basepath", basepath, check=True).stdout.strip()
    stored = Path(basepath) / "objects" / "sha256" / oid[:2] / oid[2:]
    stored.chmod(0o644)
    stored.write_bytes(b"weightz" * 1000)
    return source, oid, stored


def test_verify_exits_1_and_names_the_corrupt_object(tmp_path: Path, basepath: str) -> None:
    _source, oid, stored = _put_and_damage(tmp_path, basepath)
    done = uncool("store", "verify", "--basepath", basepath)
    assert done.returncode == 1
    assert f"corrupt: {oid}" in done.stdout and str(stored) in done.stdout
    assert "1 damaged object(s)" in done.stderr


def test_verify_repair_then_put_heals(tmp_path: Path, basepath: str) -> None:
    """verify's own advice works: --repair moves the damage aside, a put of the original heals."""
    source, oid, _stored = _put_and_damage(tmp_path, basepath)
    found = uncool("store", "verify", "--basepath", basepath)
    assert found.returncode == 1 and "--repair" in found.stderr
    repaired = uncool("store", "verify", "--repair", "--basepath", basepath)
    assert repaired.returncode == 1 and "moved aside" in repaired.stdout
    assert "quarantined: " + oid in uncool("store", "verify", "--basepath", basepath).stdout
    uncool("store", "put", str(source), "--basepath", basepath, check=True)
    assert "verified" in uncool("store", "verify", "--basepath", basepath, check=True).stdout


def test_cat_writes_nothing_of_a_damaged_object(tmp_path: Path, basepath: str) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights" * 500_000)  # 3.5 MB: many chunks
    oid = uncool("store", "put", str(source), "--basepath", basepath, check=True).stdout.strip()
    stored = Path(basepath) / "objects" / "sha256" / oid[:2] / oid[2:]
    stored.chmod(0o644)
    stored.write_bytes(b"weightz" + stored.read_bytes()[7:-1])  # flipped at the start, truncated
    done = subprocess.run([UNCOOL, "store", "cat", oid, "--basepath", basepath],
                          capture_output=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == b""  # not one unverified byte
    assert oid in done.stderr.decode() and b"Traceback" not in done.stderr


def test_verify_counts_a_file_missing_from_two_folders_once(tmp_path: Path, basepath: str) -> None:
    for name in ("day1", "day2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shared.txt").write_text("the same bytes in both folders\n")
        (tmp_path / name / f"{name}.txt").write_text(f"only in {name}\n")
        uncool("store", "put", str(tmp_path / name), "--basepath", basepath, check=True)
    shared = uncool("store", "put", str(tmp_path / "day1" / "shared.txt"), "--basepath", basepath,
                    check=True).stdout.strip()
    blob = Path(basepath) / "objects" / "sha256" / shared[:2] / shared[2:]
    blob.chmod(0o644)
    blob.unlink()
    done = uncool("store", "verify", "--basepath", basepath)
    assert done.returncode == 1
    assert done.stdout.count(f"missing: {shared}") == 2  # where each folder lists it
    assert "1 damaged object(s)" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["store", "get", "nothex", "/tmp/x"], "is not an object id"),
        (["store", "cat", "0" * 64], "is not in the store"),
        (["store", "put", "/no/such/file"], "does not exist"),
        (["store", "gc", "--grace", "soon"], "cannot read duration"),
    ],
)
def test_bad_input_is_one_clear_line(basepath: str, args: list[str], message: str) -> None:
    done = uncool(*args, "--basepath", basepath)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_every_command_explains_itself() -> None:
    commands = ["run", "init", "predict", "serve", "reproduce", "lineage", "checkout", "diff",
                "deploy", "worker", "watch", "sample-data", "demo"]
    for args in (["--help"], ["store", "--help"], ["store", "gc", "--help"], ["server", "--help"],
                 ["exp", "show", "--help"], ["block", "register", "--help"],
                 *([command, "--help"] for command in commands)):
        done = uncool(*args, check=True)
        assert "Usage:" in done.stdout, args
    listing = uncool("--help", check=True).stdout
    assert all(command in listing for command in [*commands, "store", "server", "block", "exp"])


def test_uncool_store_env_sets_the_default_store(tmp_path: Path) -> None:
    source = tmp_path / "f.txt"
    source.write_text("hello")
    env = {**os.environ, "UNCOOL_STORE": str(tmp_path / "env-store")}
    done = subprocess.run([UNCOOL, "store", "put", str(source)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "env-store" / "objects" / "sha256").is_dir()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_demo_is_the_main_job_and_its_second_run_is_cached(tmp_path: Path) -> None:
    env = {**os.environ, "UNCOOL_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    done = subprocess.run([UNCOOL, "demo"], capture_output=True, text=True, cwd=PROJECT,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_2 = done.stdout.split("run 2", 1)[1]
    assert run_2.count("Cached") >= 3 and "Completed" not in run_2
    assert "every task Cached" in done.stdout
    assert "dedup ratio" in done.stdout


def _project(tmp_path: Path) -> Path:
    """A folder that uncool takes for a project: its pyproject.toml has a [tool.uncool] table."""
    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "pipeline.py").write_text("")
    (project / "pyproject.toml").write_text('[tool.uncool]\npipeline = "flows/pipeline.py:run"\n')
    return project


def test_a_relative_home_belongs_to_the_project_not_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cd flows && uncool run` must use the project's .uncool, not start a second one there."""
    from uncool_prefect.settings import get_settings

    project = _project(tmp_path)
    monkeypatch.delenv("UNCOOL_HOME")
    monkeypatch.chdir(project / "flows")
    assert get_settings().home == project / ".uncool"
    assert get_settings().store_url == str(project / ".uncool" / "store")
    monkeypatch.setenv("UNCOOL_HOME", "state")
    assert get_settings().home == project / "state"
    monkeypatch.setenv("UNCOOL_HOME", str(tmp_path / "elsewhere"))
    assert get_settings().home == tmp_path / "elsewhere"

    monkeypatch.delenv("UNCOOL_HOME")
    monkeypatch.chdir(tmp_path)  # no project here or above: the working folder's
    assert get_settings().home == Path(".uncool")


def test_each_store_gets_its_own_block_unless_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two projects on one server keep apart; teammates on one bucket share a block (and its cache)."""
    from uncool_prefect.settings import get_settings

    monkeypatch.delenv("UNCOOL_BLOCK", raising=False)
    monkeypatch.setenv("UNCOOL_STORE", "/work/project-a/.uncool/store")
    first = get_settings().block
    monkeypatch.setenv("UNCOOL_STORE", "/work/project-b/.uncool/store")
    assert get_settings().block != first
    monkeypatch.setenv("UNCOOL_STORE", "s3://team-bucket/uncool")
    shared = get_settings().block
    monkeypatch.setenv("UNCOOL_STORE", "s3://team-bucket/uncool/")
    assert get_settings().block == shared and shared.startswith("uncool-")
    monkeypatch.setenv("UNCOOL_BLOCK", "ours")
    assert get_settings().block == "ours"


def test_the_projects_env_file_counts_from_a_subfolder_and_reaches_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's flow runs start in the code cache, far from .env: they get the store and block pinned."""
    from uncool_prefect.project.worker import worker_environment
    from uncool_prefect.settings import default_block_name, get_settings

    project = _project(tmp_path)
    (project / ".env").write_text("UNCOOL_STORE=s3://team-bucket/uncool/\n")
    for name in ("UNCOOL_HOME", "UNCOOL_STORE", "UNCOOL_BLOCK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(project / "flows")
    assert get_settings().store_url == "s3://team-bucket/uncool"
    env = worker_environment(project, "http://127.0.0.1:9/api")
    assert env["UNCOOL_STORE"] == "s3://team-bucket/uncool"
    assert env["UNCOOL_BLOCK"] == default_block_name("s3://team-bucket/uncool") == get_settings().block
    assert env["UNCOOL_HOME"] == str(project / ".uncool")

    (project / ".env").write_text("UNCOOL_STORE=shared-store\n")  # relative: to the project
    assert get_settings().store_url == str(project / "shared-store")


def test_cat_verify_and_heal_on_s3_through_the_cli(tmp_path: Path, s3_endpoint: str,
                                                     s3_bucket: str) -> None:
    """The same promises on a bucket, reached as the README says (AWS_ENDPOINT_URL)."""
    import boto3

    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint, "COLUMNS": "200",
           "UNCOOL_STATE_DIR": str(tmp_path / "state")}
    basepath = f"s3://{s3_bucket}/store"

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([UNCOOL, *args, "--basepath", basepath], capture_output=True,
                              timeout=120, env=env)

    source = tmp_path / "model.bin"
    source.write_bytes(b"weights" * 500_000)
    oid = run("store", "put", str(source)).stdout.decode().strip()
    key = f"store/objects/sha256/{oid[:2]}/{oid[2:]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key=key, Body=b"weightz" + source.read_bytes()[7:])

    cat = run("store", "cat", oid)
    assert cat.returncode == 2 and cat.stdout == b""  # no unverified byte
    assert oid.encode() in cat.stderr and b"Traceback" not in cat.stderr
    # The read itself moved the damaged copy aside; verify says so until the data comes back.
    found = run("store", "verify", "--repair")
    assert found.returncode == 1 and f"quarantined: {oid}".encode() in found.stdout
    assert run("store", "put", str(source)).returncode == 0
    healed = run("store", "verify")
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert run("store", "cat", oid).stdout == source.read_bytes()
