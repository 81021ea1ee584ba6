"""Benchmark: ``uncool exp show`` over many run records, on a local store and on S3 (moto).

Usage::

    .venv/bin/python bench/exp_show.py [--runs 1000] [--repeat 5] [--dvc-exps N] [--dvc-repeat 2] \
        [--skip-dvc] [--keep]

Writes ``--runs`` run records shaped like the ones a run of the worked example
writes (``uncool run``: five stages, the sample's params, eight metrics from the
registered model, a model version, an MLflow run id; ~5.7 KB each) into a local
store under ``bench/.work/exp_show/``, and the same records into an S3 store on
a moto server in its own process (``s3_put.moto_server``). The MLflow registry
beside them (SQLite, ``UNCOOL_HOME/mlflow.db``) holds one model version per
run, tagged with its flow run id, and the ``champion`` alias on one of them, as
the pipeline's gate leaves it.

Then times, each in a fresh process as a user runs it (output piped, one
untimed run first, then the median of ``--repeat``, samples in brackets), side
by side:

- ``python -c pass`` and ``python -c "import prefect"``: the interpreter, and
  the floor of any command that imports Prefect;
- ``uncool exp show`` on the local store;
- on the S3 store (``UNCOOL_STORE=s3://...`` and ``AWS_ENDPOINT_URL`` set, as
  for a team on a shared bucket): a raw s3fs ``find`` + ``cat`` of the same
  records in one process (what moto takes to serve them); then, once the
  records are older than the racy window of the record cache and packs (60 s:
  the script waits), ``uncool exp show`` three ways: the very first look at
  the store (record cache and record packs deleted before each run: it reads
  every record and writes the pack), a first look on another machine (record
  cache deleted before each run, the pack there: it reads the pack), and a
  look again on this machine (records cached: the listing only);
- ``dvc exp show`` in a git repo holding ``--dvc-exps`` experiments (default:
  ``--runs``; params.yaml and metrics.json per experiment, written with ``git
  fast-import`` as ``dvc exp save`` leaves them: one commit per experiment on
  the baseline, under ``refs/exps/``), median of ``--dvc-repeat`` (it takes
  ~30 s a run at 1,000); ``--skip-dvc`` leaves it out.

It checks that every run shows up once and in order, that the champion row is
marked, that the S3 store prints the same table as the local one, and that dvc
lists every experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import bin_path, dvc_bin, loadavg
from s3_put import BUCKET, CREDENTIALS, moto_server

WORK = Path(__file__).resolve().parent / ".work" / "exp_show"
MODEL = "issue-labeler"
LABELS = ("data-sync", "experiments", "plots")
GOAL_S = 1.0
RAW_S3FS = """
import sys, s3fs
fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": sys.argv[1]})
assert len(fs.cat(fs.find(sys.argv[2]))) > 0
"""


# -- records like the example's ---------------------------------------------------------

def _oid(rng: random.Random, folder: bool = False) -> str:
    return f"{rng.getrandbits(256):064x}" + (".dir" if folder else "")


def _params(rng: random.Random, days: int) -> dict[str, Any]:
    """The worked example's params.yaml, with what a user sweeps by hand changed."""
    return {
        "data": {"source": "sample", "labels": list(LABELS), "sample": {"days": days, "seed": 0},
                 "folder": {"url": None},
                 "github": {"repo": "iterative/dvc", "since": "2022-01-01", "until": None,
                            "token_secret": None, "api_url": "https://api.github.com"}},
        "split": {"test_size": 0.25, "seed": rng.choice((42, 42, 42, 7))},
        "train": {"seed": 0,
                  "tfidf": {"ngram_max": rng.choice((1, 2, 2, 3)), "min_df": 1,
                            "sublinear_tf": True},
                  "classifier": rng.choice(("logistic_regression", "logistic_regression", "ridge")),
                  "C": rng.choice((0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 8.0)), "max_iter": 2000,
                  "sweep": {"grid": {"classifier": ["logistic_regression", "ridge"]},
                            "metric": "macro_f1", "val_size": 0.25, "device": "auto"}},
        "evaluate": {"metrics": ["accuracy", "macro_f1"]},
        "deploy": {"model_name": MODEL, "gate_metric": "macro_f1", "min_improvement": 0.0},
        "dataset": None,
    }


def make_record(i: int, rng: random.Random, started: float, home: Path, data: str,
                days: int, champion: tuple[str, float] | None) -> dict[str, Any]:
    """Run record ``i`` (model version ``i + 1``), in the shape ``write_run_record`` writes."""
    run_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    mlflow_run = f"{rng.getrandbits(128):032x}"
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    metrics = {"accuracy": rng.uniform(0.80, 0.95), "macro_f1": rng.uniform(0.80, 0.95)}
    for label in LABELS:
        metrics[f"precision_{label}"] = rng.uniform(0.75, 0.98)
        metrics[f"recall_{label}"] = rng.uniform(0.75, 0.98)
    version = str(i + 1)
    promoted = champion is None or metrics["macro_f1"] > champion[1]
    model = {
        "name": MODEL, "version": version, "run_id": mlflow_run, "tracking_uri": tracking_uri,
        "model_uri": f"models:/m-{rng.getrandbits(128):032x}", "metrics": metrics,
        "model_oid": _oid(rng), "stage": "deploy", "promoted": promoted,
        "reason": "beats the champion" if promoted else "does not beat the champion",
        "metric": "macro_f1", "value": metrics["macro_f1"],
        "champion_version": None if champion is None else champion[0],
        "champion_value": None if champion is None else champion[1],
        "deltas": {} if champion is None else {"macro_f1": metrics["macro_f1"] - champion[1]},
    }
    model_oid, train, val, result_metrics = model["model_oid"], _oid(rng), _oid(rng), _oid(rng)
    url = str(home / "data" / f"sample-seed0-days{days}")

    def stage(name: str, outputs: dict[str, str], uses: list[str]) -> dict[str, Any]:
        return {"task": name, "task_run_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "state": "Completed", "result": _oid(rng), "outputs": outputs, "uses": uses}

    stages = {
        "get-data": {**stage("get-data", {"dataset": data}, []),
                     "inputs": {"source": {"url": url, "version": data}}},
        "split": stage("split", {"train": train, "val": val}, [data]),
        "train": stage("train", {"model": model_oid, "trials.0.model": model_oid,
                                 "trials.1.model": _oid(rng)}, [data, train]),
        "evaluate": stage("evaluate", {"metrics": result_metrics}, [model_oid, val]),
        "deploy": stage("deploy", {}, [model_oid, result_metrics, data]),
    }
    kind = rng.choice(("user", "user", "user", "event", "schedule"))
    return {
        "version": 2, "flow_run_id": run_id, "flow_name": "train-evaluate-deploy",
        "entrypoint": "flows/pipeline.py:train_evaluate_deploy",
        "started": started, "finished": started + rng.uniform(8, 40), "state": "Completed",
        "error": None, "trigger": {"kind": kind, "user": "bench"},
        "params": _params(rng, days), "params_hash": _oid(rng),
        "code": {"snapshot": _oid(rng, folder=True), "git_commit": f"{rng.getrandbits(160):040x}",
                 "git_dirty": False, "git_diff": None},
        "environment": _oid(rng),
        "inputs": {"get-data.source": {"url": url, "version": data}},
        "data": data, "stages": stages, "models": [model],
        "mlflow": {"run_id": mlflow_run, "model_name": MODEL, "model_version": version,
                   "tracking_uri": tracking_uri},
        "store": "",
    }


def make_records(n: int, home: Path) -> list[dict[str, Any]]:
    """``n`` runs over the last ``n`` x 10 minutes; new data every 100 runs."""
    rng = random.Random(12)
    start = time.time() - n * 600
    records: list[dict[str, Any]] = []
    champion: tuple[str, float] | None = None
    data = ""
    for i in range(n):
        if i % 100 == 0:
            data = _oid(rng, folder=True)
        record = make_record(i, rng, start + i * 600, home, data, 3 + i // 100, champion)
        model = record["models"][0]
        if model["promoted"]:
            champion = (model["version"], model["value"])
        records.append(record)
    return records


def register_versions(home: Path, records: list[dict[str, Any]]) -> str:
    """One MLflow model version per run, tagged as ``register_model`` tags it; the champion alias."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(MODEL)
    champion = "1"
    for record in records:
        model = record["models"][0]
        client.create_model_version(
            MODEL, source=(home / "mlartifacts" / model["version"]).as_uri(),
            tags={"prefect_flow_run_id": record["flow_run_id"], "model_oid": model["model_oid"]})
        if model["promoted"]:
            champion = model["version"]
    client.set_registered_model_alias(MODEL, "champion", champion)
    return next(r["flow_run_id"] for r in records if r["models"][0]["version"] == champion)


# -- dvc, the same number of experiments --------------------------------------------------

def make_dvc_repo(repo: Path, records: list[dict[str, Any]], dvc: Path) -> None:
    """A dvc repo whose baseline commit has ``len(records)`` experiments, as ``dvc exp save`` leaves them."""
    repo.mkdir(parents=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}

    def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True, **kwargs)

    def files(record: dict[str, Any]) -> dict[str, bytes]:
        params = {"train": {k: record["params"]["train"][k] for k in ("C", "classifier")},
                  "split": {"seed": record["params"]["split"]["seed"]}}
        import yaml

        return {"params.yaml": yaml.safe_dump(params).encode(),
                "metrics.json": json.dumps(record["models"][0]["metrics"]).encode()}

    run("git", "init", "-q", "-b", "main")
    run(str(dvc), "init", "-q")
    for name, data in files(records[0]).items():
        (repo / name).write_bytes(data)
    (repo / "dvc.yaml").write_text("metrics:\n- metrics.json\nparams:\n- params.yaml\n")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "baseline")
    base = run("git", "rev-parse", "HEAD").stdout.decode().strip()
    # NOTE: dvc keeps each experiment as a commit on the baseline under
    # refs/exps/<2 hex>/<38 hex>/<name>; git fast-import writes them all at once.
    stream = []
    for i, record in enumerate(records):
        ref = f"refs/exps/{base[:2]}/{base[2:]}/exp-{i:05d}"
        stream.append(f"commit {ref}\nmark :{i + 1}\n"
                      f"committer bench <bench@example.com> {int(record['started'])} +0000\n"
                      f"data 4\nexp\nfrom {base}\n".encode())
        for name, data in files(record).items():
            stream.append(f"M 644 inline {name}\ndata {len(data)}\n".encode() + data + b"\n")
        stream.append(b"\n")
    run("git", "fast-import", "--quiet", input=b"".join(stream))


# -- timing -------------------------------------------------------------------------------

def time_command(argv: list[str], env: dict[str, str], cwd: Path, repeat: int,
                 before: Callable[[], None] | None = None) -> tuple[list[float], str]:
    """Wall-clock seconds of ``repeat`` fresh processes (one untimed first) and the last output."""
    samples = []
    out = ""
    for i in range(repeat + 1):
        if before is not None:
            before()
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        out = done.stdout
        if i:  # NOTE: the first run only warms the page cache, as a user's second look would
            samples.append(elapsed)
    return samples, out


PHASES = """
import io, json, time
started = time.perf_counter()
from rich.console import Console
from uncool_prefect.cli import experiments as cli  # what `uncool exp show` imports
from uncool_prefect.records import experiments as E
from uncool_prefect.records import exp_table
from uncool_prefect.settings import get_settings, open_store
phases = {"imports (cli, store, rich)": time.perf_counter() - started}
def phase(name, call):
    started = time.perf_counter()
    value = call()
    phases[name] = time.perf_counter() - started
    return value
store = phase("open the store (s3fs, botocore on S3)", lambda: open_store(None))
phase("one listing of runs/", lambda: list(store.backend.list("runs")))
from uncool_prefect.records import packs
listed = phase("one listing of run-packs/", lambda: packs.list_packs(store.backend))
data = phase("GET the newest pack", lambda: store.backend.read_bytes(listed[0][0]) if listed else b"")
phase("check + parse it (sha256, JSON)",
      lambda: packs.decode_pack(listed[0][0], data) if listed else None)
records = phase("read_records: listings + packs + reads (+ cache)", lambda: E.read_records(store))
home = get_settings().home
phase("champion (registry)", lambda: E.champion_run_ids(records, home))
E.read_records = lambda store: records
table = phase("rows (params diff, metrics) + champion again", lambda: E.exp_rows(store, home))
def layout():
    fast = exp_table.render_table_fast(table)
    width = Console(width=1001).measure(fast).maximum
    Console(file=io.StringIO(), width=width, highlight=False, soft_wrap=True).print(fast)
phase("table layout (one pass)", layout)
print(json.dumps(phases))
"""


def phases(env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Where one ``exp show`` spends its time, phase by phase, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", PHASES], env=env, cwd=cwd, capture_output=True,
                          text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def fmt(samples: list[float]) -> str:
    return (f"{statistics.median(samples):6.3f} s  "
            f"[{', '.join(f'{s:.3f}' for s in sorted(samples))}]")


def check_table(out: str, records: list[dict[str, Any]], champion: str, where: str) -> None:
    """Every run shows once (oldest first) and the champion's row says so."""
    lines = [line for line in out.splitlines() if line.startswith("│")]
    shown = [line.split("│")[1].split()[0] for line in lines]
    expected = [r["flow_run_id"][:8] for r in sorted(records, key=lambda r: r["started"])]
    if shown != expected:
        raise SystemExit(f"{where}: {len(shown)} rows shown, {len(expected)} expected, or out of order")
    marked = [line.split("│")[1].split()[0] for line in lines if "champion" in line.split("│")[-2]]
    if marked != [champion[:8]]:
        raise SystemExit(f"{where}: champion rows {marked}, expected {champion[:8]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="run records to show")
    parser.add_argument("--repeat", type=int, default=5, help="timed processes per case")
    parser.add_argument("--dvc-exps", type=int, default=None,
                        help="experiments in the dvc repo (default: --runs)")
    parser.add_argument("--dvc-repeat", type=int, default=2, help="timed dvc exp show runs")
    parser.add_argument("--skip-dvc", action="store_true", help="leave dvc exp show out")
    parser.add_argument("--keep", action="store_true", help=f"keep {WORK}")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    from uncool_prefect.records.reading import RACY_S, RECORD_CACHE
    from uncool_prefect.store import ObjectStore
    from uncool_prefect.store.objects import RUN_PACKS_DIR

    shutil.rmtree(WORK, ignore_errors=True)
    home = WORK / "home"
    project = WORK / "project"  # an empty folder to run in: no pyproject, no .env
    project.mkdir(parents=True)
    home.mkdir(parents=True)
    try:
        records = make_records(args.runs, home)
        setup = time.perf_counter()
        champion = register_versions(home, records)
        local = ObjectStore(home / "store", state_dir=WORK / "state")
        for record in records:
            local.put_run_record(record["flow_run_id"], {**record, "store": local.url})
        size = sum(p.stat().st_size for p in (home / "store" / "runs").iterdir())
        print(f"{args.runs} run records, {size / len(records) / 1000:.1f} KB each on average; "
              f"MLflow registry with {args.runs} versions (setup {time.perf_counter() - setup:.1f} s)")

        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("UNCOOL_", "MLFLOW_", "AWS_ENDPOINT"))}
        base_env.update(CREDENTIALS, UNCOOL_HOME=str(home), COLUMNS="200")
        uncool = [bin_path("uncool"), "exp", "show"]
        results: dict[str, list[float]] = {}
        print(f"load average at start: {loadavg()}")
        results["python -c pass"], _ = time_command([sys.executable, "-c", "pass"], base_env,
                                                    project, args.repeat)
        results['python -c "import prefect"'], _ = time_command(
            [sys.executable, "-c", "import prefect"], base_env, project, args.repeat)
        env = {**base_env, "UNCOOL_STORE": str(home / "store")}
        results["uncool exp show, local store"], local_out = time_command(uncool, env, project,
                                                                          args.repeat)
        check_table(local_out, records, champion, "local")
        breakdown = {"local": phases(env, project)}

        with moto_server() as endpoint:
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket=BUCKET)
            url = f"s3://{BUCKET}/store"
            remote = ObjectStore(url, state_dir=WORK / "state-s3", storage_options={
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}})
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda r: remote.put_run_record(r["flow_run_id"],
                                                              {**r, "store": local.url}), records))
            uploaded = time.time()
            results[f"raw s3fs: list + cat the {args.runs} records"], _ = time_command(
                [sys.executable, "-c", RAW_S3FS, endpoint, f"{BUCKET}/store/runs"], base_env,
                project, args.repeat)
            state = WORK / "state-cli"
            env = {**base_env, "UNCOOL_STORE": url, "AWS_ENDPOINT_URL": endpoint,
                   "UNCOOL_STATE_DIR": str(state)}
            cache = state / RECORD_CACHE

            def record_packs() -> list[str]:
                return [rel for rel, _ in remote.backend.list(RUN_PACKS_DIR)]

            def no_cache_no_pack() -> None:
                cache.unlink(missing_ok=True)
                for rel in record_packs():
                    remote.backend.delete(rel)

            # NOTE: records younger than the racy window are neither cached nor packed.
            wait = uploaded + RACY_S + 1 - time.time()
            if wait > 0:
                print(f"waiting {wait:.0f} s: records are cached and packed once {RACY_S:.0f} s old",
                      flush=True)
                time.sleep(wait)
            results["uncool exp show, S3, very first look (reads all, packs)"], s3_out = time_command(
                uncool, env, project, args.repeat, before=no_cache_no_pack)
            check_table(s3_out, records, champion, "S3, very first look")
            if len(record_packs()) != 1:
                raise SystemExit(f"the very first look left {record_packs()} in {RUN_PACKS_DIR}/")
            no_cache_no_pack()
            breakdown["S3, very first"] = phases(env, project)

            results["uncool exp show, S3, first look on another machine (pack)"], s3_out = time_command(
                uncool, env, project, args.repeat, before=lambda: cache.unlink(missing_ok=True))
            check_table(s3_out, records, champion, "S3, first look on another machine")
            cache.unlink(missing_ok=True)
            breakdown["S3, other machine"] = phases(env, project)

            results["uncool exp show, S3, again (records cached)"], s3_out = time_command(
                uncool, env, project, args.repeat)
            if not cache.exists():
                raise SystemExit(f"no record cache at {cache}")
            breakdown["S3, again"] = phases(env, project)
        check_table(s3_out, records, champion, "S3, again")
        if s3_out != local_out:
            raise SystemExit("the S3 store printed another table than the local one")

        if not args.skip_dvc:
            dvc = dvc_bin()
            version = subprocess.run([str(dvc), "--version"], capture_output=True, text=True,
                                     check=True).stdout.strip()
            exps = records[:args.dvc_exps] if args.dvc_exps is not None else records
            repo = WORK / "dvc-repo"
            make_dvc_repo(repo, exps, dvc)
            results[f"dvc exp show ({len(exps)} experiments, dvc {version})"], dvc_out = time_command(
                [str(dvc), "exp", "show", "--no-pager"], {**base_env, "DVC_NO_ANALYTICS": "1"},
                repo, args.dvc_repeat)
            shown = sum(line.count("exp-") for line in dvc_out.splitlines())
            if shown != len(exps):
                raise SystemExit(f"dvc exp show listed {shown} of {len(exps)} experiments")
        print(f"load average at end: {loadavg()}")

        print(f"\n{'case':58} {'median':>8}  [samples, fresh processes]")
        for name, samples in results.items():
            print(f"{name:58} {fmt(samples)}")
        print(f"\nwhere the time goes, one in-process run each (s): {', '.join(breakdown)}")
        for name in next(iter(breakdown.values())):
            print(f"  {name:48} " + "  ".join(f"{b[name]:6.3f}" for b in breakdown.values()))
        floor = statistics.median(results['python -c "import prefect"'])
        print(f"\ngoal: uncool exp show over {args.runs} runs <= {GOAL_S:.1f} s, local and S3")
        for name, samples in results.items():
            if name.startswith("uncool"):
                ours = statistics.median(samples)
                verdict = "met" if ours <= GOAL_S else "MISSED"
                print(f"  {name}: {ours:.3f} s, {ours / floor:.2f}x import-Prefect -> {verdict}")
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
