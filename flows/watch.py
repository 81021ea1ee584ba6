"""The dataset watcher as a Prefect flow: a long-running flow run on the work pool.

Deployed as ``uncool-watch/watch-issues`` (deployments/prefect.yaml) and started
by ``uncool deploy --watch URL``; it announces new content of the dataset at
``url`` as ``uncool.dataset.updated`` events, which start the pipeline.
Cancel the flow run to stop watching.
"""

from __future__ import annotations

from typing import cast

from prefect import flow, get_run_logger

from uncool_prefect import ContentAddressedStorage
from uncool_prefect.events import DatasetWatcher
from uncool_prefect.settings import get_settings


@flow(name="uncool-watch")
def watch_dataset(url: str, name: str = "issues", debounce: float = 0.5,
                  poll_interval: float = 2.0) -> None:
    """Watch a dataset and announce each new content once.

    Args:
        url: A local folder (on the worker's machine) or an s3:// prefix.
        name: The dataset's name; events are about ``uncool.dataset.<name>``.
        debounce: Seconds the data must stay unchanged before it is read.
        poll_interval: Seconds between listings of an s3:// prefix.
    """
    logger = get_run_logger()
    store = cast(ContentAddressedStorage, ContentAddressedStorage.load(get_settings().block)).store
    watcher = DatasetWatcher(url, name, store, debounce=debounce, poll_interval=poll_interval)
    logger.info("watching %s as uncool.dataset.%s (store %s)", url, name, store.url)
    watcher.run(on_result=lambda result: logger.info("%s", result.reason))
