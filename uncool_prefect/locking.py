"""``StoreLockManager``: Prefect's ``LockManager`` over the store's lease locks.

With ``isolation_level="SERIALIZABLE"``, Prefect takes a lock on a task's
cache key before it looks the key up, and releases it once the result is
committed. Two runs that reach the same stage with the same inputs then
compute it once: the second waits, finds the result and is ``Cached``. The
locks live in the store (``locks/<key>``, see :mod:`uncool_prefect.store.locks`),
so this holds across processes and machines that share a folder or bucket.

Every ``@stage`` uses one by default. For a plain task:

Example:
    ```python
    from prefect import task
    from uncool_prefect import ContentAddressedStorage
    from uncool_prefect.caching import ContentAware

    storage = ContentAddressedStorage.load("BLOCK_NAME")

    @task(result_storage=storage, persist_result=True,
          cache_policy=ContentAware().configure(isolation_level="SERIALIZABLE",
                                                lock_manager=storage.lock_manager))
    def train(data_version: str) -> bytes: ...
    ```
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any
from weakref import WeakKeyDictionary

from prefect.locking.protocol import LockManager

from .settings import get_settings
from .store import ObjectStore
from .store.locks import StoreLocks


class StoreLockManager(LockManager):
    """Prefect's lock manager protocol on lease locks in an object store.

    Args:
        store: where the locks live; default (None): the store the running
            stage's results go to, found on every call as
            :func:`uncool_prefect.api.get_store` finds it.
        lease_s: how long a lock outlives a killed holder (default: the
            ``UNCOOL_LOCK_LEASE`` setting, 60 s); a live holder renews it.

    A ``hold_timeout`` given to :meth:`acquire_lock` is a lease that is not
    renewed: the lock lapses after that many seconds.
    """

    def __init__(self, store: ObjectStore | None = None, *, lease_s: float | None = None) -> None:
        self.store = store
        self.lease_s = lease_s

    def __repr__(self) -> str:
        where = self.store.url if self.store is not None else "the stage's store"
        return f"StoreLockManager({where})"

    def __eq__(self, other: object) -> bool:
        # NOTE: Prefect refuses to combine two policies with different lock
        # managers; two managers on one store are the same manager.
        if not isinstance(other, StoreLockManager):
            return NotImplemented
        mine = None if self.store is None else self.store.url
        theirs = None if other.store is None else other.store.url
        return (mine, self.lease_s) == (theirs, other.lease_s)

    def __hash__(self) -> int:
        return hash((None if self.store is None else self.store.url, self.lease_s))

    def locks(self) -> StoreLocks:
        """The store's locks, for the store in use now."""
        if self.store is not None:
            store = self.store
        else:
            from .api import get_store

            store = get_store()
        if self.lease_s is not None:
            lease = self.lease_s
        else:  # NOTE: read once: settings are read from the environment and files
            lease = self.__dict__.get("_lease") or get_settings().lock_lease
            self.__dict__["_lease"] = lease
        return _locks_for(store, lease)

    # -- prefect.locking.LockManager ------------------------------------------
    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        return self.locks().acquire(key, holder, timeout=acquire_timeout, lease_s=hold_timeout,
                                    renew=hold_timeout is None)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        locks = self.locks()
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        pause = 0.02
        while not await asyncio.to_thread(locks.try_acquire, key, holder, lease_s=hold_timeout,
                                          renew=hold_timeout is None):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, locks.poll_s)
        return True

    def release_lock(self, key: str, holder: str) -> None:
        """Release the lock; raises ``LockNotHeldError`` (a ``ValueError``) for a non-holder."""
        self.locks().release(key, holder)

    def is_locked(self, key: str) -> bool:
        return self.locks().is_locked(key)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        info = self.locks().holder_of(key)
        return info is not None and info.holder == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self.locks().wait(key, timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        locks = self.locks()
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.02
        while await asyncio.to_thread(locks.is_locked, key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, locks.poll_s)
        return True

    # NOTE: Dask ships a task with its cache policy, and Prefect deep-copies
    # policies (configure): the store is reopened by URL on the other side, as
    # ContentAware does. Held locks are per process (see store.locks), so a copy
    # releases what the original acquired.
    def __getstate__(self) -> dict[str, Any]:
        store = self.store
        spec = None
        if store is not None:
            options = dict(getattr(getattr(store.backend, "fs", None), "storage_options", {}) or {})
            spec = (store.url, store.algorithm, str(store.state_dir), options)
        return {"store": spec, "lease_s": self.lease_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.lease_s = state["lease_s"]
        spec = state["store"]
        self.store = None if spec is None else _open_store(*spec)


_STORES: dict[tuple[str, str, str, str], ObjectStore] = {}
_LOCKS: WeakKeyDictionary[ObjectStore, dict[float, StoreLocks]] = WeakKeyDictionary()
_GUARD = threading.Lock()


def _open_store(url: str, algorithm: str, state_dir: str, options: dict[str, Any]) -> ObjectStore:
    """One store per configuration in a process (each opens its own SQLite stat cache)."""
    key = (url, algorithm, state_dir, repr(sorted(options.items())))
    with _GUARD:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = ObjectStore(url, algorithm=algorithm, state_dir=state_dir,
                                               storage_options=options or None)
        return store


def _locks_for(store: ObjectStore, lease_s: float) -> StoreLocks:
    # NOTE: per store object: its backend holds the S3 client.
    with _GUARD:
        per_lease = _LOCKS.setdefault(store, {})
        locks = per_lease.get(lease_s)
        if locks is None:
            locks = per_lease[lease_s] = StoreLocks(store.backend, lease_s=lease_s)
        return locks
