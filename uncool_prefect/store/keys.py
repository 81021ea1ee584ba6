"""Validation of everything a caller can use to name something in the store.

Every ref key, manifest path and object id goes through here before any I/O,
with one stable error message per kind of mistake.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from .errors import InvalidKeyError

_HEX_LENGTH = 64  # sha256 and blake3 (default length) both give 256-bit digests
_OID = re.compile(rf"^[0-9a-f]{{{_HEX_LENGTH}}}$")
DIR_SUFFIX = ".dir"


def validate_relpath(path: str, what: str = "path") -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a folder.

    Rejected: empty, absolute, ``..`` segments (also percent-encoded), backslashes,
    NUL and other control characters, empty or ``.`` segments.
    """
    if not isinstance(path, str) or not path:
        raise InvalidKeyError(f"{what} is empty; give a relative name such as 'a/b'")
    reason = _unsafe_reason(path)
    if reason is None and "%" in path:
        # NOTE: keys are also used in URLs (S3, the Prefect API); a percent-encoded
        # escape must not become a real one further down.
        reason = _unsafe_reason(unquote(path))
    if reason is not None:
        raise InvalidKeyError(
            f"{what} {path!r} is not allowed: {reason}. Use a relative name made of "
            "'/'-separated parts without '..', backslashes or control characters."
        )
    return path


def normalize_key(path: str, what: str = "key") -> str:
    """``path`` with harmless spelling removed (``./`` parts, repeated ``/``), then validated.

    What a local file system would accept as the same name inside the base
    (``./out/1``, ``a//b``) names the same key here; anything that could leave
    the base (``..``, absolute, encoded dots, backslashes, NUL) is still refused.
    """
    if isinstance(path, str) and path and not path.startswith("/") and "\\" not in path:
        # NOTE: '.' parts go only after checking that no encoded form hides a '..'.
        parts = [part for part in path.split("/") if part not in ("", ".")]
        if parts and not any(_unsafe_reason(unquote(part)) for part in parts):
            path = "/".join(parts)
    return validate_relpath(path, what)


def _unsafe_reason(path: str) -> str | None:
    if "\x00" in path:
        return "it contains a NUL byte"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        return "it contains a control character"
    if "\\" in path:
        return "it contains a backslash"
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return "it is absolute"
    parts = path.split("/")
    if any(part == ".." for part in parts):
        return "it climbs out of its folder with '..'"
    if any(part in ("", ".") for part in parts):
        return "it has an empty or '.' part"
    return None


def parse_oid(oid: str) -> tuple[str, bool]:
    """Split an object id into ``(hexdigest, is_dir)``; raise on anything else."""
    text = oid.strip().lower() if isinstance(oid, str) else ""
    is_dir = text.endswith(DIR_SUFFIX)
    digest = text[: -len(DIR_SUFFIX)] if is_dir else text
    if not _OID.match(digest):
        raise InvalidKeyError(
            f"{oid!r} is not an object id: expected {_HEX_LENGTH} hex digits "
            f"(optionally followed by {DIR_SUFFIX!r}), as printed by `uncool store put`"
        )
    return digest, is_dir
