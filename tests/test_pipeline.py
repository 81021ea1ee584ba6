"""The main job end to end: `uncool run` against a real server, MLflow on SQLite."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from project import PROJECT, UNCOOL
from project import Project as BaseProject

from uncool_prefect.project.runner import task_states
from uncool_prefect.sources import write_sample, write_sample_day

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

STAGES = ["get-data", "split", "train", "evaluate", "deploy"]


class Project(BaseProject):
    def run(self, *overrides: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
        done, flow_run_id = self.run_flow(*overrides)
        return done, task_states(flow_run_id)

    def model_versions(self) -> dict[str, dict[str, object]]:
        from mlflow import MlflowClient

        uri = f"sqlite:///{self.home / 'mlflow.db'}"
        # NOTE: both URIs: another in-process test may have set MLflow's global registry.
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            versions = client.search_model_versions("name='issue-labeler'")
        except Exception:  # noqa: BLE001 - no database yet: no versions
            return {}
        # NOTE: search results carry no aliases; get_model_version does.
        full = [client.get_model_version("issue-labeler", v.version) for v in versions]
        return {str(v.version): {"aliases": set(v.aliases), "tags": v.tags} for v in full}


@pytest.fixture
def project(tmp_path: Path, request: pytest.FixtureRequest) -> Project:
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40]
    proj = Project(tmp_path, name)
    write_sample(proj.data, days=2, seed=3)
    return proj


def test_first_run_trains_a_champion_and_the_second_is_all_cached(project: Project) -> None:
    first, states = project.run()
    assert states == dict.fromkeys(STAGES, "Completed")
    # 135 training rows x 2 trials: a thread pool, no Dask cluster to start (and it says why).
    assert "a thread pool in this process" in first.stderr and "LocalCluster" not in first.stderr
    assert "issue-labeler v1: first version of the model: it becomes champion" in first.stdout
    assert re.search(r"metrics +macro_f1 0\.\d{3}, accuracy 0\.\d{3}", first.stdout)  # the gate's first
    predicted = project.uncool("predict", "dvc pull fails with my S3 remote")
    assert predicted.returncode == 0, predicted.stderr
    prediction = json.loads(predicted.stdout)
    assert prediction["label"] in {"data-sync", "experiments", "plots"}
    assert 0 < prediction["score"] <= 1
    versions = project.model_versions()
    assert list(versions) == ["1"] and "champion" in versions["1"]["aliases"]
    tags = versions["1"]["tags"]
    assert {"data_hash", "params_hash", "code_hash", "prefect_flow_run_id", "model_oid"} <= set(tags)
    assert re.search(r"data version +" + re.escape(str(tags["data_hash"])), first.stdout)

    project.env["PYTHONPROFILEIMPORTTIME"] = "1"  # which modules the no-op run imports
    try:
        second, states = project.run()
    finally:
        del project.env["PYTHONPROFILEIMPORTTIME"]
    assert states == dict.fromkeys(STAGES, "Cached")
    assert "every stage Cached" in second.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in second.stderr.splitlines()
                if line.startswith("import time:")}
    assert "prefect" in imported  # the import log is there
    # Every stage Cached: no MLflow, no scikit-learn, no Dask, no model loaded.
    assert not {m for m in imported if m.split(".")[0] in {"mlflow", "sklearn", "distributed"}}
    assert list(project.model_versions()) == ["1"]  # nothing registered again

    # The run record: plain JSON in the store, enough to find every input again.
    flow_run_id = re.search(r"runs/flow-run/([0-9a-f-]{36})", first.stdout).group(1)  # type: ignore[union-attr]
    record = json.loads((project.home / "store" / "runs" / f"{flow_run_id}.json").read_text())
    assert record["data"] == tags["data_hash"]
    assert record["inputs"]["get-data.source"]["version"] == tags["data_hash"]
    assert record["params_hash"] == tags["params_hash"]
    assert record["code"]["snapshot"] == tags["code_hash"]
    assert list(record["stages"]) == STAGES
    assert record["stages"]["train"]["state"] == "Completed"
    assert record["stages"]["train"]["outputs"]["model"] == tags["model_oid"]
    assert record["models"][0]["name"] == "issue-labeler" and record["models"][0]["promoted"]
    assert record["mlflow"]["model_version"] == "1" and record["trigger"]["kind"] == "user"
    from uncool_prefect.store import ObjectStore

    store = ObjectStore(project.home / "store")
    code = store.read_manifest(record["code"]["snapshot"])
    assert "flows/pipeline.py" in {entry.path for entry in code.entries}
    environment = json.loads(store.get_bytes(record["environment"]))
    assert any(p.lower().startswith("scikit-learn==") for p in environment["packages"])

    # gc keeps what the run produced: the data snapshot, splits and model are
    # named inside stage results, and those names are gc roots too.
    gc = project.uncool("store", "gc", "--grace", "0")
    assert gc.returncode == 0 and "removed 0 object(s)" in gc.stdout, gc.stdout + gc.stderr
    assert project.uncool("store", "verify").returncode == 0

    done = project.uncool("predict", "vega plot renders an empty axis")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"label", "score"}

    report = latest_artifact("issue-labeler-report")
    assert "v1: promoted to **champion**" in str(report.data)
    assert str(tags["data_hash"]) in str(report.data)
    confusion = latest_artifact("issue-labeler-confusion")
    assert "true label" in str(confusion.data) and "predicted plots" in str(confusion.data)


def latest_artifact(key: str):  # type: ignore[no-untyped-def]
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key!r} on the server"
    return found[0]


def test_a_train_change_reruns_exactly_train_evaluate_deploy(project: Project) -> None:
    project.run()
    _, states = project.run("train.C=0.5")
    assert states == {"get-data": "Cached", "split": "Cached", "train": "Completed",
                      "evaluate": "Completed", "deploy": "Completed"}
    _, states = project.run("deploy.min_improvement=0.5")
    assert states == {"get-data": "Cached", "split": "Cached", "train": "Cached",
                      "evaluate": "Cached", "deploy": "Completed"}


def test_new_data_reruns_every_stage(project: Project) -> None:
    project.run()
    write_sample_day(project.data, 3, seed=3)
    _, states = project.run()
    assert states == dict.fromkeys(STAGES, "Completed")


def test_the_champion_is_replaced_only_by_a_better_model(project: Project) -> None:
    weak = ("train.C=0.01", "train.tfidf.ngram_max=1")
    project.run(*weak)
    strong, _ = project.run("train.C=4.0")
    assert "beats the champion" in strong.stdout
    assert "both scored on validation split" in strong.stdout  # the same rows for both
    versions = project.model_versions()
    assert "champion" in versions["2"]["aliases"] and "champion" not in versions["1"]["aliases"]
    assert versions["2"]["tags"]["gate.compared_on"] == "same rows"
    assert float(versions["2"]["tags"]["gate.champion_score"]) < float(
        versions["2"]["tags"]["gate.challenger_score"])

    weaker, _ = project.run("train.C=0.02", "train.tfidf.ngram_max=1")
    assert "does not beat the champion" in weaker.stdout, weaker.stdout
    versions = project.model_versions()
    assert "challenger" in versions["3"]["aliases"]
    assert "champion" in versions["2"]["aliases"]
    assert "does not beat" in str(versions["3"]["tags"]["decision"])


def _bad_input_leaves_nothing(project: Project, done: subprocess.CompletedProcess[str],
                              message: str) -> None:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert project.model_versions() == {}
    objects = project.home / "store" / "objects"
    assert not objects.exists() or not any(p.is_file() for p in objects.rglob("*"))


def _empty(data: Path) -> None:
    data.mkdir(parents=True)


def _single_class(data: Path) -> None:
    (data / "plots").mkdir(parents=True)
    for number in range(5):
        (data / "plots" / f"{number}.txt").write_text(f"plot number {number} is blank\n")


def _unknown_label(data: Path) -> None:
    write_sample(data, days=1, seed=1)
    (data / "docs").mkdir()
    (data / "docs" / "1.txt").write_text("typo in the tutorial\n")


def _non_utf8(data: Path) -> None:
    write_sample(data, days=1, seed=1)
    (data / "plots" / "broken.txt").write_bytes(b"\xff\xfe plot axis \xc3")


@pytest.mark.parametrize(
    ("make", "message"),
    [(_empty, "dataset is empty"), (_single_class, "at least two"),
     (_unknown_label, "'docs'"), (_non_utf8, "UTF-8")],
    ids=["empty", "single-class", "unknown-label", "non-utf8"],
)
def test_bad_data_is_a_clear_error_and_nothing_is_registered(
    tmp_path: Path, make: Callable[[Path], None], message: str
) -> None:
    project = Project(tmp_path, "bad-data")
    make(project.data)
    done = project.uncool("run", "-S", "data.source=folder", "-S", f"data.folder.url={project.data}")
    _bad_input_leaves_nothing(project, done, message)


def test_an_unreachable_url_is_a_clear_error(tmp_path: Path) -> None:
    project = Project(tmp_path, "unreachable")
    project.env.update({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})
    done = project.uncool("run", "-S", "data.source=folder", "-S", "data.folder.url=s3://nowhere/issues")
    _bad_input_leaves_nothing(project, done, "s3://nowhere/issues")


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.epochs=8", "unknown parameter 'train.epochs'"),
     ("train.C=lots", "train.C expects a float"),
     ("split.seed", "is not KEY=VALUE")],
)
def test_a_bad_override_names_the_fix(tmp_path: Path, override: str, message: str) -> None:
    project = Project(tmp_path, "bad-override")
    done = project.uncool("run", "-S", override)
    _bad_input_leaves_nothing(project, done, message)
    if "unknown" in message:
        assert "train.C" in done.stderr  # the valid keys are listed


def test_serve_answers_with_the_champion(project: Project) -> None:
    import socket
    import time
    import urllib.request

    project.run()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([UNCOOL, "serve", "--port", str(port)], cwd=PROJECT,
                              env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        body = json.dumps({"inputs": ["dvc pull fails with my S3 remote"]}).encode()
        deadline = time.monotonic() + 120
        while True:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "mlflow models serve did not answer in 120 s"
                time.sleep(1)
        assert answer["predictions"][0] in {"data-sync", "experiments", "plots"}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_the_github_source_against_a_fake_api(project: Project) -> None:
    """Issues come from a loopback server in the API's shape, three pages of them."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    from uncool_prefect.sources import load_examples

    examples = load_examples(project.data)
    issues = [
        {"number": n + 1, "title": e.text, "labels": [{"name": e.label}],
         "created_at": "2024-03-01T00:00:00Z", "updated_at": "2024-03-01T00:00:00Z"}
        for n, e in enumerate(examples)
    ]
    issues.append({"number": 9999, "title": "a pull request", "labels": [{"name": "plots"}],
                   "pull_request": {}, "created_at": "2024-03-01T00:00:00Z"})
    pages = [issues[i::3] for i in range(3)]
    seen_auth: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen_auth.append(self.headers.get("Authorization", ""))
            query = parse_qs(urlparse(self.path).query)
            page = int(query.get("page", ["1"])[0])
            body = json.dumps(pages[page - 1]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if page < len(pages):
                base = f"http://127.0.0.1:{self.server.server_port}"  # type: ignore[attr-defined]
                self.send_header("Link", f'<{base}/repos/iterative/dvc/issues?page={page + 1}>; '
                                 'rel="next"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    project.env["GITHUB_TOKEN"] = "ghp_test_token_never_printed"
    try:
        args = ["run", "-S", "data.source=github", "-S", "data.github.since=2024-01-01",
                "-S", f"data.github.api_url=http://127.0.0.1:{server.server_port}"]
        done = project.uncool(*args)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{len(examples)} examples" in done.stderr  # get-data's log: the PR was skipped
    assert seen_auth and all(a == "Bearer ghp_test_token_never_printed" for a in seen_auth)
    assert "ghp_test_token_never_printed" not in done.stdout + done.stderr


def test_two_projects_on_one_server_keep_their_own_results(tmp_path: Path) -> None:
    """The block is shared on the server; the store and MLflow are per project."""
    first, second = Project(tmp_path / "a", "shared"), Project(tmp_path / "b", "shared")
    for project in (first, second):
        project.env.pop("UNCOOL_STORE")  # the default: <UNCOOL_HOME>/store
        write_sample(project.data, days=2, seed=5)
    first.run()
    _, states = second.run()
    assert states == dict.fromkeys(STAGES, "Completed")
    assert list(second.model_versions()) == ["1"]
    assert (second.home / "store" / "refs").is_dir()
