"""Where the sweep runs: runner choice (address > GPU > CPU) and an existing cluster on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _free_port
from project import Project

from uncool_prefect import compute
from uncool_prefect.sources import write_sample

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _no_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNCOOL_DASK_ADDRESS", raising=False)
    monkeypatch.delenv("UNCOOL_DASK_WORKERS", raising=False)


def test_an_address_wins_over_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "count_gpus", lambda: (4, "NVML reports 4 GPU(s)"))
    monkeypatch.setenv("UNCOOL_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    choice = compute.choose()
    assert (choice.kind, choice.address, choice.cluster_class) == ("address", "tcp://10.0.0.5:8786", None)
    assert "UNCOOL_DASK_ADDRESS" in choice.reason


def test_gpus_give_one_cuda_worker_per_gpu_with_a_gpu_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "count_gpus", lambda: (2, "NVML reports 2 GPU(s)"))
    choice = compute.choose()
    assert choice.kind == "cuda" and choice.gpu and choice.workers == 2
    assert choice.cluster_class == "dask_cuda.LocalCUDACluster"
    assert choice.cluster_kwargs["n_workers"] == 2
    assert choice.cluster_kwargs["resources"] == {"GPU": 1}
    assert "NVML reports 2 GPU(s)" in choice.reason


def test_no_gpu_gives_a_local_cluster_sized_to_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "count_gpus", lambda: (0, "NVML found no GPU driver"))
    choice = compute.choose(cores=3)
    assert choice.kind == "cpu" and not choice.gpu
    assert choice.cluster_class == "distributed.LocalCluster"
    assert choice.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True,
                                     "dashboard_address": ":0"}
    monkeypatch.setenv("UNCOOL_DASK_WORKERS", "1")
    assert compute.choose(cores=3).workers == 1


def test_a_small_sweep_runs_on_threads_and_a_big_one_on_a_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cluster only where it pays: its start-up costs more than small fits take."""
    from prefect.task_runners import ThreadPoolTaskRunner

    monkeypatch.setattr(compute, "count_gpus", lambda: (0, "NVML found no GPU driver"))
    small = compute.choose(cores=2, work=135 * 2)
    assert small.kind == "threads" and small.workers == 2 and small.cluster_class is None
    assert "270 training rows x trials, under UNCOOL_SWEEP_DASK_MIN_WORK=100,000" in small.reason
    assert isinstance(compute.task_runner(small), ThreadPoolTaskRunner)
    assert compute.choose(cores=2, work=27_000 * 8).kind == "cpu"
    assert compute.choose(cores=1, work=27_000 * 8).kind == "threads"  # nothing to run beside
    monkeypatch.setenv("UNCOOL_SWEEP_DASK_MIN_WORK", "0")
    assert compute.choose(cores=2, work=10).kind == "cpu"
    assert compute.choose(gpus=1, work=10).kind == "cuda"  # a GPU is worth its cluster
    assert compute.choose(address="tcp://10.0.0.5:8786", work=10).kind == "address"


def test_this_machine_has_no_gpu_and_dask_cuda_is_never_imported() -> None:
    count, why = compute.count_gpus()
    assert count == 0 and why
    assert compute.choose().kind == "cpu"
    assert "dask_cuda" not in sys.modules


def test_the_runner_starts_nothing_until_a_flow_uses_it() -> None:
    from prefect_dask import DaskTaskRunner

    runner = compute.task_runner(compute.choose(gpus=0, cores=2))
    assert isinstance(runner, DaskTaskRunner)
    assert runner._cluster is None and runner._client is None
    assert runner.cluster_kwargs["n_workers"] == 2


def test_an_address_where_nothing_listens_is_one_clear_line() -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(compute.ComputeError) as caught:
        compute.task_runner(compute.choose(address=address))
    message = str(caught.value)
    assert f"no Dask scheduler answers at UNCOOL_DASK_ADDRESS={address}" in message
    assert "unset UNCOOL_DASK_ADDRESS" in message and "\n" not in message
    with pytest.raises(compute.ComputeError, match="is not host:port"):
        compute.check_address("tcp://127.0.0.1:notaport")


def test_preflight_checks_the_configured_address(monkeypatch: pytest.MonkeyPatch) -> None:
    compute.preflight()  # nothing configured: nothing to check
    monkeypatch.setenv("UNCOOL_DASK_ADDRESS", f"tcp://127.0.0.1:{_free_port()}")
    with pytest.raises(compute.ComputeError, match="no Dask scheduler answers"):
        compute.preflight()


@pytest.mark.usefixtures("prefect_server")
def test_uncool_run_with_a_dead_address_says_so_before_any_stage(tmp_path: Path) -> None:
    project = Project(tmp_path, "dask-dead")
    write_sample(project.data, days=2, seed=3)
    project.env["UNCOOL_DASK_ADDRESS"] = address = f"tcp://127.0.0.1:{_free_port()}"
    done = project.uncool("run", "-S", "data.source=folder", "-S", f"data.folder.url={project.data}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: no Dask scheduler answers at UNCOOL_DASK_ADDRESS={address}" in done.stderr
    assert "Traceback" not in done.stderr and "runs/flow-run/" not in done.stdout


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A `dask scheduler` and one `dask worker` as subprocesses on loopback; (address, worker log)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = tmp_path / "worker.log"
    common = {"start_new_session": True, "stdin": subprocess.DEVNULL, "env": os.environ.copy()}
    with open(tmp_path / "scheduler.log", "wb") as scheduler_out, open(log, "wb") as worker_out:
        scheduler = subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--no-dashboard"], stdout=scheduler_out, stderr=subprocess.STDOUT, **common)
        worker = subprocess.Popen(
            [str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
             "--nworkers", "1", "--no-dashboard"], stdout=worker_out, stderr=subprocess.STDOUT,
            **common)
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        yield address, log
    finally:
        for process in (worker, scheduler):
            os.killpg(process.pid, 15)
        for process in (worker, scheduler):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_uncool_run_trains_on_an_existing_cluster(tmp_path: Path,
                                                  dask_cluster: tuple[str, Path]) -> None:
    address, worker_log = dask_cluster
    project = Project(tmp_path, "dask-address")
    write_sample(project.data, days=2, seed=3)
    project.env["UNCOOL_DASK_ADDRESS"] = address
    done, _ = project.run_flow()
    assert f"the existing Dask cluster at {address}" in done.stderr
    assert "LocalCluster" not in done.stderr  # no local cluster was started
    # The trials ran in the worker process, not in `uncool run`.
    deadline = time.monotonic() + 10
    while "trial[classifier=ridge]" not in worker_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    worker_text = worker_log.read_text()
    assert re.search(r"trial\[classifier=logistic_regression\].*Completed", worker_text), worker_text[-3000:]
    assert re.search(r"trial\[classifier=ridge\].*Completed", worker_text), worker_text[-3000:]
