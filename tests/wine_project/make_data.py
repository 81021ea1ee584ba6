"""Data for the wine project: scikit-learn's bundled wine table as CSV files (no network)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_wine_csvs(dest: Path, parts: int = 2) -> None:
    """Write ``load_wine()`` into ``dest`` as ``part-1.csv`` .. ``part-<parts>.csv``.

    Row ``i`` goes to part ``i % parts + 1``, so every part holds every class.
    Each file has a header (the 13 feature names, then ``target``); the bytes
    are the same on every call.
    """
    from sklearn.datasets import load_wine

    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    wine = load_wine()
    header = [*wine.feature_names, "target"]
    dest.mkdir(parents=True, exist_ok=True)
    for part in range(parts):
        with (dest / f"part-{part + 1}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            for index in range(part, len(wine.target), parts):
                writer.writerow([*(repr(float(v)) for v in wine.data[index]), int(wine.target[index])])
