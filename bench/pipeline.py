"""Benchmark: ``uncool run`` (the issue labeler on Prefect) beside ``dvc repro``.

Usage::

    .venv/bin/python bench/pipeline.py [--repeat 3]

Everything happens under ``bench/.work/pipeline/`` (gitignored, wiped at the
start): a fresh ``UNCOOL_HOME`` (store and MLflow SQLite), a Prefect server
started here on a free loopback port with its own ``PREFECT_HOME`` (stopped at
the end, even on errors), and the sample data
(``write_sample(dir, days=3, seed=0)``).

Ours: ``uncool run -S data.source=folder -S data.folder.url=<sample>`` as a
subprocess from the project root, as a user runs it, timed wall clock:

1. cold: the first run, every stage computes;
2. no-op: the same command again, every stage should be Cached;
3. one param: ``-S train.C=<a value not used before>``; train, evaluate and
   deploy should re-run, get-data and split be Cached.

Also timed: ``uncool status`` with nothing changed (it must predict every stage
Cached), and ``python -c "import prefect"``, the floor of any Prefect command.
The goals at the end are ratios of medians measured in this same run.

Which stages re-ran is read from the server (the task runs of the flow run
whose id ``uncool run`` prints) and checked against the stage table it prints.
``uncool run`` pays Python, Prefect and MLflow imports and loads the champion
to show a prediction, so the no-op flow call is also timed in one process
(``runner.load_flow`` once, then the flow called ``1 + repeat`` times; the
first call is left out).

DVC: ``dvc`` from a throwaway virtualenv (``bench/.work/dvc-venv``, created
with ``pip install dvc`` if missing; never a project dependency) runs an
equivalent 4-stage pipeline (get_data, split, train, evaluate; DVC has no
deploy stage) in a scratch ``git init`` + ``dvc init`` repo. The stages are
small scripts run by the *project's* Python (so the same scikit-learn), using
a copy of ``flows/labeler.py``, a copy of ``flows/params.yaml`` and a copy of
the same sample data. Timed: ``dvc repro`` cold, no-op, and after changing
``train.C`` in params.yaml; which stages re-ran is read from its output.

Ours also logs to MLflow (a run per training with the model, a registered
version, the champion alias), which ~1.4 s of a training run's imports and
store opening go to. So the same dvc pipeline runs a second time with its
evaluate stage also doing that MLflow work, where the model and metrics are at
hand (MLflow SQLite beside the repo), as a dvc user would add it without a
process of its own: the ratios against both are printed.

Re-run cases report the median of ``--repeat`` runs (min-max in brackets).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import bin_path as _bin
from _common import dvc_bin, prefect_server

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "pipeline"
PYTHON = Path(sys.executable)
STAGES = ("get-data", "split", "train", "evaluate", "deploy")
DVC_STAGES = ("get_data", "split", "train", "evaluate")
GOAL_NOOP_S = 2.0
TIMEOUT_S = 900
FLOW_RUN = re.compile(r"flow-run/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
TABLE_ROW = re.compile(r"^\W*(get-data|split|train|evaluate|deploy)\W+([A-Za-z]+)\W*$")
JSON_MARK = "BENCH-JSON "


# -- helpers -----------------------------------------------------------------

def _post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def _run(command: Sequence[str], *, cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Run a command, return (wall seconds, stdout+stderr); raise with its output if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return wall, proc.stdout


@dataclass
class Sample:
    """One timed run and what re-ran in it."""

    wall: float
    reran: tuple[str, ...]
    cached: tuple[str, ...]
    states: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(s.wall for s in self.samples)

    def wall_text(self) -> str:
        if not self.samples:
            return "-"
        walls = [s.wall for s in self.samples]
        if len(walls) == 1:
            return f"{walls[0]:.2f}"
        return f"{self.median:.2f} [{min(walls):.2f}-{max(walls):.2f}]"

    def reran_text(self, total: int) -> str:
        if not self.samples:
            return "-"
        counts = sorted({len(s.reran) for s in self.samples})
        names = sorted({s.reran for s in self.samples})
        count = "/".join(str(c) for c in counts)
        label = "none" if names == [()] else "; ".join(",".join(n) or "none" for n in names)
        return f"{count} of {total} ({label})"


# -- ours ------------------------------------------------------------------------

class Ours:
    def __init__(self, api_url: str, home: Path, prefect_home: Path, data: Path) -> None:
        self.api_url = api_url
        self.data = data
        self.env = {**os.environ, "UNCOOL_HOME": str(home), "PREFECT_API_URL": api_url,
                    "PREFECT_HOME": str(prefect_home),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        for name in ("MLFLOW_TRACKING_URI", "UNCOOL_STORE", "UNCOOL_STATE_DIR"):
            self.env.pop(name, None)
        self.overrides = ["-S", "data.source=folder", "-S", f"data.folder.url={data}"]

    def states(self, flow_run_id: str) -> dict[str, str]:
        runs = _post_json(f"{self.api_url}/task_runs/filter",
                          {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        found = {run["name"].rsplit("-", 1)[0]: (run.get("state") or {}).get("name", "?")
                 for run in runs}
        return {name: found[name] for name in STAGES if name in found}

    def _sample(self, wall: float, flow_run_id: str) -> Sample:
        states = self.states(flow_run_id)
        if set(states) != set(STAGES):
            raise RuntimeError(f"flow run {flow_run_id}: stages {states}, expected {STAGES}")
        reran = tuple(s for s in STAGES if states[s] != "Cached")
        cached = tuple(s for s in STAGES if states[s] == "Cached")
        return Sample(wall, reran, cached, states)

    def run(self, *extra: str) -> Sample:
        command = [_bin("uncool"), "run", *self.overrides, *extra]
        wall, output = _run(command, cwd=ROOT, env=self.env)
        ids = FLOW_RUN.findall(output)
        if not ids:
            raise RuntimeError(f"no flow run id in the output of uncool run:\n{output[-4000:]}")
        sample = self._sample(wall, ids[-1])
        printed = {m.group(1): m.group(2) for line in output.splitlines()
                   if (m := TABLE_ROW.match(line))}
        if printed != sample.states:
            raise RuntimeError(f"uncool run printed {printed}, the server says {sample.states}")
        return sample

    def status(self, *extra: str) -> Sample:
        """``uncool status --json``: what it predicts for each stage (no flow run)."""
        command = [_bin("uncool"), "status", "--json", *self.overrides, *extra]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
        wall = time.perf_counter() - start
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"uncool status exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        found = json.loads(proc.stdout)
        states = {s["stage"]: "Cached" if s["state"] == "cached" else "Completed"
                  for s in found["stages"]}
        reran = tuple(s for s in STAGES if states.get(s) != "Cached")
        return Sample(wall, reran, tuple(s for s in STAGES if states.get(s) == "Cached"), states)

    def in_process(self, repeat: int) -> tuple[list[Sample], float]:
        """The no-op flow call in one process; returns (timed samples, setup seconds)."""
        overrides = [v for v in self.overrides if v != "-S"]
        _, output = _run([str(PYTHON), "-c", _IN_PROCESS, str(ROOT), str(repeat), *overrides],
                         cwd=ROOT, env=self.env)
        lines = [line for line in output.splitlines() if line.startswith(JSON_MARK)]
        if not lines:
            raise RuntimeError(f"no result from the in-process run:\n{output[-4000:]}")
        report = json.loads(lines[-1][len(JSON_MARK):])
        samples = [self._sample(t, run_id)
                   for t, run_id in zip(report["calls"], report["flow_run_ids"], strict=True)]
        return samples[1:], float(report["setup_s"])


_IN_PROCESS = f"""
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from uncool_prefect.blocks import ensure_store_block
from uncool_prefect.project import runner
from uncool_prefect.config import config_of
from uncool_prefect.settings import get_settings
project, repeat, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
config = config_of(project)
params = runner.resolve_params(config, None, overrides)
flow = runner.load_flow(config)
ensure_store_block(get_settings().block)
setup = time.perf_counter() - t0
calls, ids = [], []
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
with temporary_settings(updates={{PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}}):  # as uncool run
    for _ in range(1 + repeat):
        t = time.perf_counter()
        state = flow(**params, return_state=True)
        state.result()
        calls.append(time.perf_counter() - t)
        ids.append(str(state.state_details.flow_run_id))
print({JSON_MARK!r} + json.dumps({{"setup_s": setup, "calls": calls, "flow_run_ids": ids}}),
      flush=True)
"""


# -- DVC -------------------------------------------------------------------------

_GET_DATA = '''\
"""get_data: validate the <label>/<id>.txt folder, write examples.jsonl sorted by id."""
import json
from pathlib import Path

import yaml

labels = yaml.safe_load(Path("params.yaml").read_text())["data"]["labels"]
rows = []
for folder in sorted(p for p in Path("issues").iterdir() if p.is_dir()):
    if folder.name not in labels:
        raise SystemExit(f"unknown label {folder.name!r}")
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8").strip()
        if text:
            rows.append({"id": path.stem, "text": text, "label": folder.name})
if len({r["label"] for r in rows}) < 2:
    raise SystemExit("need at least two labels")
rows.sort(key=lambda r: r["id"])
Path("data").mkdir(exist_ok=True)
with open("data/examples.jsonl", "w", encoding="utf-8") as f:
    for row in rows:
        f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\\n")
'''

_SPLIT = '''\
from pathlib import Path

import yaml

import labeler

p = yaml.safe_load(Path("params.yaml").read_text())["split"]
rows = labeler.jsonl_to_rows(Path("data/examples.jsonl").read_bytes())
train, val = labeler.split_rows(rows, float(p["test_size"]), int(p["seed"]))
Path("data/train.jsonl").write_bytes(labeler.rows_to_jsonl(train))
Path("data/val.jsonl").write_bytes(labeler.rows_to_jsonl(val))
'''

_TRAIN = '''\
from pathlib import Path

import yaml

import labeler

p = yaml.safe_load(Path("params.yaml").read_text())["train"]
model = labeler.fit(labeler.jsonl_to_rows(Path("data/train.jsonl").read_bytes()), p)
Path("model.pkl").write_bytes(labeler.dump_model(model))
'''

_EVALUATE = '''\
import json
from pathlib import Path

import yaml

import labeler

labels = yaml.safe_load(Path("params.yaml").read_text())["data"]["labels"]
model = labeler.load_model(Path("model.pkl").read_bytes())
rows = labeler.jsonl_to_rows(Path("data/val.jsonl").read_bytes())
metrics, confusion = labeler.evaluate_model(model, rows, labels)
Path("metrics.json").write_text(json.dumps({**metrics, "confusion": confusion}, indent=1))
'''


_REGISTER = '''
# The MLflow work ours does in train + deploy, here where model and metrics are at hand
# (no process of its own): a run with the params, metrics and the model (pickle, as
# uncool logs it), a registered version, the champion alias if better.
import mlflow
import mlflow.sklearn
from mlflow import MlflowClient

mlflow.set_tracking_uri(f"sqlite:///{Path('mlflow.db').absolute()}")
train_params = yaml.safe_load(Path("params.yaml").read_text())["train"]
with mlflow.start_run(run_name="train"):
    mlflow.log_params({k: str(v) for k, v in train_params.items()})
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    info = mlflow.sklearn.log_model(model, name="model", serialization_format="pickle",
                                    pip_requirements=["scikit-learn", "numpy", "scipy"])
version = mlflow.register_model(info.model_uri, "issue-labeler").version
client = MlflowClient()
try:
    champion = client.get_model_version_by_alias("issue-labeler", "champion")
    best = client.get_run(champion.run_id).data.metrics.get("macro_f1", float("-inf"))
except mlflow.exceptions.MlflowException:
    best = float("-inf")
if float(metrics["macro_f1"]) > best:
    client.set_registered_model_alias("issue-labeler", "champion", version)
'''


def _dvc_yaml(python: str, register: bool = False) -> str:
    evaluate_params = "[data.labels, train]" if register else "[data.labels]"
    return f"""\
stages:
  get_data:
    cmd: {python} get_data.py
    deps: [get_data.py, issues]
    params: [data.labels]
    outs: [data/examples.jsonl]
  split:
    cmd: {python} split.py
    deps: [split.py, labeler.py, data/examples.jsonl]
    params: [split.test_size, split.seed]
    outs: [data/train.jsonl, data/val.jsonl]
  train:
    cmd: {python} train.py
    deps: [train.py, labeler.py, data/train.jsonl]
    params: [train]
    outs: [model.pkl]
  evaluate:
    cmd: {python} evaluate.py
    deps: [evaluate.py, labeler.py, model.pkl, data/val.jsonl]
    params: {evaluate_params}
    metrics:
      - metrics.json:
          cache: false
"""


class Dvc:
    def __init__(self, dvc: Path, repo: Path, data: Path, *, register: bool = False) -> None:
        self.dvc = str(dvc)
        self.repo = repo
        self.env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
        self.env.pop("PYTHONPATH", None)
        repo.mkdir(parents=True)
        shutil.copytree(data, repo / "issues")
        shutil.copy2(ROOT / "flows" / "labeler.py", repo / "labeler.py")
        shutil.copy2(ROOT / "flows" / "params.yaml", repo / "params.yaml")
        for name, text in (("get_data.py", _GET_DATA), ("split.py", _SPLIT),
                           ("train.py", _TRAIN),
                           ("evaluate.py", _EVALUATE + (_REGISTER if register else ""))):
            (repo / name).write_text(text)
        (repo / "dvc.yaml").write_text(_dvc_yaml(str(PYTHON), register))
        _run(["git", "init", "-q"], cwd=repo, env=self.env)
        _run([self.dvc, "init", "-q"], cwd=repo, env=self.env)
        _run([self.dvc, "config", "core.analytics", "false"], cwd=repo, env=self.env)
        _run([self.dvc, "config", "core.site_cache_dir", str(repo.parent / "dvc-site-cache")],
             cwd=repo, env=self.env)

    def repro(self) -> Sample:
        wall, output = _run([self.dvc, "repro"], cwd=self.repo, env=self.env)
        ran = set(re.findall(r"Running stage '([\w-]+)'", output))
        skipped = set(re.findall(r"Stage '([\w-]+)' didn't change", output))
        if ran | skipped != set(DVC_STAGES):
            raise RuntimeError(f"cannot tell which stages ran from dvc repro:\n{output}")
        return Sample(wall, tuple(s for s in DVC_STAGES if s in ran),
                      tuple(s for s in DVC_STAGES if s in skipped))

    def set_train_c(self, value: float) -> None:
        import yaml

        path = self.repo / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params["train"]["C"] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))


# -- main ------------------------------------------------------------------------

def _new_c_values(count: int) -> list[float]:
    """Values of train.C not used before (the default is 4.0)."""
    candidates = (2.0 + 0.5 * i for i in range(count + 1))
    return [value for value in candidates if value != 4.0][:count]


def bench(repeat: int) -> int:
    from uncool_prefect.sources import write_sample

    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    data = WORK / "issues"
    write_sample(data, days=3, seed=0)
    n_files = sum(1 for _ in data.rglob("*.txt"))
    c_values = _new_c_values(repeat)

    cases = {key: (Case(name), Case(name), Case(name)) for key, name in (
        ("cold", "cold first run"),
        ("noop", "no-op re-run"),
        ("param", "one-param re-run (train.C)"),
    )}
    in_process = Case("no-op, flow call in-process")
    status = Case("uncool status (nothing changed)")
    floor = Case("python -c 'import prefect' (floor)")
    setup_s = 0.0

    print(f"sample data: {n_files} issues (3 days, seed 0) in {data}", flush=True)
    with prefect_server(WORK / "prefect") as api_url:
        print(f"Prefect server: {api_url}", flush=True)
        ours = Ours(api_url, WORK / "uncool-home", WORK / "prefect", data)
        cases["cold"][0].samples.append(ours.run())
        print(f"  ours cold: {cases['cold'][0].samples[-1].wall:.2f} s", flush=True)
        for _ in range(repeat):
            cases["noop"][0].samples.append(ours.run())
        print(f"  ours no-op: {[round(s.wall, 2) for s in cases['noop'][0].samples]}", flush=True)
        for _ in range(repeat):
            status.samples.append(ours.status())
            wall, _out = _run([str(PYTHON), "-c", "import prefect"], cwd=ROOT, env=ours.env)
            floor.samples.append(Sample(wall, (), ()))
        print(f"  ours status: {[round(s.wall, 2) for s in status.samples]}; import prefect: "
              f"{[round(s.wall, 2) for s in floor.samples]}", flush=True)
        in_process.samples, setup_s = ours.in_process(repeat)
        print(f"  ours no-op in-process: {[round(s.wall, 2) for s in in_process.samples]}",
              flush=True)
        for value in c_values:
            cases["param"][0].samples.append(ours.run("-S", f"train.C={value}"))
        print(f"  ours param: {[round(s.wall, 2) for s in cases['param'][0].samples]}",
              flush=True)

    version = ""
    for column, register in ((1, False), (2, True)):
        dvc = Dvc(dvc_bin(), WORK / ("dvc-mlflow-repo" if register else "dvc-repo"), data,
                  register=register)
        version = subprocess.run([dvc.dvc, "--version"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        cases["cold"][column].samples.append(dvc.repro())
        for _ in range(repeat):
            cases["noop"][column].samples.append(dvc.repro())
        for value in c_values:
            dvc.set_train_c(value)
            cases["param"][column].samples.append(dvc.repro())
        print(f"  dvc {version}{' + MLflow' if register else ''}: cold "
              f"{cases['cold'][column].samples[0].wall:.2f} s, "
              f"no-op {[round(s.wall, 2) for s in cases['noop'][column].samples]}, "
              f"param {[round(s.wall, 2) for s in cases['param'][column].samples]}", flush=True)

    rows = [("case", "ours wall s", "dvc wall s", "dvc+MLflow wall s", "stages re-run ours",
             "stages re-run dvc")]
    for ours_case, dvc_case, dvc_mlflow_case in cases.values():
        rows.append((ours_case.name, ours_case.wall_text(), dvc_case.wall_text(),
                     dvc_mlflow_case.wall_text(), ours_case.reran_text(len(STAGES)),
                     dvc_case.reran_text(len(DVC_STAGES))))
    rows.append((in_process.name, in_process.wall_text(), "-", "-",
                 in_process.reran_text(len(STAGES)), "-"))
    rows.append((status.name, status.wall_text(), "-", "-",
                 "predicts " + status.reran_text(len(STAGES)), "-"))
    rows.append((floor.name, floor.wall_text(), "-", "-", "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    print(f"pipeline benchmark, median of {repeat} for re-runs [min-max]; ours: "
          f"`uncool run` subprocess (5 stages, incl. deploy + MLflow); dvc {version} "
          f"(4 stages, stage scripts on {PYTHON}); dvc+MLflow: the same, its evaluate stage also "
          "doing ours' MLflow work (a run, the model logged, a version registered, the alias)")
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("-|-".join("-" * w for w in widths))
    print(f"in-process setup (imports, load_flow, ensure_store_block) before the first call: "
          f"{setup_s:.2f} s")

    noop = cases["noop"][0].median
    base = floor.median

    def goal(text: str, value: float, limit: float) -> None:
        print(f"  {text}: {value:.2f} vs <= {limit:.2f}: {'met' if value <= limit else 'MISSED'}")

    print()
    print(f"goals (ratios of medians measured above, in this run; import-prefect floor {base:.2f} s):")
    goal("no-op uncool run, whole process, s", noop, GOAL_NOOP_S)
    goal("no-op / dvc repro no-op", noop / cases["noop"][1].median, 3.0)
    goal("no-op / import-prefect floor", noop / base, 3.0)
    goal("uncool status, s", status.median, 1.0)
    goal("uncool status / import-prefect floor", status.median / base, 1.5)
    goal("one param / dvc repro", cases["param"][0].median / cases["param"][1].median, 1.2)
    goal("cold / dvc repro", cases["cold"][0].median / cases["cold"][1].median, 1.5)
    print("  the same work on both sides (dvc's evaluate stage also logging to MLflow):")
    goal("one param / dvc+MLflow repro", cases["param"][0].median / cases["param"][2].median, 1.2)
    goal("cold / dvc+MLflow repro", cases["cold"][0].median / cases["cold"][2].median, 1.5)
    print(f"  (in-process no-op flow call: {in_process.median:.2f} s)")
    expected = {"cold": (STAGES, ()), "noop": ((), STAGES),
                "param": (("train", "evaluate", "deploy"), ("get-data", "split"))}
    exact = all(
        (s.reran, s.cached) == expected[key]
        for key, (ours_case, _, _) in cases.items() for s in ours_case.samples
    ) and all((s.reran, s.cached) == expected["noop"] for s in [*in_process.samples, *status.samples])
    print(f"exactly the stale stages re-run: {'yes' if exact else 'no'} "
          "(cold: all 5; no-op: none; train.C: train, evaluate, deploy)")
    return 0 if exact else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each re-run case; the median is reported (default 3)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the server's finally

    signal.signal(signal.SIGTERM, _terminate)
    return bench(args.repeat)


if __name__ == "__main__":
    sys.exit(main())
