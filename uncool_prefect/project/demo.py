"""``uncool demo``: the store demonstrated end to end through Prefect."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rich.console import Console

from ..settings import get_settings
from . import server

DEMO_BLOCK = "uncool-demo"
DEMO_MODULE = "uncool_prefect.project.store_demo"


def run_demo(runs: int = 2, console: Console | None = None) -> int:
    console = console or Console()
    settings = get_settings()
    info = server.ensure(settings.home)
    started = " (started in the background; `uncool server stop` stops it)" if info.pid else ""
    console.print(f"Prefect server: {info.ui_url}{started}")
    env = {**os.environ, "PREFECT_API_URL": info.api_url}
    store_url = settings.store_url
    uncool = [sys.executable, "-m", "uncool_prefect.cli"]
    subprocess.run(
        [*uncool, "block", "register", DEMO_BLOCK, "--basepath", store_url],
        env=env, check=True,
    )
    for number in range(1, runs + 1):
        console.print(f"\n[bold]run {number}[/bold] (a new process): python -m {DEMO_MODULE}")
        done = subprocess.run(
            [sys.executable, "-m", DEMO_MODULE], env=env, capture_output=True, text=True,
        )
        states = None
        for line in done.stdout.splitlines():
            if line.startswith("UNCOOL_DEMO_STATES "):
                states = json.loads(line.split(" ", 1)[1])
        if done.returncode != 0 or states is None:
            console.print(done.stdout[-4000:], done.stderr[-4000:])
            console.print(f"[red]the demo flow failed (exit {done.returncode})[/red]")
            return 1
        for task_name, state in states.items():
            console.print(f"  {task_name:<20} {state}")
        if number > 1 and all(state == "Cached" for state in states.values()):
            console.print("  every task Cached: results read back from the store, verified")
    console.print(f"\n[bold]uncool store du[/bold] --basepath {store_url}")
    subprocess.run([*uncool, "store", "du", "--basepath", store_url], env=env, check=True)
    console.print(f"\nSee the runs at {info.ui_url}/runs")
    return 0
