"""Every ``UNCOOL_*`` setting, in one place.

Read from the environment (and a ``.env`` file in the working folder) each time
:func:`get_settings` is called, so tests and subprocesses can change them.

A relative ``UNCOOL_HOME`` (the default ``.uncool`` included) belongs to the
project, as ``.git`` does: it is taken from the project folder (the nearest
folder at or above the working folder whose pyproject.toml has a
``[tool.uncool]`` table), so a command run from a subfolder uses the
project's store and registry, not a new one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .config import find_root
from .store import ObjectStore


class UncoolSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNCOOL_", env_file=".env", extra="ignore")

    home: Path = Field(
        default=Path(".uncool"),
        description="Project state folder: the default store, MLflow database, server pid "
        "and logs; relative to the project folder.",
    )
    store: str | None = Field(
        default=None,
        description="Base URL of the object store (a folder or s3://bucket/prefix); "
        "default: <home>/store.",
    )
    algorithm: str = Field(default="sha256", description="Hash algorithm of new stores.")
    block: str = Field(
        default="",
        description="Name of the ContentAddressedStorage block the pipeline's results go to; "
        "default: uncool-<8 hex digits of the store URL's hash>, one block per store.",
    )
    state_dir: Path | None = Field(
        default=None, description="Where the stat cache of a store lives (machine-local)."
    )
    dask_address: str | None = Field(
        default=None,
        description="Address of an existing Dask scheduler (e.g. tcp://10.0.0.5:8786) that runs "
        "the training sweep; default: a local cluster (Dask-CUDA when GPUs are found).",
    )
    dask_workers: int | None = Field(
        default=None, description="Workers of the local Dask cluster; default: one per GPU, "
        "else one per core.",
    )
    sweep_dask_min_work: int = Field(
        default=100_000,
        description="Without an address or GPUs, a sweep of fewer training rows x trials runs "
        "on threads in the flow's process: a local Dask cluster costs seconds to start, more "
        "than small fits take (see bench/sweep.py). 0: always a local Dask cluster.",
    )

    lock_lease: float = Field(
        default=60.0, gt=0,
        description="Seconds a stage's lock outlives a run that was killed (SIGKILL, a lost "
        "machine) before another run takes it over; a live run renews it every third of that.",
    )

    @property
    def store_url(self) -> str:
        return self.store or str((self.home / "store").absolute())


def default_block_name(store_url: str) -> str:
    """One block per store: projects sharing a Prefect server keep apart by default.

    NOTE: deployed runs load the block by name; with one name for everyone, a
    second project's `uncool run` would re-point the first one's deployed runs
    at its own store. Teammates on one shared store (s3://...) get one name,
    and with it each other's cached results.
    """
    digest = hashlib.sha256(store_url.rstrip("/").encode("utf-8")).hexdigest()
    return f"uncool-{digest[:8]}"


def get_settings(**overrides: Any) -> UncoolSettings:
    """The settings in force; ``overrides`` (e.g. ``store=``) win over the environment."""
    root = find_root()
    # The project's .env, wherever in the project the command runs.
    if root is not None:
        overrides["_env_file"] = root / ".env"
    settings = UncoolSettings(**overrides)
    updates: dict[str, object] = {}
    if root is not None and not settings.home.is_absolute():
        updates["home"] = root / settings.home
    if settings.store:
        store = settings.store.rstrip("/")
        if root is not None and "://" not in store and not Path(store).is_absolute():
            store = str(root / store)
        updates["store"] = store
    if updates:
        settings = settings.model_copy(update=updates)
    if not settings.block:
        settings = settings.model_copy(update={"block": default_block_name(settings.store_url)})
    return settings


def open_store(basepath: str | None = None) -> ObjectStore:
    """The store the settings name (or ``basepath``), with their algorithm and stat cache.

    The one way the CLI and the records open "the store": deployed flows reach
    the same store through the block (``ContentAddressedStorage.load(...).store``).
    """
    settings = get_settings()
    return ObjectStore(basepath or settings.store_url, algorithm=settings.algorithm,
                       state_dir=settings.state_dir)
