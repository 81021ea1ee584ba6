"""Where the training sweep runs: one factory for a prefect-dask ``DaskTaskRunner``.

The choice, in this order (the first that applies wins):

1. ``UNCOOL_DASK_ADDRESS`` is set: the existing Dask cluster there. This is how
   a project moves to dask-jobqueue, Dask Kubernetes, Coiled or any Dask
   deployment: start the cluster there and point the variable at its scheduler.
2. NVML reports GPUs (and the ``gpu`` extra is installed): a
   ``dask_cuda.LocalCUDACluster``, one worker per GPU, each with the resource
   ``GPU=1``.
3. A small sweep (fewer training rows x trials than ``UNCOOL_SWEEP_DASK_MIN_WORK``,
   100,000 by default) runs on a thread pool in the flow's own process: a
   local cluster takes seconds to start (its workers import Prefect and
   scikit-learn), far more than fits of a few hundred rows take.
4. Otherwise a ``distributed.LocalCluster``, one single-threaded worker process
   per core (scikit-learn fits hold the GIL).

Nothing starts on import, nor when the runner is built: the cluster starts when
a flow enters the runner, and the pipeline enters it only when training
actually runs (a cache miss of the train stage).

Example:
    >>> from uncool_prefect.compute import choose
    >>> choice = choose(address=None, gpus=0, cores=2)
    >>> choice.kind, choice.workers, choice.gpu
    ('cpu', 2, False)
    >>> choose(address="tcp://10.0.0.5:8786", gpus=4, cores=2).kind
    'address'

Use it with a real Prefect server (``PREFECT_API_URL``), never the ephemeral
one: every Dask worker process would start an ephemeral server of its own.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from .settings import get_settings

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

logger = logging.getLogger("uncool_prefect.compute")

Kind = Literal["address", "cuda", "cpu", "threads"]


class ComputeError(ConnectionError):
    """The configured compute cannot be used; the message says what to do."""


@dataclass(frozen=True)
class RunnerChoice:
    """Which Dask cluster the sweep runs on, and why.

    Attributes:
        kind: ``address`` (an existing cluster), ``cuda`` (LocalCUDACluster), ``cpu``
            (LocalCluster) or ``threads`` (no cluster: a thread pool in the flow's process).
        reason: one sentence for the log.
        workers: workers of a local cluster (0 for an existing one: it has its own).
        gpu: whether trials are annotated with ``resources={"GPU": 1}`` and train on the GPU.
        address: the scheduler address, for ``address``.
        cluster_kwargs: what the local cluster class is started with.
    """

    kind: Kind
    reason: str
    workers: int = 0
    gpu: bool = False
    address: str | None = None
    cluster_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def cluster_class(self) -> str | None:
        return {"cuda": "dask_cuda.LocalCUDACluster", "cpu": "distributed.LocalCluster"}.get(self.kind)


def count_gpus() -> tuple[int, str]:
    """``(number of GPUs NVML reports, why)``; ``0`` whenever NVML or dask-cuda is absent.

    ``dask_cuda`` is looked up, never imported: on a machine without GPUs it
    imports fine and fails only later, obscurely, at the first task.
    """
    if importlib.util.find_spec("dask_cuda") is None:
        return 0, "dask-cuda is not installed (pip install 'uncool-prefect[gpu]' on a GPU machine)"
    try:
        import pynvml
    except ImportError:
        return 0, "NVML bindings (nvidia-ml-py) are not installed"
    try:
        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        return 0, f"NVML found no GPU driver ({exc})"
    return count, f"NVML reports {count} GPU(s)"


def choose(address: str | None = None, gpus: int | None = None, cores: int | None = None,
           workers: int | None = None, work: int | None = None) -> RunnerChoice:
    """Pick the cluster: ``address`` > GPUs > threads for small work > the local cores.

    Args:
        address: an existing scheduler; default ``UNCOOL_DASK_ADDRESS``.
        gpus: GPUs on this machine; default: asked of NVML (:func:`count_gpus`).
        cores: cores for a CPU cluster; default: the ones this process may use.
        workers: local workers; default ``UNCOOL_DASK_WORKERS``, else one per GPU or core.
        work: the sweep's size, training rows x trials; below
            ``UNCOOL_SWEEP_DASK_MIN_WORK`` it runs on threads. None: size unknown.
    """
    settings = get_settings()
    address = address if address is not None else settings.dask_address
    workers = workers if workers is not None else settings.dask_workers
    if address:
        return RunnerChoice("address", f"UNCOOL_DASK_ADDRESS is set: the existing Dask cluster at "
                            f"{address}", address=address)
    why = "GPU count given"
    if gpus is None:
        gpus, why = count_gpus()
    if gpus > 0:
        n = min(workers or gpus, gpus)
        return RunnerChoice(
            "cuda", f"{why}: dask_cuda.LocalCUDACluster, {n} worker(s), one per GPU", workers=n,
            gpu=True,
            # NOTE: a resource per worker, so a trial annotated GPU=1 waits for
            # a free GPU instead of sharing one.
            cluster_kwargs={"n_workers": n, "resources": {"GPU": 1}, "dashboard_address": ":0"},
        )
    # NOTE: the cores this process may use (a container's share); macOS has no affinity.
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1)
    n = workers or cores
    threshold = settings.sweep_dask_min_work
    if work is not None and (work < threshold or n < 2):
        small = (f"{work:,} training rows x trials, under UNCOOL_SWEEP_DASK_MIN_WORK={threshold:,}"
                 if n >= 2 else "one core: a cluster could not run trials side by side")
        return RunnerChoice(
            "threads", f"no GPU, {why}; {small}: a thread pool in this process "
            f"({n} thread(s)), no Dask cluster to start", workers=n)
    return RunnerChoice(
        "cpu", f"no GPU, {why}: distributed.LocalCluster, {n} worker process(es) x 1 thread",
        workers=n,
        cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": ":0"},
    )


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail with one clear line when nothing listens at a ``tcp://`` scheduler address.

    Raises:
        ComputeError: the address is malformed or no scheduler answers there.
    """
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls"):
        return  # e.g. inproc:// or ucx://: left to Dask
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ComputeError(f"UNCOOL_DASK_ADDRESS={address!r} is not host:port; "
                           f"use e.g. tcp://10.0.0.5:8786") from exc
    if not host or not port:
        raise ComputeError(f"UNCOOL_DASK_ADDRESS={address!r} has no host or port; "
                           f"use e.g. tcp://10.0.0.5:8786")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ComputeError(
            f"no Dask scheduler answers at UNCOOL_DASK_ADDRESS={address} ({exc.strerror or exc}); "
            f"start one there (`dask scheduler`), or unset UNCOOL_DASK_ADDRESS to train on a "
            f"local cluster"
        ) from exc


def preflight() -> None:
    """Before a run starts: one clear line, not a failed flow, when ``UNCOOL_DASK_ADDRESS`` is dead.

    Raises:
        ComputeError: the configured scheduler does not answer.
    """
    address = get_settings().dask_address
    if address:
        check_address(address)


def gpu_workers(address: str, timeout: float = 10.0) -> int:
    """How many workers of an existing cluster advertise a ``GPU`` resource."""
    from distributed import Client

    with Client(address, timeout=timeout, set_as_default=False) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        return sum(1 for w in workers if w.get("resources", {}).get("GPU", 0) >= 1)


def probe(choice: RunnerChoice) -> RunnerChoice:
    """``choice``, checked: an existing cluster must answer, and says whether it has GPU workers.

    Raises:
        ComputeError: ``UNCOOL_DASK_ADDRESS`` names a scheduler that does not answer.
    """
    if choice.kind != "address" or choice.address is None:
        return choice
    check_address(choice.address)
    gpus = gpu_workers(choice.address)
    return replace(choice, gpu=gpus > 0,
                   reason=f"{choice.reason} ({gpus} worker(s) with a GPU resource)")


def task_runner(choice: RunnerChoice | None = None,
                log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> DaskTaskRunner:
    """A ``DaskTaskRunner`` for ``choice`` (default: :func:`choose`), with one log line;
    a Prefect ``ThreadPoolTaskRunner`` for ``threads``.

    ``log`` takes that line (e.g. a Prefect run logger, so the UI shows it).

    Raises:
        ComputeError: ``UNCOOL_DASK_ADDRESS`` names a scheduler that does not answer.
    """
    choice = choice or choose()
    if choice.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        (log or logger).info("task runner: %s", choice.reason)
        return ThreadPoolTaskRunner(max_workers=choice.workers)  # type: ignore[return-value]
    from prefect_dask import DaskTaskRunner

    (log or logger).info("Dask task runner: %s", choice.reason)
    if choice.kind == "address":
        assert choice.address is not None
        check_address(choice.address)
        return DaskTaskRunner(address=choice.address)
    if choice.gpu:
        # NOTE: scikit-learn's array-API dispatch needs SciPy's, which SciPy
        # reads once at import: the worker processes inherit it from here.
        os.environ.setdefault("SCIPY_ARRAY_API", "1")
    return DaskTaskRunner(cluster_class=choice.cluster_class, cluster_kwargs=choice.cluster_kwargs)
