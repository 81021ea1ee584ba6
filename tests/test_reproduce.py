"""The disappearance scenario: from a model version alone, re-create the model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from uncool_prefect.sources import write_sample
from uncool_prefect.store import ObjectStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

UNCOOL = str(Path(sys.executable).with_name("uncool"))
PROJECT = Path(__file__).resolve().parents[1]


def test_a_newcomer_reproduces_the_champion_from_the_store_alone(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    env = {**os.environ, "UNCOOL_HOME": str(home), "UNCOOL_BLOCK": "island",
           "UNCOOL_STORE": str(home / "store"), "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def uncool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([UNCOOL, *args], capture_output=True, text=True, timeout=300,
                              cwd=PROJECT, env=env)

    write_sample(data, days=2, seed=11)
    first = uncool("run", "-S", "data.source=folder", "-S", f"data.folder.url={data}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # The researcher disappears: only the store and the MLflow database remain.
    shutil.rmtree(data)
    for leftover in home.iterdir():
        if leftover.name not in ("store", "mlflow.db"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    dataset = re.search(r"([0-9a-f]{64}\.dir)", first.stdout).group(1)  # type: ignore[union-attr]
    lineage = uncool("lineage", "champion", "--json")
    assert lineage.returncode == 0, lineage.stderr
    upstream = json.loads(lineage.stdout)["upstream"]
    assert upstream["data"] == dataset and upstream["config"]["params"]["train"]["C"] == 4.0

    handover = tmp_path / "handover"
    checkout = uncool("checkout", "champion", str(handover))
    assert checkout.returncode == 0, checkout.stderr
    restored = sorted(p.name for p in (handover / "data").rglob("*.txt"))
    assert len(restored) == 120  # two days of 60 sample issues, back from the store
    assert (handover / "code" / "flows" / "pipeline.py").exists()
    assert (handover / "model.pkl").stat().st_size > 0 and (handover / "RUN.md").exists()

    done = uncool("reproduce", "champion")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every stage reproduced byte for byte" in done.stdout
    # get-data, split (train, val), train (the model and each trial's), evaluate; deploy
    # registers into a scratch registry and is reported, not compared.
    assert done.stdout.count("identical") == 7 and "different" not in done.stdout
    assert "registers a model: not compared" in done.stdout
    records = [json.loads(p.read_text()) for p in (home / "store" / "runs").glob("*.json")]
    original = json.loads(lineage.stdout)["flow_run_id"]
    assert [r["trigger"] for r in records if r["trigger"]["kind"] == "reproduce"] == [
        {"kind": "reproduce", "of": original, "user": records[0]["trigger"]["user"]}
    ]

    # A record whose model differs from what its inputs give is reported, not hidden.
    record_path = home / "store" / "runs" / f"{original}.json"
    record = json.loads(record_path.read_text())
    record["stages"]["train"]["outputs"]["model"] = record["stages"]["split"]["outputs"]["val"]
    record_path.write_text(json.dumps(record))
    diverged = uncool("reproduce", original)
    assert diverged.returncode == 1, diverged.stdout[-2000:] + diverged.stderr[-2000:]
    assert "first divergence: train" in diverged.stderr
    assert "not deterministic" in diverged.stderr  # same config, data, code, environment

    # Tamper with one stored file of the data snapshot: both tools name it.
    store = ObjectStore(home / "store")
    victim = store.read_manifest(dataset).entries[0].oid
    path = Path(store.url_of(victim))
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-2] + b"!\n")

    verify = uncool("store", "verify")
    assert verify.returncode == 1 and f"corrupt: {victim}" in verify.stdout

    again = uncool("reproduce", "champion")
    assert again.returncode != 0
    assert victim in again.stdout + again.stderr
    assert "Traceback" not in again.stdout + again.stderr
