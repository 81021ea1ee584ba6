"""Datasets as folders: snapshot one from any fsspec URL, load examples from it.

A dataset folder holds either or both of:

- the label layout ``<label>/<id>.txt``: one example per file, the label is the
  folder name, the id the file name without ``.txt``, the text the file's
  content;
- ``.csv`` files (header row with ``text`` and ``label``, optional ``id``) and
  ``.jsonl`` files (one object per line with ``text`` and ``label``, optional
  ``id``) at any depth.

Everything else is ignored: hidden files and folders (``.git``, ``.dvc``),
other extensions, and ``.txt`` files outside the layout (the last with a
warning, since they are usually a mistake).

Decisions a user can rely on:

- Texts are stripped. An example whose text is empty after stripping is
  skipped with a warning, not an error: it carries no signal, and one stray
  empty file should not stop an automated retrain. A missing or empty *label*
  is an error.
- Ids must be unique across the dataset; a table row without an ``id`` gets
  ``<relative file path>:<row>`` (1-based, header not counted).
- Examples come back sorted by id (digit runs compare as numbers).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from ._files import replace_dir, write_text_atomic
from .examples import DataError, Example, check_name, sort_examples

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".jsonl")
LOCAL_PROTOCOLS = ("file", "local")
_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerDisconnectedError", "ConnectionError", "TimeoutError",
}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _decode(path: Path, rel: str, data: bytes, encoding: str = "utf-8") -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{rel} is not valid UTF-8 (bad byte at offset {exc.start}); "
            f"re-save it as UTF-8 (file: {path})"
        ) from exc


class _Loader:
    def __init__(self, root: Path, labels: Sequence[str] | None) -> None:
        self.root = root
        self.labels = None if labels is None else tuple(labels)
        self.examples: list[Example] = []
        self.sources: dict[str, str] = {}
        self.skipped_empty: list[str] = []

    def add(self, text: str, label: str, example_id: str, where: str) -> None:
        label = label.strip()
        if not label:
            raise DataError(f"{where} has an empty label; give every example one of its labels")
        if self.labels is not None and label not in self.labels:
            raise DataError(
                f"unknown label {label!r} in {where}; valid labels are {list(self.labels)}. "
                "Fix the data or add the label to the configured labels."
            )
        text = text.strip()
        if not text:
            self.skipped_empty.append(where)
            return
        if example_id in self.sources:
            raise DataError(
                f"duplicate id {example_id!r}: in {self.sources[example_id]} and in {where}; "
                "each example needs a unique id (rename one of them)"
            )
        self.sources[example_id] = where
        self.examples.append(Example(text=text, label=label, id=example_id))

    def read_text_file(self, path: Path, rel: str) -> None:
        label, name = rel.split("/")
        self.add(_decode(path, rel, path.read_bytes()), label, name[: -len(".txt")], rel)

    def read_csv(self, path: Path, rel: str) -> None:
        text = _decode(path, rel, path.read_bytes(), "utf-8-sig")
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = [name.strip() for name in next(reader, [])]
            _require_columns(rel, header, "columns")
            index = {name: position for position, name in enumerate(header)}
            for number, row in enumerate(reader, start=1):
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"row {number} of {rel} has {len(row)} fields, the header has "
                        f"{len(header)}; quote texts that contain commas"
                    )
                row_id = row[index["id"]].strip() if "id" in index else ""
                self.add(row[index["text"]], row[index["label"]], row_id or f"{rel}:{number}",
                         f"row {number} of {rel}")
        except csv.Error as exc:
            raise DataError(f"{rel} is not valid CSV (line {reader.line_num}): {exc}") from exc

    def read_jsonl(self, path: Path, rel: str) -> None:
        lines = _decode(path, rel, path.read_bytes(), "utf-8-sig").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"line {number} of {rel} is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise DataError(f"line {number} of {rel} is not a JSON object with text and label")
            _require_columns(f"line {number} of {rel}", list(record), "fields")
            text, label = record["text"], record["label"]
            if not isinstance(text, str) or not isinstance(label, str):
                raise DataError(f"line {number} of {rel}: text and label must be strings")
            row_id = record.get("id")
            example_id = str(row_id).strip() if isinstance(row_id, str | int) else ""
            self.add(text, label, example_id or f"{rel}:{number}", f"line {number} of {rel}")


def _require_columns(where: str, found: list[str], kind: str) -> None:
    missing = [name for name in ("text", "label") if name not in found]
    if missing:
        raise DataError(
            f"{where} lacks the {kind} {missing}; it needs 'text' and 'label' "
            f"(optional 'id'), found {found}"
        )


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    """Every non-hidden file under ``root`` as (path, posix path relative to root), sorted."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        base = Path(folder)
        for name in sorted(files):
            if not name.startswith("."):
                path = base / name
                yield path, path.relative_to(root).as_posix()


def load_examples(root: str | Path, labels: Sequence[str] | None = None) -> list[Example]:
    """Read every example of a local dataset folder (layout in the module docstring).

    Args:
        root: The dataset folder.
        labels: The valid labels; an example with another label is an error.
            ``None`` accepts any label.

    Returns:
        The examples, texts stripped, sorted by id.

    Raises:
        DataError: If the folder is missing, a file is not UTF-8, a table lacks
            ``text``/``label``, a label is unknown or empty, an id repeats, there
            are no examples, or fewer than two distinct labels.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"dataset folder {root} {what}; run get-data first or fix the path")
    loader = _Loader(root, labels)
    stray: list[str] = []
    for path, rel in _walk(root):
        suffix = PurePosixPath(rel).suffix.lower()
        if suffix == ".txt" and rel.count("/") == 1:
            loader.read_text_file(path, rel)
        elif suffix == ".csv":
            loader.read_csv(path, rel)
        elif suffix == ".jsonl":
            loader.read_jsonl(path, rel)
        elif suffix == ".txt":
            stray.append(rel)
    if stray:
        logger.warning("ignored %d .txt file(s) outside the <label>/<id>.txt layout under %s: %s",
                       len(stray), root, ", ".join(stray[:5]))
    skipped = loader.skipped_empty
    if skipped:
        logger.warning("skipped %d example(s) with empty text under %s: %s",
                       len(skipped), root, ", ".join(skipped[:5]))
    if not loader.examples:
        extra = f" ({len(skipped)} with empty text were skipped)" if skipped else ""
        raise DataError(
            f"dataset is empty: no examples under {root}{extra}; expected <label>/<id>.txt "
            "files, or .csv/.jsonl files with text and label"
        )
    found = sorted({example.label for example in loader.examples})
    if len(found) < 2:
        raise DataError(
            f"dataset under {root} has only one label ({found[0]!r}, {len(loader.examples)} "
            "examples); a classifier needs examples of at least two labels"
        )
    return sort_examples(loader.examples)


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _fs_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        # NOTE: bounded, quick failure for a wrong endpoint: botocore's standard
        # retries, a short connect timeout, and no stale listings between snapshots.
        config = dict(options.pop("config_kwargs", None) or {})
        config.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
        config.setdefault("connect_timeout", 5)
        options["config_kwargs"] = config
        options.setdefault("use_listings_cache", False)
    return options


@contextlib.contextmanager
def _remote_errors(url: str, endpoint: str | None) -> Iterator[None]:
    where = f"{url} (endpoint {endpoint})" if endpoint else url
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{where} disappeared while it was copied ({exc}); try again") from exc
    except PermissionError as exc:
        raise DataError(
            f"access denied to {where}; check the credentials (storage_options, AWS_* "
            "variables, an AwsCredentials block) and the bucket policy"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read {where}: {exc}; check the URL and try again") from exc
    except Exception as exc:
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & _CREDENTIAL_ERRORS:
            raise DataError(
                f"no credentials to read {where}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or pass key/secret in storage_options"
            ) from exc
        if names & _CONNECTION_ERRORS:
            raise DataError(
                f"cannot reach {where}: {exc}. Check that the endpoint is up, the URL is "
                "right and the network allows the connection."
            ) from exc
        raise


def snapshot_folder(url: str, dest: Path, storage_options: dict[str, Any] | None = None) -> Path:
    """Make a local, read-only-by-convention copy of a dataset folder at any fsspec URL.

    A local path (or ``file://`` URL) is not copied: its path is returned as is
    and ``dest`` is left untouched, since the content hash of the folder is what
    pins the data. Any other URL (``s3://bucket/prefix``, ``gs://``, ...) is
    copied file by file into a temp folder next to ``dest`` that then replaces
    ``dest`` whole, so ``dest`` is never a half-copied mix of two snapshots.

    Args:
        url: The folder: a local path, ``file://``, ``s3://bucket/prefix``, ...
        dest: Local folder to hold the copy (replaced if it exists).
        storage_options: Passed to fsspec (for S3: ``key``, ``secret``,
            ``client_kwargs={"endpoint_url": ...}``, ...). Never echoed in errors.

    Returns:
        The local folder holding the snapshot: ``dest``, or the local path itself.

    Raises:
        DataError: If the URL's protocol is unknown, the folder does not exist,
            access is denied, credentials are missing, or the endpoint cannot be
            reached (message names the URL and what to do).
    """
    local = _local_path(url)
    if local is not None:
        path = Path(local).expanduser()
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise DataError(f"dataset folder {url} {what}; check the path or create it first")
        return path.absolute()
    options = _fs_options(url, storage_options)
    endpoint = (options.get("client_kwargs") or {}).get("endpoint_url") or options.get("endpoint_url")
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise DataError(
            f"cannot open {url}: {exc}; use a local path or a URL such as s3://bucket/prefix "
            "(and install the fsspec package for its protocol)"
        ) from exc
    root = root.rstrip("/")
    dest = Path(dest)
    listing_file = dest.parent / f".{dest.name}.listing.json"
    previous = _read_listing(listing_file)
    listing: dict[str, dict[str, Any]] = {}
    copied = reused = 0

    def build(tmp: Path) -> None:
        nonlocal copied, reused
        with _remote_errors(url, endpoint):
            if not fs.isdir(root):
                if fs.isfile(root):
                    raise DataError(f"{url} is a file, not a folder; give the folder that holds the data")
                raise DataError(
                    f"no folder at {url}: the bucket or prefix does not exist or is empty; "
                    "check the URL, or upload the data there first"
                )
            remotes: list[str] = []
            locals_: list[str] = []
            for remote, info in sorted(fs.find(root, detail=True).items()):
                rel = remote[len(root):].strip("/")
                if not rel or remote.endswith("/") or info.get("type") == "directory":
                    continue  # a "folder marker" object, not data
                parts = rel.split("/")
                if any(part in ("", ".", "..") for part in parts):
                    raise DataError(f"{url} holds an object with an unsafe name {rel!r}; rename it")
                target = tmp.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                version = _version_of(info)
                if version and _reuse(previous.get(rel), version, dest.joinpath(*parts), target):
                    reused += 1
                else:
                    remotes.append(remote)
                    locals_.append(str(target))
                listing[rel] = {"version": version}
            if remotes:
                # One call for the batch: async filesystems (s3fs) fetch concurrently.
                fs.get(remotes, locals_)
                copied = len(remotes)
            for rel, entry in listing.items():
                stat = tmp.joinpath(*rel.split("/")).stat()
                entry.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        # The old listing goes just before the swap: a crash between the swap
        # and the new listing must not leave one that vouches for files it never
        # saw, while a snapshot that fails earlier keeps it for the next try.
        listing_file.unlink(missing_ok=True)

    replace_dir(dest, build)
    write_text_atomic(listing_file, json.dumps(listing, sort_keys=True))
    logger.info("snapshot of %s: %d file(s) copied, %d unchanged kept, in %s",
                url, copied, reused, dest)
    return dest


def _version_of(info: dict[str, Any]) -> str:
    """What changes whenever an object's bytes do: its ETag (S3, GCS) or checksum; else ''."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "content_md5"):
        if info.get(key):
            return f"{key}:{info[key]}:{info.get('size')}"
    return ""


def _reuse(previous: dict[str, Any] | None, version: str, old: Path, target: Path) -> bool:
    """Link the last snapshot's copy of an unchanged object into the new one.

    Only when the remote version matches and the local copy is still the file
    that was downloaded (size and mtime as recorded): an edited copy is fetched
    again rather than trusted.
    """
    if not previous or previous.get("version") != version:
        return False
    try:
        stat = old.stat()
        if (stat.st_size, stat.st_mtime_ns) != (previous.get("size"), previous.get("mtime_ns")):
            return False
        try:
            os.link(old, target)
        except OSError:
            shutil.copy2(old, target)
    except OSError:
        return False
    return True


def _read_listing(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_examples(examples: Sequence[Example], dest: str | Path) -> None:
    """Write examples as a ``<label>/<id>.txt`` dataset folder, replacing ``dest`` whole.

    The folder is built under a temp name next to ``dest`` and renamed into
    place, so a reader (or a snapshot) never sees a half-written dataset.
    :func:`load_examples` reads it back to the same examples.

    Args:
        examples: The examples; ids must be unique and usable as file names.
        dest: The dataset folder to create or replace.

    Raises:
        DataError: If there are no examples (``dest`` is left as it was), an id
            repeats, or a label or id cannot be a file name.
    """
    if not examples:
        raise DataError(f"no examples to write to {dest}; it was left unchanged")
    seen: set[str] = set()
    for example in examples:
        check_name("label", example.label)
        check_name("id", example.id)
        if example.id in seen:
            raise DataError(f"duplicate id {example.id!r}; each example needs a unique id")
        seen.add(example.id)

    def build(tmp: Path) -> None:
        for example in examples:
            folder = tmp / example.label
            folder.mkdir(exist_ok=True)
            (folder / f"{example.id}.txt").write_text(example.text.strip() + "\n", encoding="utf-8")

    replace_dir(Path(dest), build)
    logger.info("wrote %d example(s) to %s", len(examples), dest)
