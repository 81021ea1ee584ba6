"""Issue titles from the GitHub REST API, as labelled examples.

One GET per page of ``/repos/{owner}/{repo}/issues?state=all&per_page=100``,
following ``Link: <...>; rel="next"``. The API's ``labels=a,b`` filter means
*all* of them, so issues are fetched unfiltered and sorted out here: pull
requests are dropped, and an issue is kept only if it carries exactly one of
the wanted labels (label names match case-insensitively).

The token is sent as ``Authorization: Bearer ...`` and appears nowhere else:
not in log lines, exception messages, or reprs. Pagination links are followed
only on the API's own host, so the token is never sent elsewhere.

Rate limits: a 403/429 with ``X-RateLimit-Remaining: 0`` or ``Retry-After`` is
waited out when the wait is at most :data:`MAX_RATE_LIMIT_WAIT_S`; a longer
wait is a :class:`DataError` that says when the limit resets.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import httpx

from .examples import DataError, Example, check_labels, sort_examples

logger = logging.getLogger(__name__)

GITHUB_API_URL = "https://api.github.com"
MAX_RATE_LIMIT_WAIT_S = 60.0
MAX_RATE_LIMIT_WAITS = 3  # per request
MAX_ATTEMPTS = 3  # per request, for dropped connections and 5xx answers
_RETRY_STATUS = {500, 502, 503, 504}
_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


def resolve_github_token(secret_block: str | None = None) -> str | None:
    """Find the GitHub token: a Prefect ``Secret`` block, else ``GITHUB_TOKEN``, else none.

    Args:
        secret_block: Name of a Prefect ``Secret`` block holding the token. When
            given it must exist; the environment is not consulted.

    Returns:
        The token, or ``None`` to call the API anonymously (60 requests/hour).

    Raises:
        DataError: If the named block does not exist or holds no string.
    """
    if secret_block:
        from prefect.blocks.system import Secret  # lazily: the only Prefect import here

        try:
            # NOTE: _sync=True: inside an async flow, load() would return a coroutine.
            block = cast("Secret[Any]", Secret.load(secret_block, _sync=True))  # type: ignore[call-arg]
        except ValueError as exc:
            raise DataError(
                f"no Prefect Secret block named {secret_block!r}; create it (Prefect UI > Blocks, "
                f"or Secret(value=...).save({secret_block!r})) or leave it out to use GITHUB_TOKEN"
            ) from exc
        value = block.get()
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"the Secret block {secret_block!r} holds no token string; set its value")
        return value.strip()
    token = os.environ.get("GITHUB_TOKEN", "").strip()
    return token or None


def _parse_time(name: str, value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{name}={value!r} is not an ISO 8601 date or time; use e.g. 2024-01-31 or "
            "2024-01-31T12:00:00Z"
        ) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _rate_limit_wait(response: httpx.Response, now: float) -> float | None:
    """Seconds to wait before retrying, or None if this is not a rate-limit answer."""
    retry_after = response.headers.get("Retry-After")
    if retry_after:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            when = email.utils.parsedate_to_datetime(retry_after)
            return max(0.0, when.timestamp() - now)
    if response.headers.get("X-RateLimit-Remaining") == "0":
        reset = response.headers.get("X-RateLimit-Reset")
        if reset is None:
            return 60.0  # GitHub's advice when it gives no time: at least a minute
        # NOTE: one extra second covers the skew between GitHub's clock and ours.
        return max(0.0, float(reset) - now) + 1.0
    return None


def _api_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("message", ""))[:200] if isinstance(body, dict) else ""


class _Pager:
    """GET one page at a time with bounded retries; never lets the token out."""

    def __init__(self, client: httpx.Client, headers: dict[str, str], api_url: str,
                 authenticated: bool, sleep: Callable[[float], None]) -> None:
        self.client = client
        self.headers = headers
        self.origin = httpx.URL(api_url)
        self.authenticated = authenticated
        self.sleep = sleep

    def check_origin(self, url: str) -> None:
        target = httpx.URL(url)
        if (target.scheme, target.host, target.port) != (
            self.origin.scheme, self.origin.host, self.origin.port
        ):
            raise DataError(
                f"the GitHub API at {self.origin} pointed to another host for the next page "
                f"({target.scheme}://{target.host}); refusing to follow it with the token"
            )

    def get(self, url: str, params: dict[str, str] | None) -> httpx.Response:
        failures = 0
        waits = 0
        while True:
            try:
                response = self.client.get(url, params=params, headers=self.headers,
                                           follow_redirects=True)
            except httpx.TransportError as exc:
                failures += 1
                if failures >= MAX_ATTEMPTS:
                    raise DataError(
                        f"cannot reach the GitHub API at {url} after {failures} attempts "
                        f"({type(exc).__name__}: {exc}); check api_url and the network"
                    ) from exc
                self.sleep(2.0 ** (failures - 1))
                continue
            if response.status_code in (403, 429):
                wait = _rate_limit_wait(response, time.time())
                if wait is not None:
                    waits += 1
                    self._check_wait(wait, waits)
                    logger.warning("GitHub API rate limit reached; waiting %.0f s for it to reset", wait)
                    self.sleep(wait)
                    continue
            if response.status_code in _RETRY_STATUS and failures + 1 < MAX_ATTEMPTS:
                failures += 1
                self.sleep(2.0 ** (failures - 1))
                continue
            return response

    def _check_wait(self, wait: float, waits: int) -> None:
        if wait <= MAX_RATE_LIMIT_WAIT_S and waits <= MAX_RATE_LIMIT_WAITS:
            return
        resets = datetime.fromtimestamp(time.time() + wait, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        advice = (
            "wait for the reset, or use a token with a higher limit"
            if self.authenticated
            else "set GITHUB_TOKEN (or a Secret block) to a personal access token for "
            "5,000 requests/hour, or run again after the reset"
        )
        if wait <= MAX_RATE_LIMIT_WAIT_S:
            raise DataError(
                f"GitHub API still rate-limited after {waits - 1} waits (next reset at {resets}); "
                f"{advice}"
            )
        raise DataError(
            f"GitHub API rate limit exhausted; it resets at {resets} (in {wait / 60:.0f} min); {advice}"
        )


def _raise_for_status(response: httpx.Response, repo: str, api_url: str) -> None:
    status = response.status_code
    if status == 200:
        return
    message = _api_message(response)
    if status == 401:
        raise DataError(
            f"GitHub rejected the token (401 {message}); check GITHUB_TOKEN or the Secret block"
        )
    if status == 404:
        raise DataError(
            f"repository {repo} not found at {api_url} (404); check the name, or if it is "
            "private set GITHUB_TOKEN to a token that can read it"
        )
    raise DataError(f"GitHub API answered {status} for {response.request.url}: {message}")


def _label_names(issue: dict[str, Any]) -> set[str]:
    names = set()
    for label in issue.get("labels") or []:
        name = label.get("name") if isinstance(label, dict) else label
        if isinstance(name, str):
            names.add(name.lower())
    return names


def fetch_issues(
    repo: str,
    labels: Sequence[str],
    since: str | None = None,
    until: str | None = None,
    token: str | None = None,
    api_url: str = GITHUB_API_URL,
    max_pages: int = 100,
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Example]:
    """Fetch the titles of a repository's issues that carry exactly one wanted label.

    The window is on ``created_at``: ``since <= created_at < until`` (half-open,
    so consecutive windows neither overlap nor leave gaps). ``since`` is also
    sent to the API, which filters on ``updated_at``; that only trims pages.

    Args:
        repo: ``owner/name``, e.g. ``iterative/dvc``.
        labels: The wanted labels; the one an issue carries becomes its label.
        since: ISO 8601 date or time; a naive one is UTC.
        until: ISO 8601 date or time; a naive one is UTC.
        token: A GitHub token (see :func:`resolve_github_token`); ``None`` calls
            the API anonymously.
        api_url: The API root (GitHub Enterprise: ``https://host/api/v3``).
        max_pages: Upper bound on pages of 100 issues; more is an error.
        client: An ``httpx.Client`` to use (not closed here); default a new one.
        sleep: Called with seconds to wait (rate limits, retries); for tests.

    Returns:
        One example per kept issue (``id`` is the issue number), sorted by number.

    Raises:
        DataError: If an argument is malformed, the API cannot be reached, it
            refuses the token or the repo, the rate limit resets more than a
            minute from now, or there are more than ``max_pages`` pages.
    """
    if not _REPO.match(repo):
        raise DataError(f"repo must be 'owner/name' (e.g. iterative/dvc), got {repo!r}")
    wanted = {label.lower(): label for label in check_labels(labels)}
    start = _parse_time("since", since) if since else None
    end = _parse_time("until", until) if until else None
    if start and end and start >= end:
        raise DataError(f"since ({since}) must be before until ({until})")
    headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28",
               "User-Agent": "uncool-prefect"}
    if token:
        if any(ord(char) < 33 or ord(char) == 127 for char in token.strip()):
            raise DataError("the GitHub token holds spaces or control characters; copy it again")
        headers["Authorization"] = f"Bearer {token.strip()}"
    base = api_url.rstrip("/")
    url: str | None = f"{base}/repos/{repo}/issues"
    params: dict[str, str] | None = {"state": "all", "per_page": "100"}
    if start and params is not None:
        params["since"] = start.strftime("%Y-%m-%dT%H:%M:%SZ")
    own_client = client is None
    http = client if client is not None else httpx.Client(timeout=30.0)
    pager = _Pager(http, headers, base, bool(token), sleep)
    kept: dict[int, Example] = {}
    counts = {"pull requests": 0, "no wanted label": 0, "several wanted labels": 0, "outside window": 0}
    pages = 0
    try:
        while url is not None:
            if pages >= max_pages:
                raise DataError(
                    f"{repo} has more than {max_pages} pages of issues in this window; narrow it "
                    "with since/until or raise max_pages"
                )
            response = pager.get(url, params)
            _raise_for_status(response, repo, base)
            pages += 1
            try:
                items = response.json()
            except ValueError as exc:
                raise DataError(f"GitHub API at {url} answered something that is not JSON") from exc
            if not isinstance(items, list):
                raise DataError(f"GitHub API at {url} answered {type(items).__name__}, not a list of issues")
            for issue in items:
                if "pull_request" in issue:
                    counts["pull requests"] += 1
                    continue
                matched = [wanted[name] for name in _label_names(issue) if name in wanted]
                if len(matched) != 1:
                    counts["no wanted label" if not matched else "several wanted labels"] += 1
                    continue
                created = _parse_time("created_at", str(issue.get("created_at")))
                if (start and created < start) or (end and created >= end):
                    counts["outside window"] += 1
                    continue
                title = str(issue.get("title") or "").strip()
                if title:
                    kept[int(issue["number"])] = Example(text=title, label=matched[0],
                                                         id=str(issue["number"]))
            url = response.links.get("next", {}).get("url")
            params = None  # the next link carries every parameter
            if url is not None:
                pager.check_origin(url)
    finally:
        if own_client:
            http.close()
    skipped = ", ".join(f"{count} {what}" for what, count in counts.items() if count)
    logger.info("fetched %d page(s) of %s issues: kept %d%s", pages, repo, len(kept),
                f"; skipped {skipped}" if skipped else "")
    return sort_examples(kept.values())
