"""One isolated `uncool` user for end-to-end tests: own UNCOOL_HOME, block and data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

UNCOOL = str(Path(sys.executable).with_name("uncool"))
PROJECT = Path(__file__).resolve().parents[1]


class Project:
    """Runs `uncool` in subprocesses with its own store, MLflow database and block."""

    def __init__(self, root: Path, name: str) -> None:
        self.home = root / "home"
        self.data = root / "data"
        self.env = {**os.environ, "UNCOOL_HOME": str(self.home), "UNCOOL_BLOCK": name,
                    "UNCOOL_STORE": str(self.home / "store"), "COLUMNS": "200"}
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def uncool(self, *args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess[str]:
        return subprocess.run([UNCOOL, *args], capture_output=True, text=True, timeout=300,
                              cwd=cwd, env=self.env)

    def run_flow(self, *overrides: str) -> tuple[subprocess.CompletedProcess[str], str]:
        """`uncool run` on the project's data folder; the process and the flow run id."""
        args = ["run", "-S", "data.source=folder", "-S", f"data.folder.url={self.data}"]
        for override in overrides:
            args += ["-S", override]
        done = self.uncool(*args)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        match = re.search(r"runs/flow-run/([0-9a-f-]{36})", done.stdout)
        assert match, done.stdout
        return done, match.group(1)
