"""What every data source produces: labelled examples, and the one error they raise."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_LABELS: tuple[str, ...] = ("data-sync", "experiments", "plots")

_DIGITS = re.compile(r"(\d+)")


class DataError(ValueError):
    """The data is missing, unreadable or malformed; the message says what to do.

    Subclasses :class:`ValueError` so callers that know nothing of this package
    can still catch it. Raised ``from`` the low-level cause where there is one.
    """


@dataclass(frozen=True)
class Example:
    """One labelled issue title.

    Attributes:
        text: The issue title, stripped of surrounding whitespace.
        label: The one label the issue carries.
        id: A stable identifier, unique within a dataset (``d003-0007``, an
            issue number, or ``<file>:<row>`` for table rows without an id).
    """

    text: str
    label: str
    id: str


def id_sort_key(example_id: str) -> tuple[tuple[int, int, str], ...]:
    """Natural sort key: ``"9" < "10"``, ``"d002-0010" < "d010-0001"``; total and stable.

    Args:
        example_id: The id to order.

    Returns:
        A key whose digit runs compare as numbers, then the raw id breaks ties.

    >>> sorted(["10", "9", "d2", "d10"], key=id_sort_key)
    ['9', '10', 'd2', 'd10']
    """
    parts = tuple(
        (0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk)
        for chunk in _DIGITS.split(example_id)
        if chunk
    )
    return (*parts, (2, 0, example_id))


def sort_examples(examples: Iterable[Example]) -> list[Example]:
    """Return the examples sorted by :func:`id_sort_key` of their id."""
    return sorted(examples, key=lambda example: id_sort_key(example.id))


def check_name(kind: str, name: str) -> str:
    """Check that a label or id can be a single file or folder name.

    Args:
        kind: ``"label"`` or ``"id"``, for the message.
        name: The value to check.

    Returns:
        ``name`` unchanged.

    Raises:
        DataError: If it is empty, hidden, ``.``/``..``, or holds a separator or NUL.
    """
    if (
        not name
        or name != name.strip()
        or name.startswith(".")
        or any(char in name for char in "/\\\0")
    ):
        raise DataError(
            f"{kind} {name!r} cannot be used as a file or folder name; use a non-empty "
            "name without '/', '\\', NUL, surrounding spaces or a leading '.'"
        )
    return name


def check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Validate a list of target labels: at least two, distinct, usable as folder names.

    Args:
        labels: The labels a classifier will choose between.

    Returns:
        The labels as a tuple, in the given order.

    Raises:
        DataError: If there are fewer than two, duplicates, or unusable names.
    """
    if isinstance(labels, str):
        raise DataError(f"labels must be a list of names, not the string {labels!r}")
    result = tuple(check_name("label", label) for label in labels)
    if len(set(result)) != len(result):
        raise DataError(f"labels {list(result)} contain duplicates; give each label once")
    if len(result) < 2:
        raise DataError(
            f"labels {list(result)} name fewer than two labels; a classifier needs at least two"
        )
    return result
