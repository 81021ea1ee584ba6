"""Local writes that a crash cannot leave half done: temp name, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from .examples import DataError


def write_text_atomic(path: Path, text: str) -> bool:
    """Write ``text`` (UTF-8) to ``path`` through a temp file and a rename.

    Args:
        path: The final file; its folder is created if missing.
        text: The content.

    Returns:
        False if the file already held exactly these bytes (it is left untouched,
        so its mtime does not change and watchers see no new data), else True.
    """
    data = text.encode("utf-8")
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def replace_dir(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder under a temp name next to ``dest``, then swap it into place.

    Readers of ``dest`` see either the old folder or the complete new one, never
    a half-written one (two renames; the gap between them is a moment in which
    ``dest`` does not exist, not one in which it is partial).

    Args:
        dest: The folder to create or replace.
        build: Fills the empty temp folder it is given.

    Returns:
        ``dest``.

    Raises:
        DataError: If ``dest`` exists and is not a folder.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DataError(f"{dest} exists and is not a folder; remove it or choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dest.parent / f".{dest.name}.new-{tag}"
    old = dest.parent / f".{dest.name}.old-{tag}"
    tmp.mkdir()
    try:
        build(tmp)
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dest
