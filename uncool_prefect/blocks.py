"""``ContentAddressedStorage``: Prefect result storage over the object store.

Prefect hands a result storage block a key and a blob. Here the blob's *value*
is what gets addressed: when the blob is a whole ResultRecord (no
``key_storage`` configured), the serialized result goes into the object store
and the record's metadata into ``refs/<key>``; otherwise the blob itself is the
object. Either way, one value written by two tasks, two flows or two blocks on
the same base URL is stored once, and every read is verified against its hash.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any, Literal

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem
from prefect.types import SecretDict
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_aws import AwsCredentials
from pydantic import Field, PrivateAttr

from .settings import get_settings
from .store import ObjectStore, StoreError
from .store.gc import find_object_ids
from .store.keys import normalize_key

if TYPE_CHECKING:
    from .locking import StoreLockManager

_RECORD_KEYS = {"metadata", "result"}


class ContentAddressedStorage(WritableFileSystem):
    """Stores Prefect results by the hash of their content, verified on every read.

    Use it as ``result_storage`` of tasks and flows; ``block.store`` gives flows
    the object store for files and folders.

    Example:
        Load a saved block and persist task results through it:
        ```python
        from prefect import task
        from uncool_prefect import ContentAddressedStorage

        storage = ContentAddressedStorage.load("BLOCK_NAME")

        @task(result_storage=storage, persist_result=True)
        def add(x: int, y: int) -> int:
            return x + y
        ```
    """

    _block_type_name = "Content Addressed Storage"
    _block_type_slug = "content-addressed-storage"
    # NOTE: the package has no logo or docs site of its own yet; these are
    # Prefect's file-system logo and its page on result storage.
    _logo_url = "https://raw.githubusercontent.com/PrefectHQ/prefect/420d0d6a78bb6df1fc18bcf188fdad43c1d22ea9/assets/block-logos/filesystem.png"  # type: ignore[assignment]
    _documentation_url = "https://docs.prefect.io/v3/advanced/results"  # type: ignore[assignment]
    _description = (
        "Content-addressed, deduplicated result storage that verifies every read "
        "against the sha256 (or blake3) of the bytes. Works on a local folder or S3."
    )

    basepath: str = Field(
        default=...,
        title="Base URL",
        description="Where the store lives: a local folder, file://, s3://bucket/prefix "
        "or any fsspec URL.",
        examples=["/srv/uncool/store", "s3://my-bucket/uncool"],
    )
    aws_credentials: AwsCredentials | None = Field(
        default=None,
        title="AWS credentials",
        description="Credentials (and endpoint) for an s3:// base URL.",
    )
    storage_options: SecretDict = Field(
        default_factory=lambda: SecretDict({}),
        title="Storage options",
        description="Extra fsspec options for the filesystem; values are kept secret.",
    )
    algorithm: Literal["sha256", "blake3"] = Field(
        default="sha256",
        description="Hash algorithm naming the objects.",
    )
    verify_reads: bool = Field(
        default=True,
        title="Verify reads",
        description="Re-hash every object read and refuse bytes that do not match.",
    )

    _store: ObjectStore | None = PrivateAttr(default=None)

    @property
    def store(self) -> ObjectStore:
        """The object store behind this block (for files and folders in flows)."""
        if self._store is None:
            self._store = ObjectStore(
                self.basepath,
                algorithm=self.algorithm,
                storage_options=self._fsspec_options(),
                verify_reads=self.verify_reads,
            )
        return self._store

    @property
    def lock_manager(self) -> StoreLockManager:
        """Prefect's lock manager on this store (``locks/`` beside the results), for
        ``cache_policy.configure(isolation_level="SERIALIZABLE", lock_manager=...)``."""
        from .locking import StoreLockManager

        return StoreLockManager(self.store)

    def _fsspec_options(self) -> dict[str, Any]:
        options: dict[str, Any] = dict(self.storage_options.get_secret_value() or {})
        creds = self.aws_credentials
        if creds is not None and self.basepath.startswith(("s3://", "s3a://")):
            if creds.aws_access_key_id:
                options.setdefault("key", creds.aws_access_key_id)
            if creds.aws_secret_access_key:
                options.setdefault("secret", creds.aws_secret_access_key.get_secret_value())
            if creds.aws_session_token:
                token = creds.aws_session_token
                options.setdefault("token", getattr(token, "get_secret_value", lambda: token)())
            if creds.profile_name:
                options.setdefault("profile", creds.profile_name)
            client_kwargs = dict(options.get("client_kwargs") or {})
            if creds.region_name:
                client_kwargs.setdefault("region_name", creds.region_name)
            endpoint = creds.aws_client_parameters.endpoint_url
            if endpoint:
                client_kwargs.setdefault("endpoint_url", endpoint)
            options["client_kwargs"] = client_kwargs
        return options

    # -- Prefect's WritableFileSystem interface ------------------------------
    def _write(self, path: str, content: bytes) -> str:
        key = normalize_key(path, "result key")
        if _is_metadata_for(content, key) and self._holds_value(key):
            raise StoreError(
                f"result metadata for key {key!r} would overwrite the result itself: "
                "the cache policy's key_storage is this same ContentAddressedStorage. "
                "Drop key_storage (this block already keeps metadata apart from values) "
                "or point it at another base URL."
            )
        record = _split_result_record(content)
        if record is None:
            ref = self.store.put_bytes(content)
            kind = "metadata" if _is_metadata_for(content, key) else "value"
            self.store.set_ref(key, ref, kind=kind, links=_linked_objects(content),
                               **_run_context())
        else:
            metadata, serialized = record
            ref = self.store.put_bytes(serialized)
            self.store.set_ref(key, ref, kind="record", record_metadata=metadata,
                               links=_linked_objects(serialized), **_run_context())
        return key

    def _holds_value(self, key: str) -> bool:
        """True if ``refs/<key>`` already points at a result value (not metadata)."""
        try:
            return self.store.get_ref(key).get("kind") == "value"
        except FileNotFoundError:
            return False

    def _read(self, path: str) -> bytes:
        key = normalize_key(path, "result key")
        document = self.store.get_ref(key)
        data = self.store.get_bytes(document["oid"])
        if "record_metadata" in document:
            return json.dumps(
                {"metadata": document["record_metadata"], "result": data.decode("utf-8")}
            ).encode("utf-8")
        return data

    async def aread_path(self, path: str) -> bytes:
        """Read the content stored under ``path``, verified against its hash."""
        return await run_sync_in_worker_thread(self._read, path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:  # type: ignore[override]
        """Read the content stored under ``path``, verified against its hash."""
        return self._read(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        """Store ``content`` by its hash and point ``refs/<path>`` at it."""
        return await run_sync_in_worker_thread(self._write, path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:  # type: ignore[override]
        """Store ``content`` by its hash and point ``refs/<path>`` at it."""
        return self._write(path, content)


def _linked_objects(serialized: bytes) -> list[str]:
    """Object ids a result names (e.g. a stage returning a dataset id), for gc.

    Prefect's pickle serializer base64-encodes, so the decoded bytes are
    searched too; pickle keeps strings as plain UTF-8.
    """
    found = find_object_ids(serialized)
    with contextlib.suppress(binascii.Error, ValueError):
        found |= find_object_ids(base64.b64decode(serialized))
    return sorted(found)


def _json_object(content: bytes, marker: bytes) -> dict[str, Any] | None:
    """``content`` as a JSON object, if it is one that mentions ``marker``."""
    if not content.startswith(b"{") or marker not in content:
        return None
    try:
        document = json.loads(content)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _split_result_record(content: bytes) -> tuple[dict[str, Any], bytes] | None:
    """Return (metadata, serialized result) if ``content`` is a ResultRecord."""
    document = _json_object(content, b'"metadata"')
    if (
        document is not None
        and document.keys() == _RECORD_KEYS
        and isinstance(document["metadata"], dict)
        and isinstance(document["result"], str)
        and "serializer" in document["metadata"]
    ):
        return document["metadata"], document["result"].encode("utf-8")
    return None


_METADATA_KEYS = {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}


def _is_metadata_for(content: bytes, key: str) -> bool:
    """True if ``content`` is the ResultRecordMetadata of the result stored at ``key``."""
    document = _json_object(content, b'"storage_key"')
    return (
        document is not None
        and document.keys() == _METADATA_KEYS
        and document.get("storage_key") == key
    )


def _run_context() -> dict[str, Any]:
    """Who wrote a ref: the flow run, task run and task name, when known."""
    from prefect.context import FlowRunContext, TaskRunContext

    info: dict[str, Any] = {}
    task_ctx = TaskRunContext.get()
    if task_ctx is not None:
        info["task_run_id"] = str(task_ctx.task_run.id)
        info["task_name"] = task_ctx.task.name
        if task_ctx.task_run.flow_run_id:
            info["flow_run_id"] = str(task_ctx.task_run.flow_run_id)
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        info.setdefault("flow_run_id", str(flow_ctx.flow_run.id))
    return info


def ensure_store_block(block_name: str) -> ObjectStore:
    """Point the block ``block_name`` at the store the settings name; return that store."""
    return saved_store_block(block_name).store


# NOTE: (block name, store URL) -> (when, the saved block), so that `uncool run`
# and the pipeline it starts load the block from the server once. Kept a minute
# only: a long-lived process (the watcher) re-checks that no other project
# re-pointed the block.
_SAVED: dict[tuple[str, str], tuple[float, ContentAddressedStorage]] = {}
_SAVED_FOR_S = 60.0


def recently_loaded_store_block() -> ContentAddressedStorage | None:
    """The settings' block as :func:`saved_store_block` gave it this process in the last minute."""
    if not _SAVED:  # NOTE: a stage reads this on each task run: no settings read for nothing
        return None
    settings = get_settings()
    return _recently_saved(settings.block, settings.store_url)


def _recently_saved(block_name: str, store_url: str) -> ContentAddressedStorage | None:
    known = _SAVED.get((block_name, store_url))
    if known is not None and time.monotonic() - known[0] < _SAVED_FOR_S:
        return known[1]
    return None


def saved_store_block(block_name: str) -> ContentAddressedStorage:
    """The block ``block_name``, saved and pointing at the store the settings name.

    The block lives on the (often shared) Prefect server while the store and
    MLflow live with the project; a block left pointing at another project's
    store would hand this project cached results whose MLflow runs it lacks.
    A saved block is kept as it is (credentials included) when it already
    points at the right store.
    """
    import sys

    from prefect.exceptions import ObjectNotFound

    wanted = get_settings().store_url
    known = _recently_saved(block_name, wanted)
    if known is not None:
        return known
    try:
        block: ContentAddressedStorage | None = ContentAddressedStorage.load(block_name)  # type: ignore[assignment]
    except (ValueError, ObjectNotFound):
        block = None
    if block is not None and block.basepath == wanted:
        _SAVED[(block_name, wanted)] = (time.monotonic(), block)
        return block
    fresh = ContentAddressedStorage(basepath=wanted)
    fresh.save(block_name, overwrite=True)
    if block is not None:
        # NOTE: deployed runs load the block by name at run time: another
        # project's worker would now read and write this project's store.
        print(f"warning: block {block_name!r} pointed at {block.basepath}; it now points at "
              f"{wanted}. Projects that share a Prefect server need a block each, or "
              "their deployed runs use each other's store: unset UNCOOL_BLOCK (one block "
              "per store by default) or give each project its own.",
              file=sys.stderr)
    _SAVED[(block_name, wanted)] = (time.monotonic(), fresh)
    return fresh
