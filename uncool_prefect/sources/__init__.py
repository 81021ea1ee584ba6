"""Where the issue labeler's data comes from: a folder or bucket, the GitHub API, or a sample.

Every source ends in the same place, a local dataset folder in the layout
``<label>/<id>.txt`` (or tables with ``text,label``) that :func:`load_examples`
reads into :class:`Example` objects. Nothing here imports Prefect at module
level; :func:`resolve_github_token` imports it lazily to read a ``Secret`` block.
"""

from __future__ import annotations

from .examples import DEFAULT_LABELS, DataError, Example
from .folder import load_examples, snapshot_folder, write_examples
from .github import fetch_issues, resolve_github_token
from .sample import write_sample, write_sample_day

__all__ = [
    "DEFAULT_LABELS",
    "DataError",
    "Example",
    "fetch_issues",
    "load_examples",
    "resolve_github_token",
    "snapshot_folder",
    "write_examples",
    "write_sample",
    "write_sample_day",
]
