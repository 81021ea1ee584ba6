"""What the benchmark scripts share: the throwaway dvc virtualenv and the load average.

dvc is never a dependency of this project: it lives in bench/.work/dvc-venv,
created on first use and reused by every benchmark after that.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DVC_VENV = Path(__file__).resolve().parent / ".work" / "dvc-venv"


def dvc_bin() -> Path:
    """The dvc executable of the throwaway virtualenv, installing it once."""
    dvc = DVC_VENV / "bin" / "dvc"
    if dvc.exists():
        return dvc
    print(f"installing dvc into {DVC_VENV} (once; reused by later runs) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(DVC_VENV)], check=True)
    subprocess.run([str(DVC_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "dvc"],
                   check=True)
    return dvc


def loadavg() -> str:
    """The 1/5/15-minute load average, to tell a quiet machine from a busy one."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"
