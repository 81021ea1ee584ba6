"""A project's ``[tool.uncool]`` table: which flow is its pipeline, its params, its model.

```toml
[tool.uncool]
pipeline = "flows/train.py:train"   # entrypoint, as in prefect.yaml
params = "flows/params.yaml"         # optional: its top-level keys are the flow's parameters
model = "my-model"                   # optional: the registry name of its model
deployments = "deployments/prefect.yaml"   # optional: what `uncool deploy` applies (this default)
```

The project folder is the nearest folder at or above the working folder whose
``pyproject.toml`` holds this table, as git finds ``.git``. Paths in the table
are relative to that folder. Reading the table needs neither Prefect nor MLflow.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYPROJECT = "pyproject.toml"
TABLE = "tool.uncool"
DEFAULT_DEPLOYMENTS = "deployments/prefect.yaml"
KNOWN_KEYS = ("pipeline", "params", "model", "deployments")

class ProjectError(LookupError):
    """No project here, or its ``[tool.uncool]`` table is wrong; the message says what to add."""


@dataclass(frozen=True)
class ProjectConfig:
    """The ``[tool.uncool]`` table of one project, with paths made absolute."""

    root: Path
    pipeline_file: Path
    pipeline_function: str
    params_file: Path | None = None
    model: str | None = None
    deployments_file: Path | None = None

    @property
    def entrypoint(self) -> str:
        """``path/to/file.py:function``, relative to the project folder (as prefect.yaml has it)."""
        return f"{self.pipeline_file.relative_to(self.root).as_posix()}:{self.pipeline_function}"

    def require_model(self, what: str) -> str:
        """The model name, or a ProjectError naming the key to add for ``what``."""
        if not self.model:
            raise ProjectError(f"{what} needs the model's registry name: add model = \"NAME\" to "
                               f"[tool.uncool] in {self.root / PYPROJECT}")
        return self.model


def _table(pyproject: Path) -> dict[str, Any] | None:
    """The ``[tool.uncool]`` table of ``pyproject``, None if it has none or cannot be read."""
    try:
        document = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    table = document.get("tool", {}).get("uncool")
    return table if isinstance(table, dict) else None


def find_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working folder) with the table."""
    here = (start or Path.cwd()).absolute()
    return next((base for base in (here, *here.parents)
                 if (base / PYPROJECT).is_file() and _table(base / PYPROJECT) is not None), None)


def load_config(start: Path | None = None) -> ProjectConfig:
    """The project around ``start``; a ProjectError that says what to add if there is none."""
    root = find_root(start)
    if root is None:
        where = (start or Path.cwd()).absolute()
        raise ProjectError(
            f"no uncool project at {where} or above: add a [tool.uncool] table to the project's "
            'pyproject.toml naming its flow, e.g. pipeline = "flows/train.py:my_flow" (optional: '
            'params = "flows/params.yaml", model = "my-model"), or start from the example with '
            "`uncool init DIR`"
        )
    return config_of(root)


@functools.lru_cache(maxsize=32)
def _cached_config(root: Path, mtime_ns: int) -> ProjectConfig:
    return _parse(root, _table(root / PYPROJECT) or {})


def config_of(root: Path) -> ProjectConfig:
    """The config of the project folder ``root`` (read again when its pyproject.toml changes)."""
    root = root.resolve()
    pyproject = root / PYPROJECT
    try:
        mtime = pyproject.stat().st_mtime_ns
    except OSError as exc:
        raise ProjectError(f"cannot read {pyproject}: {exc}") from exc
    return _cached_config(root, mtime)


def _parse(root: Path, table: dict[str, Any]) -> ProjectConfig:
    where = f"[tool.uncool] in {root / PYPROJECT}"
    unknown = sorted(set(table) - set(KNOWN_KEYS))
    if unknown:
        raise ProjectError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                           f"known keys: {', '.join(KNOWN_KEYS)}")
    for key in KNOWN_KEYS:
        if key in table and not (isinstance(table[key], str) and table[key].strip()):
            raise ProjectError(f"{where}: {key} must be a non-empty string, "
                               f"got {table[key]!r}")
    entry = table.get("pipeline")
    if not entry:
        raise ProjectError(f'{where} has no pipeline; add the flow to run, e.g. '
                           'pipeline = "flows/pipeline.py:my_flow"')
    path, sep, function = str(entry).rpartition(":")
    if not sep or not path.endswith(".py") or not function.isidentifier():
        raise ProjectError(f"{where}: pipeline = {entry!r} is not FILE.py:FUNCTION, e.g. "
                           '"flows/pipeline.py:my_flow"')
    pipeline_file = _inside(root, path, "pipeline", where)
    if not pipeline_file.is_file():
        raise ProjectError(f"{where}: pipeline names {path}, which does not exist in {root}")
    params_file = None
    if table.get("params"):
        params_file = _inside(root, table["params"], "params", where)
        if not params_file.is_file():
            raise ProjectError(f"{where}: params names {table['params']}, which does not "
                               f"exist in {root}; create it or remove the key")
    deployments = _inside(root, table.get("deployments") or DEFAULT_DEPLOYMENTS, "deployments", where)
    return ProjectConfig(
        root=root, pipeline_file=pipeline_file, pipeline_function=function,
        params_file=params_file, model=table.get("model"),
        deployments_file=deployments,
    )


def _inside(root: Path, relative: str, key: str, where: str) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ProjectError(f"{where}: {key} = {relative!r} points outside the project folder")
    return path


def config_for_file(path: str | Path) -> ProjectConfig | None:
    """The project a source file belongs to (None outside any project, or if its table is wrong)."""
    root = find_root(Path(path).parent)
    if root is None:
        return None
    try:
        return config_of(root)
    except ProjectError:
        return None
