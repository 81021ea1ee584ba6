"""What every ``uncool`` command module shares: the app, the consoles, common options."""

from __future__ import annotations

import re
from typing import Annotated

import cyclopts
from cyclopts import Parameter
from rich.console import Console

from ..settings import open_store
from ..store import ObjectStore, StoreError

app = cyclopts.App(
    name="uncool",
    help="Content-addressed, verified ML artifacts, caching and run records for Prefect.",
    version_flags=["--version"],
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Basepath = Annotated[
    str | None,
    Parameter(help="Store URL: a folder or s3://bucket/prefix. Default: UNCOOL_STORE, "
              "else .uncool/store."),
]


def open_cli_store(basepath: str | None) -> ObjectStore:
    """The store a command works on: ``--basepath``, else the configured one."""
    return open_store(basepath)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '1h', '2d' -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise StoreError(f"cannot read duration {text!r}; use e.g. 90s, 30m, 1h or 2d")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * scale


