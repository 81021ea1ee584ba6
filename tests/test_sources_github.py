"""The GitHub source against a fake GitHub API: a real HTTP server on loopback.

The fake answers in the API's shape: pages of three issues linked with
``Link: <...>; rel="next"``, and a rate-limit answer whose reset lies one
second ahead. Its clock runs ahead by however long the client's injected sleep
was asked to wait, so the client must really wait the limit out, just without
the test spending the wall-clock time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from conftest import _free_port

from uncool_prefect.sources import DataError, Example, fetch_issues, resolve_github_token

TOKEN = "ghp_fAkEtOkEn0123456789abcdefSECRET"
LABELS = ("data-sync", "experiments", "plots")


def issue(number: int, title: str, labels: list[str], created: str, **extra: Any) -> dict[str, Any]:
    return {"number": number, "title": title, "labels": [{"name": name} for name in labels],
            "created_at": created, "updated_at": extra.pop("updated", created), **extra}


ISSUES = [
    issue(1, "dvc pull fails with S3 remote after upgrade", ["data-sync"], "2024-01-05T10:00:00Z"),
    issue(2, "plots: fix legend", ["plots"], "2024-01-06T10:00:00Z", pull_request={"url": "x"}),
    issue(3, "question about caching", [], "2024-01-07T10:00:00Z"),
    issue(4, "push and plot both break", ["data-sync", "plots"], "2024-01-08T10:00:00Z"),
    issue(5, "vega template renders empty axis", ["Plots", "bug"], "2024-01-09T10:00:00Z"),
    issue(6, "exp run loses params", ["experiments"], "2024-03-01T10:00:00Z"),
    issue(7, "old exp issue, edited lately", ["experiments"], "2023-12-20T10:00:00Z",
          updated="2024-01-10T00:00:00Z"),
    issue(8, "  exp show hides params from queued experiments ", ["experiments"], "2024-01-20T10:00:00Z"),
    issue(9, "plots diff shows NaN values", ["plots"], "2024-01-31T23:59:59Z"),
    issue(10, "plots at the stroke of midnight", ["plots"], "2024-02-01T00:00:00Z"),
    issue(11, "stale before since", ["data-sync"], "2023-06-01T00:00:00Z"),
]
KEPT = [
    Example("dvc pull fails with S3 remote after upgrade", "data-sync", "1"),
    Example("vega template renders empty axis", "plots", "5"),
    Example("exp show hides params from queued experiments", "experiments", "8"),
    Example("plots diff shows NaN values", "plots", "9"),
]


class FakeGitHub:
    def __init__(self) -> None:
        self.issues = ISSUES
        self.page_size = 3
        self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.rate_limit_page: int | None = 2
        self.reset_at: int | None = None
        self.clock_ahead = 0.0  # seconds the client has slept
        self.answer: tuple[int, dict[str, str], Any] | None = None  # fixed answer, if set
        self.next_link_host: str | None = None
        self.slept: list[float] = []
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock_ahead += seconds

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                status, headers, body = fake.respond(self.path, dict(self.headers))
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json",
                                    "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def respond(self, target: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        split = urlsplit(target)
        query = dict(parse_qsl(split.query))
        self.requests.append((split.path, query, headers))
        if self.answer is not None:
            return self.answer
        if split.path != "/repos/iterative/dvc/issues":
            return 404, {}, {"message": "Not Found"}
        page = int(query.get("page", "1"))
        now = time.time() + self.clock_ahead
        if page == self.rate_limit_page and self.reset_at is None:
            self.reset_at = int(time.time()) + 1
        if self.reset_at is not None and now < self.reset_at:
            return 403, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(self.reset_at)}, {
                "message": "API rate limit exceeded for 127.0.0.1."}
        since = query.get("since", "")
        matching = [i for i in self.issues if i["updated_at"] >= since]
        start = (page - 1) * self.page_size
        links = {}
        if start + self.page_size < len(matching):
            host = self.next_link_host or self.url
            links["Link"] = f'<{host}{split.path}?{urlencode({**query, "page": page + 1})}>; rel="next"'
        return 200, links, matching[start:start + self.page_size]


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    fake = FakeGitHub()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join()


def fetch(github: FakeGitHub, **kwargs: Any) -> list[Example]:
    options: dict[str, Any] = {"since": "2024-01-01", "until": "2024-02-01T00:00:00Z", "token": TOKEN,
                               "api_url": github.url, "sleep": github.sleep, **kwargs}
    return fetch_issues("iterative/dvc", LABELS, **options)


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text
        assert TOKEN[4:20] not in text


def test_fetch_keeps_issues_with_exactly_one_wanted_label_in_the_window(
    github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    examples = fetch(github)
    assert examples == KEPT
    # 11 issues in pages of 3 (page 2 asked twice: once rate-limited, once after the wait)
    assert [q.get("page", "1") for _, q, _ in github.requests] == ["1", "2", "2", "3", "4"]
    first = github.requests[0][1]
    assert first == {"state": "all", "per_page": "100", "since": "2024-01-01T00:00:00Z"}
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, _, h in github.requests)
    assert len(github.slept) == 1 and 0 < github.slept[0] <= 3
    assert "rate limit reached; waiting" in caplog.text
    assert "kept 4; skipped 1 pull requests, 1 no wanted label, 1 several wanted labels, " \
           "3 outside window" in caplog.text
    assert_no_token(caplog.text, repr(examples), str(examples))


def test_fetch_without_a_token_sends_no_authorization(github: FakeGitHub) -> None:
    github.rate_limit_page = None
    assert fetch(github, token=None) == KEPT
    assert not any("Authorization" in h for _, _, h in github.requests)


def test_a_long_rate_limit_is_an_error_that_says_when_it_resets(github: FakeGitHub) -> None:
    github.rate_limit_page = None
    github.reset_at = int(time.time()) + 3600
    with pytest.raises(DataError) as caught:
        fetch(github, token=None)
    message = str(caught.value)
    assert message.startswith("GitHub API rate limit exhausted; it resets at ")
    assert message.endswith(" (in 60 min); set GITHUB_TOKEN (or a Secret block) to a personal access "
                            "token for 5,000 requests/hour, or run again after the reset")
    assert github.slept == []
    with pytest.raises(DataError) as caught:
        fetch(github)
    assert "wait for the reset, or use a token with a higher limit" in str(caught.value)
    assert_no_token(str(caught.value), repr(caught.value))


def test_retry_after_is_waited_out(github: FakeGitHub) -> None:
    github.answer = (429, {"Retry-After": "2"}, {"message": "secondary rate limit"})
    original = github.sleep

    def sleep_then_recover(seconds: float) -> None:
        original(seconds)
        github.answer = None

    github.rate_limit_page = None
    assert fetch(github, sleep=sleep_then_recover) == KEPT
    assert github.slept == [2.0]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ((401, {}, {"message": "Bad credentials"}),
         "GitHub rejected the token (401 Bad credentials); check GITHUB_TOKEN or the Secret block"),
        ((404, {}, {"message": "Not Found"}),
         "repository iterative/dvc not found at {url} (404); check the name, or if it is private "
         "set GITHUB_TOKEN to a token that can read it"),
        ((403, {}, {"message": "Resource not accessible by integration"}),
         "GitHub API answered 403 for {url}/repos/iterative/dvc/issues?state=all&per_page=100&"
         "since=2024-01-01T00%3A00%3A00Z: Resource not accessible by integration"),
    ],
)
def test_api_errors_are_data_errors_without_the_token(
    github: FakeGitHub, caplog: pytest.LogCaptureFixture, answer: tuple, message: str
) -> None:
    caplog.set_level(logging.DEBUG)
    github.answer = answer
    with pytest.raises(DataError) as caught:
        fetch(github)
    assert str(caught.value) == message.format(url=github.url)
    assert_no_token(str(caught.value), repr(caught.value), caplog.text)


def test_unreachable_api_names_the_url(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    slept: list[float] = []
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(DataError) as caught:
        fetch_issues("iterative/dvc", LABELS, token=TOKEN, api_url=url, sleep=slept.append)
    assert str(caught.value).startswith(
        f"cannot reach the GitHub API at {url}/repos/iterative/dvc/issues after 3 attempts (ConnectError:"
    )
    assert str(caught.value).endswith("; check api_url and the network")
    assert slept == [1.0, 2.0]
    cause = caught.value.__cause__
    assert_no_token(str(caught.value), repr(caught.value), str(cause), repr(cause), caplog.text)


def test_pagination_stays_on_the_api_host_and_is_bounded(github: FakeGitHub) -> None:
    github.rate_limit_page = None
    with pytest.raises(DataError) as caught:
        fetch(github, max_pages=2)
    assert str(caught.value) == ("iterative/dvc has more than 2 pages of issues in this window; narrow it "
                                 "with since/until or raise max_pages")
    github.requests.clear()
    github.next_link_host = "http://127.0.0.2:1"
    with pytest.raises(DataError) as caught:
        fetch(github)
    assert "pointed to another host for the next page (http://127.0.0.2); refusing to follow" \
        in str(caught.value)
    assert len(github.requests) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repo": "dvc"}, "repo must be 'owner/name' (e.g. iterative/dvc), got 'dvc'"),
        ({"since": "last week"}, "since='last week' is not an ISO 8601 date or time"),
        ({"since": "2024-02-01", "until": "2024-01-01"}, "since (2024-02-01) must be before until"),
        ({"token": TOKEN + "\n"}, None),
        ({"token": TOKEN[:10] + " " + TOKEN[10:]},
         "the GitHub token holds spaces or control characters; copy it again"),
    ],
)
def test_bad_arguments_are_rejected_before_any_request(
    github: FakeGitHub, kwargs: dict, message: str | None
) -> None:
    repo = kwargs.pop("repo", "iterative/dvc")
    options = {"api_url": github.url, "sleep": github.sleep, **kwargs}
    if message is None:  # a trailing newline (copied from a file) is stripped, not an error
        github.rate_limit_page = None
        assert fetch_issues(repo, LABELS, **options)
        assert github.requests[0][2]["Authorization"] == f"Bearer {TOKEN}"
        return
    with pytest.raises(DataError) as caught:
        fetch_issues(repo, LABELS, **options)
    assert str(caught.value).startswith(message)
    assert_no_token(str(caught.value))
    assert github.requests == []


def test_resolve_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", f" {TOKEN}\n")
    assert resolve_github_token() == TOKEN
    monkeypatch.setenv("GITHUB_TOKEN", "")
    assert resolve_github_token() is None
    monkeypatch.delenv("GITHUB_TOKEN")
    assert resolve_github_token() is None


@pytest.mark.slow
def test_resolve_token_from_a_secret_block(prefect_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.blocks.system import Secret

    monkeypatch.setenv("GITHUB_TOKEN", "from-the-environment")
    Secret(value=TOKEN).save("uncool-test-github-token", overwrite=True)
    assert resolve_github_token("uncool-test-github-token") == TOKEN
    with pytest.raises(DataError) as caught:
        resolve_github_token("no-such-block")
    assert str(caught.value).startswith("no Prefect Secret block named 'no-such-block'; create it")
