"""Shared reproducibility: the store on S3 (moto over HTTP), two machines, one team.

"Machine" A runs the pipeline on data in the bucket with UNCOOL_STORE on the
bucket and MLflow on a shared database; "machine" B has its own state folder
and the same settings: its run is all Cached, and it finds, checks out and
lists A's work from the bucket alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import pytest
from conftest import s3_options
from project import Project

from uncool_prefect.sources import write_sample

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def _machine(root: Path, name: str, store: str, endpoint: str, mlflow_db: Path) -> Project:
    machine = Project(root, name)
    machine.env.update({"UNCOOL_STORE": store, "AWS_ENDPOINT_URL": endpoint,
                        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}"})
    return machine


def test_a_teammate_reuses_finds_and_checks_out_work_from_the_bucket(
        tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    store = f"s3://{s3_bucket}/team"
    mlflow_db = tmp_path / "shared-mlflow.db"
    # One block name, as a team has: the name is a constant the stages read,
    # so it is part of their cache keys (a block names where results live).
    a = _machine(tmp_path / "a", "team", store, s3_endpoint, mlflow_db)
    b = _machine(tmp_path / "b", "team", store, s3_endpoint, mlflow_db)
    # The team's data is in the bucket too.
    write_sample(tmp_path / "issues", days=2, seed=11)
    fsspec.filesystem("s3", **s3_options(s3_endpoint)).put(
        f"{tmp_path / 'issues'}/", f"{s3_bucket}/issues/", recursive=True)
    data = ("-S", "data.source=folder", "-S", f"data.folder.url=s3://{s3_bucket}/issues")

    first = a.uncool("run", *data)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_a = re.search(r"runs/flow-run/([0-9a-f-]{36})", first.stdout).group(1)  # type: ignore[union-attr]

    # B: another state folder, its own copy of the data: nothing to compute.
    second = b.uncool("run", *data)
    assert "every stage Cached" in second.stdout, second.stdout[-3000:] + second.stderr[-3000:]

    shown = b.uncool("exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert run_a in {row["run_id"] for row in json.loads(shown.stdout)["rows"]}

    handover = tmp_path / "b" / "handover"
    done = b.uncool("checkout", "champion", str(handover))
    assert done.returncode == 0, done.stdout + done.stderr
    issues = tmp_path / "issues"
    assert sorted(p.relative_to(handover / "data") for p in (handover / "data").rglob("*.txt")) == \
        sorted(p.relative_to(issues) for p in issues.rglob("*.txt"))
    assert (handover / "model.pkl").stat().st_size > 0

    verify = b.uncool("store", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not (tmp_path / "a" / "home" / "store").exists()  # nothing went to a local store
