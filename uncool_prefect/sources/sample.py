r"""Synthetic issue titles, one day at a time, for the demo and the tests.

Each day brings ``per_day`` new issues in the folder layout the pipeline reads,
``<label>/<id>.txt``, with ids ``d<day>-<n>`` (``d003-0007``) so that days
accumulate in one folder without overwriting each other. The titles look like
a DVC issue tracker's; about 9% are filed under the wrong label (label noise),
about 8% could belong to any label, and later days bring new terms and shift
word frequencies (drift), so a TF-IDF + logistic-regression model gets a
realistic score, not a perfect one.

Output depends only on ``(seed, day, labels, per_day)``: same bytes every run,
on every machine (the RNG is seeded from a SHA-256 of those, not from ``hash``).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     paths = write_sample_day(tmp, day=3, per_day=4)
...     for path in paths:
...         print(path.relative_to(tmp).as_posix())
...     print(repr(paths[0].read_text()))
data-sync/d003-0002.txt
data-sync/d003-0003.txt
experiments/d003-0001.txt
experiments/d003-0004.txt
'support resumable transfers for SSH remotes\n'
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Sequence
from pathlib import Path

from . import _vocab
from ._files import write_text_atomic
from .examples import DEFAULT_LABELS, DataError, check_labels

LABEL_NOISE = 0.09  # share of titles drawn from another label's vocabulary
AMBIGUOUS = 0.08  # share of titles from the generic, label-free vocabulary
MAX_TREND_WEIGHT = 4.0
MIN_TREND_WEIGHT = 0.05
MAX_PER_DAY = 9999  # ids have four digits

_FORMATTER = string.Formatter()
_SPACES = re.compile(r"\s+")


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256(":".join(map(str, ("uncool-sample", *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _weight(since: int, trend: float, day: int) -> float:
    if day < since:
        return 0.0
    return min(MAX_TREND_WEIGHT, max(MIN_TREND_WEIGHT, trend ** (day - since)))


def _pick(rng: random.Random, choices: list[_vocab.Term], day: int) -> str:
    weights = [_weight(since, trend, day) for _, since, trend in choices]
    return rng.choices([text for text, _, _ in choices], weights=weights)[0]


def _fill(rng: random.Random, template: str, slots: _vocab.Vocab, day: int) -> str:
    values: dict[str, str] = {}
    for _, field, _, _ in _FORMATTER.parse(template):
        if field and field not in values:
            values[field] = _pick(rng, slots[field], day)
    title = _SPACES.sub(" ", template.format(**values)).strip()
    # NOTE: real titles are capitalised about a third of the time; TF-IDF
    # lowercases, but people reading the files see realistic text.
    if rng.random() < 0.3:
        title = title[:1].upper() + title[1:]
    return title


class _Vocabularies:
    """Templates and slots for every label of one sample, fallbacks included."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.templates: dict[str, list[str]] = {}
        self.slots: dict[str, _vocab.Vocab] = {}
        for label in labels:
            if label in _vocab.TEMPLATES:
                self.templates[label] = _vocab.TEMPLATES[label]
                self.slots[label] = {**_vocab.SHARED, **_vocab.SLOTS[label]}
            else:
                self.templates[label] = _vocab.FALLBACK_TEMPLATES
                self.slots[label] = self._fallback_slots(label)
        self.generic_slots = {**_vocab.SHARED, **_vocab.GENERIC_SLOTS}

    @staticmethod
    def _fallback_slots(label: str) -> _vocab.Vocab:
        topic = re.sub(r"[-_.]+", " ", label).strip() or label
        nouns = _rng("fallback", label).sample(_vocab.FALLBACK_NOUNS, 8)
        return {
            **_vocab.SHARED,
            **_vocab.FALLBACK_SLOTS,
            "topic": _vocab.terms(topic),
            "fb_noun": [(noun, 1, 1.0 + 0.1 * rank) for rank, noun in enumerate(nouns)],
        }

    def title(self, rng: random.Random, label: str, day: int) -> str:
        roll = rng.random()
        if roll < AMBIGUOUS:
            template = rng.choice(_vocab.GENERIC_TEMPLATES)
            return _fill(rng, template, self.generic_slots, day)
        source = label
        if roll < AMBIGUOUS + LABEL_NOISE:
            source = rng.choice([other for other in self.labels if other != label])
        template = rng.choice(self.templates[source])
        return _fill(rng, template, self.slots[source], day)


def sample_id(day: int, number: int) -> str:
    """The id of issue ``number`` (1-based) of sample day ``day``: ``d003-0007``."""
    return f"d{day:03d}-{number:04d}"


def write_sample_day(
    dest: str | Path,
    day: int,
    seed: int = 0,
    labels: Sequence[str] = DEFAULT_LABELS,
    per_day: int = 60,
) -> list[Path]:
    """Write the issues that "arrived" on one day into ``dest/<label>/<id>.txt``.

    Files of other days are left alone; a file that already holds the same bytes
    is not rewritten (its mtime stays), so re-running a day is a no-op for
    watchers. Each file holds one title, UTF-8, with a trailing newline.

    Args:
        dest: The dataset folder (created if missing).
        day: Day number, 1 or more. Later days use newer vocabulary.
        seed: Selects one of many reproducible datasets.
        labels: The labels to file issues under. Labels other than the defaults
            get a generated vocabulary built around the label's own words.
        per_day: How many issues the day brings (1 to 9999).

    Returns:
        The paths of the day's files, sorted.

    Raises:
        DataError: If ``day`` < 1, ``per_day`` is out of range, or the labels
            are fewer than two, duplicated, or not usable as folder names.
    """
    if isinstance(day, bool) or not isinstance(day, int) or day < 1:
        raise DataError(f"day must be an integer >= 1 (day 1 is the first day of data), got {day!r}")
    if isinstance(per_day, bool) or not isinstance(per_day, int) or not 1 <= per_day <= MAX_PER_DAY:
        raise DataError(f"per_day must be an integer from 1 to {MAX_PER_DAY}, got {per_day!r}")
    checked = check_labels(labels)
    vocabularies = _Vocabularies(checked)
    rng = _rng(seed, day, per_day, *checked)
    root = Path(dest)
    written: list[Path] = []
    for number in range(1, per_day + 1):
        label = rng.choice(checked)
        title = vocabularies.title(rng, label, day)
        path = root / label / f"{sample_id(day, number)}.txt"
        write_text_atomic(path, title + "\n")
        written.append(path)
    return sorted(written)


def write_sample(
    dest: str | Path,
    days: int,
    seed: int = 0,
    labels: Sequence[str] = DEFAULT_LABELS,
    per_day: int = 60,
) -> list[Path]:
    """Write days ``1..days`` of the sample dataset into ``dest``.

    Args:
        dest: The dataset folder (created if missing).
        days: How many days, 1 or more.
        seed: Selects one of many reproducible datasets.
        labels: The labels to file issues under (see :func:`write_sample_day`).
        per_day: Issues per day.

    Returns:
        Every path written, sorted.

    Raises:
        DataError: As :func:`write_sample_day`, or if ``days`` < 1.
    """
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise DataError(f"days must be an integer >= 1, got {days!r}")
    paths: list[Path] = []
    for day in range(1, days + 1):
        paths.extend(write_sample_day(dest, day, seed=seed, labels=labels, per_day=per_day))
    return sorted(paths)
