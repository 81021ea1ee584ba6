"""The Prefect UI in a real browser: a finished pipeline run, as a user sees it.

Headless Chromium, started for a closed network, is driven over the DevTools
protocol (a websocket on loopback): open a page of the UI served by the test
Prefect server, poll the rendered text until the expected names appear (with
a deadline), then take a screenshot. Each check's screenshot is written to the
test's tmp folder; with `UNCOOL_UI_SCREENSHOT_DIR` set it is copied there too:

    UNCOOL_UI_SCREENSHOT_DIR=docs .venv/bin/python -m pytest tests/test_ui.py -q

Chromium comes from Debian's `chromium` package: if it is not on PATH the
`chromium` fixture installs it with apt-get (root only), and skips with the
reason where that cannot be done.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from project import Project

from uncool_prefect.reports import artifact_key
from uncool_prefect.sources import write_sample

pytestmark = pytest.mark.slow

FLOW = "train-evaluate-deploy"
STAGES = ["get-data", "split", "train", "evaluate", "deploy"]
REPORT_KEY, METRICS_KEY, CONFUSION_KEY = (artifact_key("issue-labeler", kind)
                                          for kind in ("report", "metrics", "confusion"))
ARTIFACT_KEYS = [REPORT_KEY, METRICS_KEY, CONFUSION_KEY]
WIDTH, HEIGHT = 1400, 900
PAGE_DEADLINE_S = 45.0
FINAL_LOG = "Finished in state Completed()"
GRAPH_LOADED = "performance.getEntriesByType('resource').some(e => e.name.includes('/graph-v2'))"

# NOTE: a closed network: nothing in the browser may try to reach the outside
# (updates, sync, safe browsing, metrics), and there is no GPU or display.
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-domain-reliability", "--disable-breakpad",
    "--disable-client-side-phishing-detection", "--disable-features=Translate,MediaRouter",
    "--metrics-recording-only", "--no-pings", "--password-store=basic", "--use-mock-keychain",
    "--hide-scrollbars", "--mute-audio", f"--window-size={WIDTH},{HEIGHT}",
]


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    # NOTE: wait for a dpkg lock held by another apt instead of failing at once.
    command = ["apt-get", "-o", "DPkg::Lock::Timeout=300", *args]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of Debian's Chromium; installed with apt-get when it is missing."""
    found = _find_chromium()
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip(f"chromium is not installed and apt-get needs root (running as uid {os.geteuid()})")
    started = time.monotonic()
    install = ("install", "-y", "--no-install-recommends", "chromium")
    done = _apt_get(*install)
    if done.returncode != 0 and ("Unable to locate package" in done.stderr
                                 or "no installation candidate" in done.stderr):
        # No package lists yet (a fresh container): fetch them once, then retry.
        update = _apt_get("update")
        if update.returncode != 0:
            pytest.skip(f"chromium is not installed and apt-get update failed: "
                        f"{_last_line(update.stderr or update.stdout)}")
        done = _apt_get(*install)
    if done.returncode != 0:
        pytest.skip(f"chromium is not installed and apt-get failed: {_last_line(done.stderr or done.stdout)}")
    found = _find_chromium()
    if not found:
        pytest.skip("apt-get installed chromium but no chromium executable is on PATH")
    print(f"installed chromium in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return found


class DevToolsError(RuntimeError):
    """The browser answered a DevTools call with an error, or not at all."""


class Browser:
    """One headless Chromium tab driven over the Chrome DevTools protocol."""

    def __init__(self, executable: str, workdir: Path) -> None:
        from websockets.sync.client import connect

        profile = workdir / "profile"
        self.log_path = workdir / "chromium.log"
        # NOTE: Chromium's stderr is noisy on a headless, GPU-less box; it goes
        # to a log file (named in failures), never into the test's output.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        try:
            port = self._wait_for_port(profile / "DevToolsActivePort")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                targets = json.load(resp)
            page = next(t for t in targets if t["type"] == "page")
            self._socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            self._next_id = 0
            self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _wait_for_port(self, port_file: Path) -> int:
        # Chromium writes the port it bound (we asked for 0: any free one) into the profile.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DevToolsError(f"chromium exited with {self.process.returncode}: "
                                    f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if port_file.exists():
                first = port_file.read_text().split("\n", 1)[0]
                if first.isdigit():
                    return int(first)
            time.sleep(0.1)
        raise DevToolsError(f"chromium opened no DevTools port in 30 s; log: {self.log_path}")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message_id = self._next_id
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + 30
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevToolsError(f"{method}: no answer from chromium in 30 s")
            try:
                reply = json.loads(self._socket.recv(timeout=remaining))
            except TimeoutError as exc:
                raise DevToolsError(f"{method}: no answer from chromium in 30 s") from exc
            if reply.get("id") != message_id:
                continue  # an event; none is enabled, but skip any that come
            if "error" in reply:
                raise DevToolsError(f"{method}: {reply['error']}")
            return dict(reply["result"])

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Navigate, and return once the new document has replaced the old one."""
        # NOTE: a mark on the old document's window: until it is gone, what we
        # read could still be the previous page.
        self.evaluate("window.__uncoolOld = true")
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise DevToolsError(f"cannot open {url}: {result['errorText']}")
        self._poll(lambda: not self.evaluate("window.__uncoolOld === true"), f"opening {url}")

    def click(self, selector: str, text: str) -> None:
        """Click the innermost `selector` element whose text is `text`, once it is there, as a user would."""
        find = (f"Array.from(document.querySelectorAll({json.dumps(selector)}))"
                f".filter(e => e.textContent.trim() === {json.dumps(text)}).pop()")
        self.wait_for(f"{find} !== undefined", f"waiting for {selector} {text!r}")
        self.evaluate(f"(e => {{ e.scrollIntoView(); e.click(); }})({find})")

    def wait_for(self, expression: str, what: str) -> None:
        """Poll a JavaScript condition until it is true, for at most PAGE_DEADLINE_S."""
        self._poll(lambda: self.evaluate(expression), what)

    def _poll(self, condition: Callable[[], Any], what: str, deadline_s: float = PAGE_DEADLINE_S) -> None:
        deadline = time.monotonic() + deadline_s
        while not condition():
            if time.monotonic() > deadline:
                raise DevToolsError(f"{what}: not done in {deadline_s:.0f} s")
            time.sleep(0.1)

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def wait_for_text(self, expected: list[str],
                      deadline_s: float = PAGE_DEADLINE_S) -> tuple[str, list[str]]:
        """Poll the page's text until every expected string is in it; (text, missing)."""
        deadline = time.monotonic() + deadline_s
        while True:
            text = self.text()
            missing = [item for item in expected if item not in text]
            if not missing or time.monotonic() > deadline:
                return text, missing
            time.sleep(0.2)

    def screenshot(self, path: Path, settle_s: float = 10.0) -> Path:
        """A PNG of the viewport once two shots in a row are the same (canvas drawn, fonts in)."""
        deadline = time.monotonic() + settle_s
        previous = b""
        while True:
            png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
            if png == previous or time.monotonic() > deadline:
                break
            previous = png
            time.sleep(0.3)
        path.write_bytes(png)
        return path

    def close(self) -> None:
        socket = getattr(self, "_socket", None)
        if socket is not None:
            socket.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class FinishedRun:
    ui: str
    flow_run_id: str
    flow_run_name: str
    state: str
    task_runs: dict[str, str]  # task run name -> state name
    stage_runs: list[str]  # the task run of each stage, in pipeline order
    report_id: str
    report_title: str


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> FinishedRun:
    """One pipeline run on the test server, and what the server says about it."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterSubFlowRuns,
    )

    project = Project(tmp_path_factory.mktemp("ui"), "ui-check")
    write_sample(project.data, days=2, seed=3)
    _, flow_run_id = project.run_flow()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(UUID(flow_run_id))
        flow = client.read_flow(flow_run.flow_id)
        # NOTE: without the task runs that stand for a subflow (a sweep, say):
        # the page counts and lists those under Subflow Runs.
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
            task_run_filter=TaskRunFilter(subflow_runs=TaskRunFilterSubFlowRuns(exists_=False)),
        )
        [report] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[REPORT_KEY]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
        ))
    assert flow.name == FLOW
    states = {run.name: str(run.state_name) for run in task_runs}
    # Task run names are "<task name>-<3 hex>": one per stage, each Completed.
    stage_runs = [name for stage in STAGES for name in states
                  if re.fullmatch(rf"{stage}-[0-9a-f]{{3}}", name)]
    assert [name.rsplit("-", 1)[0] for name in stage_runs] == STAGES, states
    assert all(states[name] == "Completed" for name in stage_runs), states
    return FinishedRun(ui=prefect_server.removesuffix("/api"), flow_run_id=flow_run_id,
                       flow_run_name=flow_run.name, state=str(flow_run.state_name),
                       task_runs=states, stage_runs=stage_runs, report_id=str(report.id),
                       # "# issue-labeler v1: promoted to **champion**", as the page renders it
                       report_title=str(report.data).splitlines()[0].removeprefix("# ").replace("**", ""))


@pytest.fixture(scope="module")
def browser(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    chrome = Browser(chromium, tmp_path_factory.mktemp("chromium"))
    try:
        yield chrome
    finally:
        chrome.close()


def _keep(screenshot: Path) -> None:
    """Copy a screenshot to UNCOOL_UI_SCREENSHOT_DIR when that is set (docs/ for the README)."""
    target = os.environ.get("UNCOOL_UI_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, Path(target) / screenshot.name)


def _check_page(browser: Browser, expected: list[str], screenshot: Path, *, url: str | None = None,
                click: tuple[str, str] | None = None, ready: str | None = None) -> str:
    """Open a page or click an element, wait for the expected text, screenshot; the page text."""
    if url:
        browser.open(url)
    if click:
        browser.click(*click)
    text, missing = browser.wait_for_text(expected)
    if ready and not missing:
        browser.wait_for(ready, f"waiting for {ready}")
    browser.screenshot(screenshot)
    screenshot.with_suffix(".txt").write_text(text)
    assert not missing, (
        f"{url or click} did not show {missing} within {PAGE_DEADLINE_S:.0f} s; screenshot {screenshot}, "
        f"chromium log {browser.log_path}; page text:\n{text[:3000]}"
    )
    return text


def _flow_run_page(run: FinishedRun) -> str:
    return f"{run.ui}/runs/flow-run/{run.flow_run_id}"


def test_flow_run_page_shows_the_run_its_state_and_its_logs(
    browser: Browser, finished_run: FinishedRun, tmp_path: Path
) -> None:
    run = finished_run
    assert run.state == "Completed"
    # The header (run name, state, flow) and the Logs tab, the page's default.
    expected = [f"Runs\n{run.flow_run_name}\nCompleted", f"Flow\n{FLOW}", f"{len(run.task_runs)} Task runs",
                f"Beginning flow run '{run.flow_run_name}' for flow '{FLOW}'", FINAL_LOG]
    _check_page(browser, expected, tmp_path / "ui-flow-run.png", url=_flow_run_page(run),
                # The run graph is a canvas: its data must be in before the screenshot settles.
                ready=GRAPH_LOADED)
    _keep(tmp_path / "ui-flow-run.png")


def test_task_runs_tab_lists_every_stage_completed(
    browser: Browser, finished_run: FinishedRun, tmp_path: Path
) -> None:
    run = finished_run
    browser.open(_flow_run_page(run))
    # NOTE: the tab is in the URL (?tab=Task+Runs) but the page resets it to
    # Logs while the run loads, so the tab is clicked, as a user does.
    expected = [f"{len(run.task_runs)} Task runs", *(f"{name}\nCompleted" for name in run.stage_runs)]
    text = _check_page(browser, expected, tmp_path / "ui-task-runs.png", click=("li.p-tab", "Task Runs"))
    assert browser.evaluate("location.search") == "?tab=Task+Runs"
    assert FINAL_LOG not in text  # the names come from the task run list, not from the logs


def test_artifacts_tab_shows_the_report_artifacts(
    browser: Browser, finished_run: FinishedRun, tmp_path: Path
) -> None:
    run = finished_run
    browser.open(_flow_run_page(run))
    expected = [f"MARKDOWN\n{REPORT_KEY}", f"TABLE\n{METRICS_KEY}", f"TABLE\n{CONFUSION_KEY}"]
    text = _check_page(browser, expected, tmp_path / "ui-artifacts.png", click=("li.p-tab", "Artifacts"))
    assert browser.evaluate("location.search") == "?tab=Artifacts"
    assert FINAL_LOG not in text

    # The report card opens this run's report, rendered, with the run and task that made it.
    expected = [REPORT_KEY, run.report_title, "Why:", run.flow_run_name, run.stage_runs[-1]]
    text = _check_page(browser, expected, tmp_path / "ui-report.png", click=("*", REPORT_KEY))
    assert browser.evaluate("location.pathname") == f"/artifacts/artifact/{run.report_id}", text[:3000]
    _keep(tmp_path / "ui-report.png")


def test_the_page_of_another_flow_run_does_not_show_this_one(
    browser: Browser, finished_run: FinishedRun, tmp_path: Path
) -> None:
    # The negative control for the checks above: an unknown run id is not this run.
    page = f"{finished_run.ui}/runs/flow-run/{uuid.uuid4()}"
    text = _check_page(browser, ["Page not found"], tmp_path / "ui-unknown-run.png", url=page)
    assert finished_run.flow_run_name not in text
    assert not any(name in text for name in finished_run.task_runs)
