"""The store's small exception set.

Every error a caller can act on is one of these, chained ``from`` the low-level
cause. Where the meaning fits, they subclass the builtin (as s3fs does), so
``except FileNotFoundError`` keeps working for code that knows nothing of us.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by the object store."""


class ObjectNotFoundError(StoreError, FileNotFoundError):
    """The object (or ref) is not in the store."""

    def __init__(self, oid: str, url: str, hint: str = "") -> None:
        self.oid = oid
        self.url = url
        message = f"object {oid} is not in the store at {url}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)

    def __str__(self) -> str:  # FileNotFoundError would format errno/filename
        return str(self.args[0])


class CorruptObjectError(StoreError):
    """The bytes stored under an object id do not hash to that id.

    Raised by every read before the corrupt bytes reach the caller.
    """

    def __init__(self, oid: str, expected: str, actual: str, url: str) -> None:
        self.oid = oid
        self.expected = expected
        self.actual = actual
        self.url = url
        self.moved_to: str | None = None
        super().__init__(
            f"object {oid} is corrupt: expected hash {expected}, got {actual} "
            f"reading {url}. Run `uncool store verify` to list every damaged object, "
            "then put the original data again to repair it."
        )


class StorePermissionError(StoreError, PermissionError):
    """The store refused access (file mode, bucket policy, credentials)."""

    def __str__(self) -> str:
        return str(self.args[0])


class StoreUnavailableError(StoreError):
    """The store could not be reached or did not answer in time (after retries)."""


class StoreFullError(StoreError):
    """The store's device has no space left; retrying will not help."""


class InvalidKeyError(StoreError, ValueError):
    """A key or object id is malformed or tries to leave the store's folder."""


class LockNotHeldError(StoreError, ValueError):
    """A lock was released (or renewed) by someone who does not hold it.

    A ``ValueError`` too, as Prefect's own lock managers raise.
    """

    def __init__(self, key: str, holder: str, url: str, current: object = None) -> None:
        self.key = key
        self.holder = holder
        self.url = url
        self.current = current
        if current is None:
            who = "nobody holds it (released, or its lease expired)"
        else:
            who = (f"it is held by {getattr(current, 'holder', '?')} (host "
                   f"{getattr(current, 'host', '?')}, pid {getattr(current, 'pid', '?')})")
        super().__init__(f"cannot release lock {key!r} in the store at {url} for {holder}: {who}")
