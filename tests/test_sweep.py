"""The training sweep: trials on a Dask LocalCluster, cached by content, chosen by validation metric."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from project import PROJECT, Project

from uncool_prefect.project.runner import task_states
from uncool_prefect.sources import write_sample


def sweep_trial_states(project: Project, version: str) -> dict[str, str]:
    """Trial name -> final state, read from the server, for the sweep that made a model version."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project.home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(str(client.get_model_version("issue-labeler", version).run_id))
    return task_states(run.data.tags["prefect_sweep_flow_run_id"])


def mlflow_trials(project: Project, parent_run_id: str) -> list[dict[str, object]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project.home / 'mlflow.db'}")
    children = client.search_runs(experiment_ids=[client.get_run(parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return [{"name": r.info.run_name, "metrics": r.data.metrics, "tags": r.data.tags} for r in children]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_sweep_trains_only_new_points_and_keeps_the_best(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    project = Project(tmp_path, "sweep")
    # NOTE: a sweep this small runs on threads by default; this test is about the Dask path.
    project.env["UNCOOL_SWEEP_DASK_MIN_WORK"] = "0"
    write_sample(project.data, days=2, seed=3)

    done, first = project.run_flow("train.sweep.grid.classifier=[logistic_regression]")
    assert "distributed.LocalCluster" in done.stderr  # the runner said which and why
    assert task_states(first)["train"] == "Completed"
    assert sweep_trial_states(project, "1") == {"trial[classifier=logistic_regression]": "Completed"}

    # One more grid point: only that point trains.
    done, second = project.run_flow()
    assert task_states(second)["train"] == "Completed"
    assert sweep_trial_states(project, "2") == {"trial[classifier=logistic_regression]": "Cached",
                                          "trial[classifier=ridge]": "Completed"}

    # Every trial is an MLflow child run of the train run, and the registered
    # model is the trial with the best validation macro-F1.
    client = MlflowClient(tracking_uri=f"sqlite:///{project.home / 'mlflow.db'}",
                          registry_uri=f"sqlite:///{project.home / 'mlflow.db'}")
    version = client.get_model_version("issue-labeler", "2")
    trials = mlflow_trials(project, str(version.run_id))
    assert sorted(t["name"] for t in trials) == ["trial[classifier=logistic_regression]",
                                                 "trial[classifier=ridge]"]
    best = max(trials, key=lambda t: t["metrics"]["val_macro_f1"])  # type: ignore[index]
    chosen = [t for t in trials if t["tags"]["chosen"] == "true"]  # type: ignore[index]
    assert chosen == [best]
    assert version.tags["model_oid"] == best["tags"]["model_oid"]  # type: ignore[index]
    assert {t["tags"]["state"] for t in trials} == {"Cached", "Completed"}  # type: ignore[index]

    # Nothing changed: the train stage is Cached and no cluster starts.
    done, third = project.run_flow()
    assert task_states(third)["train"] == "Cached"
    assert "Dask task runner" not in done.stderr and "LocalCluster" not in done.stderr


@pytest.mark.slow
def test_the_sweep_goes_to_the_server_uncool_found(prefect_server: str, tmp_path: Path) -> None:
    """`uncool run` with no PREFECT_API_URL: the server is found after Prefect was imported.

    The sweep flow run (and its trials, on the Dask workers) must be recorded on
    that server, not on an ephemeral one started for the sweep.
    """
    project = Project(tmp_path, "sweep-found")
    write_sample(project.data, days=2, seed=3)
    script = """
import sys
from pathlib import Path
import prefect  # settings read now, with no API URL
from uncool_prefect.project import runner
from uncool_prefect.config import load_config
config = load_config()
params = runner.resolve_params(config, None, ["data.source=folder", f"data.folder.url={sys.argv[2]}",
                                              "train.sweep.grid.classifier=[logistic_regression]"])
print(runner.run_pipeline(config, params, sys.argv[1]).flow_run_id)
"""
    env = {k: v for k, v in project.env.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-c", script, prefect_server, str(project.data)],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "temporary server" not in done.stderr
    pipeline_run = done.stdout.split()[-1]
    assert task_states(pipeline_run)["train"] == "Completed"
    assert sweep_trial_states(project, "1") == {"trial[classifier=logistic_regression]": "Completed"}
    with get_client(sync_client=True) as client:
        pipeline_name = client.read_flow_run(UUID(pipeline_run)).name
        named = FlowRunFilter(name=FlowRunFilterName(any_=[f"sweep-for-{pipeline_name}"]))
        assert len(client.read_flow_runs(flow_run_filter=named)) == 1


def test_the_gpu_path_fits_through_array_api_and_stores_cpu_arrays(tmp_path: Path) -> None:
    """fit_on_device with NumPy standing in for CuPy: the code path the GPU runs, on a CPU.

    A fresh process: SciPy reads SCIPY_ARRAY_API once, at import.
    """
    script = """
import sys
sys.path.insert(0, "flows")
import labeler, numpy as np
from uncool_prefect.sources import load_examples, write_sample
write_sample(sys.argv[1], days=2, seed=3)
rows = [{"id": e.id, "text": e.text, "label": e.label} for e in load_examples(sys.argv[1])]
for name in labeler.CLASSIFIERS:
    params = {"classifier": name, "C": 4.0, "tfidf": {"ngram_max": 2, "sublinear_tf": True}}
    model = labeler.fit_on_device(labeler.build_model(params), [r["text"] for r in rows],
                                  [r["label"] for r in rows], np)
    fitted = labeler.load_model(labeler.dump_model(model)).named_steps["classifier"]
    kinds = {type(v).__module__ for v in vars(fitted).values() if hasattr(v, "shape")}
    metrics, _ = labeler.evaluate_model(model, rows, sorted({r["label"] for r in rows}))
    print(name, sorted(kinds), fitted.coef_.dtype, [str(c) for c in fitted.classes_],
          round(metrics["accuracy"], 3))
"""
    env = {**os.environ, "SCIPY_ARRAY_API": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data")], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        _name, kinds, dtype, *rest = line.split(" ", 3)
        assert kinds == "['numpy']" and dtype == "float32", line
        assert "['data-sync', 'experiments', 'plots']" in rest[0], line
        assert float(rest[0].rsplit(" ", 1)[1]) > 0.8, line  # fits its own training data

    without = {k: v for k, v in env.items() if k != "SCIPY_ARRAY_API"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data2")], cwd=PROJECT,
                          env=without, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "needs SCIPY_ARRAY_API=1" in done.stderr
