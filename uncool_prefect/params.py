"""The pipeline's configuration: load ``params.yaml``, apply ``-S key=value``, hash.

Overrides work like ``dvc exp run -S``: dotted keys that must already exist,
values parsed as YAML and checked against the type of the value they replace.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """The configuration or an override is wrong; the message says how to fix it."""


def load_params(path: str | Path) -> dict[str, Any]:
    source = Path(path)
    try:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ParamsError(f"no params file at {source}; pass --params FILE") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise ParamsError(f"{source} must hold a mapping of sections (data, split, train, ...)")
    return document


def flatten(params: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from flatten(value, dotted + ".")
        else:
            yield dotted, value


def _type_ok(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float) and isinstance(new, int):
        return True
    return isinstance(new, type(old))


def apply_overrides(params: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``params`` with ``key=value`` overrides applied."""
    result = copy.deepcopy(params)
    valid = dict(flatten(params))
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParamsError(f"override {override!r} is not KEY=VALUE, e.g. -S train.C=2.0")
        if key not in valid:
            raise ParamsError(
                f"unknown parameter {key!r}; valid keys: {', '.join(sorted(valid))}"
            )
        if isinstance(valid[key], str) and raw.strip() not in ("null", "~", ""):
            # NOTE: a string stays a string: YAML would turn 2024-01-01 into a date.
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as exc:
                raise ParamsError(f"cannot read the value of {key}: {raw!r} ({exc})") from exc
        if isinstance(valid[key], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(valid[key], value):
            raise ParamsError(
                f"{key} expects a {type(valid[key]).__name__} (now {valid[key]!r}), "
                f"got {raw!r}"
            )
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return result


def params_hash(params: dict[str, Any]) -> str:
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def diff_params(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every value that differs."""
    before, after = dict(flatten(old)), dict(flatten(new))
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }
