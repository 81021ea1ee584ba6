"""`uncool init DIR`: a new project from the bundled example, with or without a clone.

The promise: ``pip install uncool-prefect && uncool init demo && cd demo &&
uncool run`` works from an installed wheel, with no checkout of this
repository. The slow test builds the wheel from this repository, installs it
into a folder of its own, and runs `uncool` from that install (PYTHONPATH puts
it ahead of the editable install) outside the repository, against the
session's real Prefect server. The fast tests run the repository's console
script (the editable install, which finds the example in the checkout).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNCOOL = str(Path(sys.executable).with_name("uncool"))
STAGES = ["get-data", "split", "train", "evaluate", "deploy"]
# What `uncool init` writes, and nothing else: no tests/, bench/, uncool_prefect/ ...
TOP_LEVEL = {".gitignore", "pyproject.toml", "flows", "deployments"}
EXAMPLE_FILES = ["pyproject.toml", "flows/pipeline.py", "deployments/prefect.yaml"]
# One point of the grid instead of two: the same pipeline, one trial to train.
FAST = ["-S", "train.sweep.grid.classifier=[logistic_regression]"]
TIMEOUT = 600


def _user_env(root: Path, name: str) -> dict[str, str]:
    """An `uncool` user of its own (as tests/project.py): own home, block and store."""
    env = {**os.environ, "UNCOOL_HOME": str(root / "home"), "UNCOOL_BLOCK": name,
           "UNCOOL_STORE": str(root / "home" / "store"), "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _shows_states(stdout: str, state: str) -> None:
    """The stages table of `uncool run` names every stage with ``state``."""
    for name in STAGES:
        assert re.search(rf"(?<![\w-]){re.escape(name)}\W+{state}\b", stdout), \
            (name, state, stdout[-3000:])


def _check_new_project(demo: Path) -> None:
    """What a user finds in the folder `uncool init` wrote."""
    assert {p.name for p in demo.iterdir()} == TOP_LEVEL, sorted(p.name for p in demo.iterdir())
    for name in ["pyproject.toml", "flows/pipeline.py", "flows/params.yaml",
                 "deployments/prefect.yaml", ".gitignore"]:
        assert (demo / name).is_file(), name
    assert not list(demo.rglob("__pycache__"))
    text = (demo / "pyproject.toml").read_text(encoding="utf-8")
    assert "[tool.uncool]" in text
    table = tomllib.loads(text)["tool"]["uncool"]
    assert table == tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["uncool"]
    pipeline_file = table["pipeline"].split(":", 1)[0]
    assert (demo / pipeline_file).is_file()
    assert (demo / table["params"]).is_file()
    assert ".uncool/" in (demo / ".gitignore").read_text(encoding="utf-8")


# --- from an installed wheel, no clone -------------------------------------------------------


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel built from this repository, and the folder it is installed into (no deps)."""
    tmp = tmp_path_factory.mktemp("wheel")
    out = tmp / "dist"
    # Without the build backend in this venv, pip builds in isolation (hatchling from PyPI).
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                            "-w", str(out), str(REPO)],
                           capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = list(out.glob("uncool_prefect-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in EXAMPLE_FILES:
        assert f"uncool_prefect/_example/{name}" in names, (name, sorted(names))
    site = tmp / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                                str(site), str(wheel)],
                               capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert (site / "uncool_prefect" / "_example" / "pyproject.toml").is_file()
    return wheel, site


def _installed_uncool(site: Path, env: dict[str, str], *args: str,
                      cwd: Path) -> subprocess.CompletedProcess[str]:
    """`uncool ARGS` from the wheel's install in ``site``, not from the repository."""
    code = "import sys; from uncool_prefect.cli import main; sys.argv[0] = 'uncool'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env=env)


@pytest.mark.slow
@pytest.mark.timeout(4 * TIMEOUT)
@pytest.mark.usefixtures("prefect_server")
def test_installed_wheel_init_then_run_without_a_clone(
        wheel_site: tuple[Path, Path], tmp_path: Path) -> None:
    wheel, site = wheel_site
    env = _user_env(tmp_path, "init-from-wheel")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    work = tmp_path / "work"
    work.mkdir()

    # The package, and the example init copies, come from the wheel's install.
    where = subprocess.run(
        [sys.executable, "-c", "import uncool_prefect; from uncool_prefect.project.init import "
         "example_root; print(uncool_prefect.__file__); print(example_root())"],
        capture_output=True, text=True, timeout=120, cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    package_file, example = where.stdout.split()
    assert package_file.startswith(str(site)), package_file
    assert Path(example) == site / "uncool_prefect" / "_example", example

    # uncool init demo
    done = _installed_uncool(site, env, "init", "demo", cwd=work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    demo = work / "demo"
    _check_new_project(demo)
    assert {p.name for p in work.iterdir()} == {"demo"}  # no staging folder left beside it
    # Its files are the wheel's copy of the example.
    with zipfile.ZipFile(wheel) as archive:
        for name in ["flows/pipeline.py", "flows/labeler.py", "flows/params.yaml",
                     "deployments/prefect.yaml"]:
            assert (demo / name).read_bytes() == archive.read(f"uncool_prefect/_example/{name}"), name

    # cd demo && uncool run: every stage runs, the model is registered.
    first = _installed_uncool(site, env, "run", *FAST, cwd=demo)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    _shows_states(first.stdout, "Completed")
    assert "issue-labeler v1" in first.stdout, first.stdout[-3000:]

    # Again: nothing changed, every stage Cached, no new model version.
    second = _installed_uncool(site, env, "run", *FAST, cwd=demo)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    _shows_states(second.stdout, "Cached")
    assert "every stage Cached" in second.stdout, second.stdout[-3000:]
    assert "issue-labeler v1" in second.stdout and "issue-labeler v2" not in second.stdout

    # uncool init demo again, into the folder that now holds a project: refused, untouched.
    before = _files(demo)
    again = _installed_uncool(site, env, "init", "demo", cwd=work)
    assert again.returncode == 2, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Traceback" not in again.stdout + again.stderr
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1, again.stderr
    assert lines[0].startswith("error: ") and re.search(r"\bdemo\b", lines[0]), lines[0]
    assert _files(demo) == before
    assert {p.name for p in work.iterdir()} == {"demo"}


# --- from the repository's console script (editable install) -----------------------------------


def test_init_writes_the_example_into_a_new_folder(tmp_path: Path) -> None:
    env = _user_env(tmp_path, "init-editable")
    dest = tmp_path / "new"
    done = subprocess.run([UNCOOL, "init", str(dest)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    _check_new_project(dest)
    assert "uncool run" in done.stdout  # it says what to do next
    for name in ["flows/pipeline.py", "flows/params.yaml"]:
        assert (dest / name).read_bytes() == (REPO / name).read_bytes(), name


def test_init_into_an_existing_file_is_one_clear_error(tmp_path: Path) -> None:
    env = _user_env(tmp_path, "init-editable")
    target = tmp_path / "taken"
    target.write_text("mine\n", encoding="utf-8")
    done = subprocess.run([UNCOOL, "init", str(target)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and str(target) in lines[0], lines[0]
    assert target.read_text(encoding="utf-8") == "mine\n"
    assert not list(tmp_path.glob(".uncool-init-*"))  # no staging folder left behind
