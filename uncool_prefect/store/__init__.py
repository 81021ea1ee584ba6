"""Content-addressed object store. Knows nothing of Prefect or MLflow."""

from .errors import (
    CorruptObjectError,
    InvalidKeyError,
    LockNotHeldError,
    ObjectNotFoundError,
    StoreError,
    StoreFullError,
    StorePermissionError,
    StoreUnavailableError,
)
from .gc import GcReport
from .hashing import Manifest, ManifestEntry, StatCache, hash_bytes, hash_file
from .keys import parse_oid, validate_relpath
from .locks import LockInfo, StoreLocks
from .objects import ObjectInfo, ObjectRef, ObjectStore, Problem, Usage

__all__ = [
    "CorruptObjectError",
    "GcReport",
    "InvalidKeyError",
    "LockInfo",
    "LockNotHeldError",
    "Manifest",
    "ManifestEntry",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectRef",
    "ObjectStore",
    "Problem",
    "StatCache",
    "StoreError",
    "StoreFullError",
    "StoreLocks",
    "StorePermissionError",
    "StoreUnavailableError",
    "Usage",
    "hash_bytes",
    "hash_file",
    "parse_oid",
    "validate_relpath",
]
