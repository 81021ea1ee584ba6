"""A Rich progress bar behind fsspec's ``Callback`` interface.

The store reports progress through fsspec callbacks (as s3fs transfers do);
this one draws a bar on stderr, but only for work that lasts over a second,
so quick commands stay quiet.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from fsspec.callbacks import Callback
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

SHOW_AFTER_S = 1.0


class RichCallback(Callback):
    def __init__(self, description: str, console: Console | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._description = description
        self._console = console or Console(stderr=True)
        self._started = time.monotonic()
        self._progress: Progress | None = None
        self._task: Any = None

    def _maybe_show(self) -> None:
        if self._progress is not None or time.monotonic() - self._started < SHOW_AFTER_S:
            return
        if not self._console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(),
            console=self._console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self._description, total=self.size, completed=self.value)

    def call(self, *args: Any, **kwargs: Any) -> None:
        self._maybe_show()
        if self._progress is not None:
            self._progress.update(self._task, total=self.size, completed=self.value)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> RichCallback:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
