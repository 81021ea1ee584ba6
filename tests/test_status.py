"""`uncool status` on a small project, in process, with no server: what it can and cannot predict.

What status predicts against real runs is tested on the wine project
(tests/test_any_project.py::test_status_says_what_the_next_run_re_runs_and_why).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

FLOW = textwrap.dedent('''
    from pathlib import Path

    from prefect import task

    from uncool_prefect import pipeline, stage


    @stage
    def count(folder: Path) -> int:
        return sum(1 for _ in folder.iterdir())


    @task
    def shout(text: str) -> str:
        return text.upper()


    @stage
    def report(n: int, label: str) -> str:
        return f"{label}: {n}"


    @pipeline
    def survey(folder: str = "data", label: str = "files") -> str:
        n = count(Path(__file__).parent / folder)
        return report(n, shout(label))
''')


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "survey"
    (root / "data").mkdir(parents=True)
    (root / "data" / "a.txt").write_text("a\n")
    (root / "flow.py").write_text(FLOW)
    (root / "pyproject.toml").write_text('[tool.uncool]\npipeline = "flow.py:survey"\n')
    monkeypatch.chdir(root)
    monkeypatch.setenv("UNCOOL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("UNCOOL_STORE", raising=False)
    return root


def test_status_runs_nothing_and_says_what_it_cannot_predict(project: Path) -> None:
    from uncool_prefect.config import load_config
    from uncool_prefect.project.status import pipeline_status

    found = pipeline_status(load_config(), {})
    states = {s.name: (s.state, s.reasons) for s in found.stages}
    assert states["count"] == ("runs", ["never ran"])
    shout_state, shout_reasons = states["shout"]
    assert shout_state == "runs" and "not predicted" in shout_reasons[0]  # a plain @task
    assert states["report"] == ("depends", ["runs if the result of count, shout changes "
                                            "(they re-run)"])
    assert not found.up_to_date and found.last_run is None and found.stopped is None
    home = project.parent / "home"
    assert not (home / "store" / "runs").exists()  # nothing ran, nothing was recorded
    objects = home / "store" / "objects"
    assert not objects.exists() or not any(p.is_file() for p in objects.rglob("*"))
