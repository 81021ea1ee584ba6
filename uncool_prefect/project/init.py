"""``uncool init DIR``: a new project from the bundled example.

The example is a project like any other (a pyproject.toml with a
``[tool.uncool]`` table, its flows, its params and its deployments). A wheel
carries it as ``uncool_prefect/_example/`` (see pyproject.toml's
``force-include``); an editable install finds it in the repository it was
installed from. Only the folders its table names are copied, plus
``deployments/``; the new pyproject.toml holds the example's table alone.
"""

from __future__ import annotations

import shutil
import tempfile
import tomllib
from pathlib import Path

from ..config import PYPROJECT, ProjectError, config_of, find_root

EXAMPLE = Path(__file__).resolve().parents[1] / "_example"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
GITIGNORE = ".uncool/\n__pycache__/\n"


def example_root() -> Path:
    """Where the bundled example lives: inside the wheel, else the source checkout."""
    if (EXAMPLE / PYPROJECT).is_file():
        return EXAMPLE
    checkout = find_root(EXAMPLE.parent.parent)
    if checkout is not None and (checkout / "uncool_prefect").is_dir():
        return checkout
    raise ProjectError("the bundled example is missing from this installation of uncool-prefect; "
                       "reinstall it (pip install --force-reinstall uncool-prefect)")


def _table_text(pyproject: Path) -> str:
    """The ``[tool.uncool]`` table of ``pyproject`` as TOML text."""
    table = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["uncool"]
    lines = ["[tool.uncool]"] + [f'{key} = "{value}"' for key, value in table.items()]
    return "\n".join(lines) + "\n"


def init_project(dest: Path) -> list[str]:
    """Write the example project into ``dest`` (new or empty); the names written."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ProjectError(f"{dest} exists and is not an empty folder; choose a new folder")
    source = example_root()
    config = config_of(source)
    folders = {config.pipeline_file.relative_to(config.root).parts[0]}
    if config.params_file is not None:
        folders.add(config.params_file.relative_to(config.root).parts[0])
    if config.deployments_file is not None and config.deployments_file.exists():
        folders.add(config.deployments_file.relative_to(config.root).parts[0])
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed: a failure leaves no half-written project.
    with tempfile.TemporaryDirectory(prefix=".uncool-init-", dir=dest.parent) as tmp:
        staging = Path(tmp) / "project"
        staging.mkdir()
        for folder in sorted(folders):
            if (source / folder).is_dir():
                shutil.copytree(source / folder, staging / folder, ignore=IGNORED)
            else:
                shutil.copyfile(source / folder, staging / folder)
        name = dest.name or "uncool-project"
        (staging / PYPROJECT).write_text(
            f'[project]\nname = "{name}"\nversion = "0.1.0"\nrequires-python = ">=3.11"\n'
            f'dependencies = ["uncool-prefect"]\n\n{_table_text(source / PYPROJECT)}',
            encoding="utf-8")
        (staging / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
    return sorted([*folders, PYPROJECT, ".gitignore"])
