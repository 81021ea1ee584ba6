"""The store, seen from Prefect: task results land in ContentAddressedStorage.

Run it twice (each time in a new process): the first run computes and stores
every result, the second finds them all by cache key and reads them back,
verified, from the store, so every task is `Cached`.

    uncool demo        # does exactly that, against a local Prefect server
    python -m uncool_prefect.project.store_demo   # one run
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from typing import Any

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

STORAGE = "content-addressed-storage/uncool-demo"
LABELS = ("storage", "compute", "display")
WORDS = {
    "storage": ["push", "pull", "remote", "s3", "cache", "checkout", "fetch"],
    "compute": ["run", "queue", "params", "metrics", "worker", "gpu", "batch"],
    "display": ["plot", "chart", "template", "axis", "render", "html", "image"],
}

stored: dict[str, Any] = {
    "result_storage": STORAGE,
    "cache_policy": INPUTS + TASK_SOURCE,
    "persist_result": True,
}


@task(**stored)
def make_titles(n: int, seed: int) -> list[tuple[str, str]]:
    """Short labelled texts, a stand-in for a real data source."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        rows.append((" ".join(rng.choices(WORDS[label], k=4)), label))
    return rows


@task(**stored)
def count_labels(rows: list[tuple[str, str]]) -> dict[str, int]:
    return dict(sorted(Counter(label for _, label in rows).items()))


@task(**stored)
def count_labels_again(rows: list[tuple[str, str]]) -> dict[str, int]:
    """Same value as count_labels: stored once, referenced twice."""
    return dict(sorted(Counter(label for _, label in rows).items()))


@flow(name="store-demo", log_prints=True)
def store_demo(n: int = 2000, seed: int = 7) -> dict[str, str]:
    rows_state = make_titles(n, seed, return_state=True)
    rows = rows_state.result()
    counts_state = count_labels(rows, return_state=True)
    again_state = count_labels_again(rows, return_state=True)
    print(f"label counts: {counts_state.result()}")
    return {
        "make_titles": str(rows_state.name),
        "count_labels": str(counts_state.name),
        "count_labels_again": str(again_state.name),
    }


if __name__ == "__main__":
    states = store_demo()
    # One machine-readable line for `uncool demo` (and anyone scripting this).
    sys.stdout.write("UNCOOL_DEMO_STATES " + json.dumps(states) + "\n")
