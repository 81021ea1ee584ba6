"""The warm start of flow runs: one process with Prefect imported forks each run's engine.

Prefect's process worker starts every flow run as a new ``python -m
prefect.engine``, which imports Prefect, prefect-aws (our block) and the
engine before the run can report Running: over a second of each run's start.
`uncool worker` therefore starts this server beside the worker::

    python -m uncool_prefect.project.warm SOCKET

It imports those modules once (:data:`PRELOAD`), listens on the Unix socket
SOCKET (its folder is private to the user), and serves the flow-run command
:mod:`.warm_client`: for each client it forks a child that becomes the run
(:mod:`.warm_run`) and runs ``prefect.engine``, answers the client with the
child's pid, forwards the signals the client gets, and sends the exit status
when it reaps the child.

Why forking here is safe: before it serves, this process has imported
modules and done nothing else: no thread, no event loop, no connection, no
API client, no log sent, nothing read from the environment into a cache
(settings are rebuilt in each child). The flow's own code is never imported
here; each run imports it anew from the code its pull step fetched, so a
changed flow counts from the next run. Installed packages (Prefect,
uncool-prefect) are as they were when the server started.

What it guarantees: a child whose client dies (Prefect's worker kills the
client on a forced cancellation) is killed with its process group; a child
dies with the server (PR_SET_PDEATHSIG), and its client then exits with an
error, so no run waits on a server that is gone; every child is reaped
(SIGCHLD, and once a second). On SIGTERM or SIGINT, or when its parent is
gone, it stops: no new runs, SIGTERM to the runs left, SIGKILL to their
process groups after STOP_GRACE seconds.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import warm_run
from .warm_client import ENGINE_ARGS, FORWARDED_SIGNALS, HEADER, MAGIC, SOCKET_VAR, encode, say

MODULE = "uncool_prefect.project.warm"
# Imported before the first run: what every run's engine and pull step import.
# Not prefect.engine itself: the child runs it as __main__ (see warm_run).
PRELOAD = (
    "prefect",
    "prefect.main",
    "prefect.flow_engine",
    "prefect.deployments.steps.core",
    "uncool_prefect.blocks",  # prefect-aws and boto3: the block's credentials field
    "uncool_prefect.project.deploy",  # the pull step
    "uncool_prefect.api",
)
STOP_GRACE = 10.0
# Blocked while forking (see WarmServer._fork).
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_MAX_REQUEST = 16 << 20
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def server_command(socket_path: Path) -> list[str]:
    """The command that starts a server on ``socket_path`` (in this Python environment)."""
    return [sys.executable, "-m", MODULE, str(socket_path)]


def server_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the placeholder each child overwrites with its flow run id (see warm_run)."""
    return {**env, warm_run.PROC_SLOT_VAR: warm_run.PROC_SLOT_VALUE}


@dataclass
class _Run:
    """A forked child and the connection of its client (None once the client is gone)."""

    pid: int
    conn: socket.socket | None
    received: bytearray = field(default_factory=bytearray)
    signalled: bool = False  # a stop was passed on: what is left of its group goes with it


class WarmServer:
    """Listens on ``path``; forks, watches and reaps one child per client. See the module doc."""

    def __init__(self, path: Path, *, path_head: str) -> None:
        self.path = path
        self.parent = os.getppid()
        self.path_head = path_head  # sys.path[0] at the start: this process's folder
        self.pythonpath = os.environ.get("PYTHONPATH")
        self.environment = _import_time_environment(os.environ)
        self.runs: dict[int, _Run] = {}
        self.stopping = False
        self.stop_deadline: float | None = None
        # NOTE: poll, not epoll: no selector fd for the children to inherit.
        self.selector = selectors.PollSelector()
        self.wakeup_read, self.wakeup_write = os.pipe()
        for fd in (self.wakeup_read, self.wakeup_write):
            os.set_blocking(fd, False)
        self.listener = self._listen(path)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ)
        signal.set_wakeup_fd(self.wakeup_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop (set_wakeup_fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_stop_signal)

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        """A listening socket at ``path``, which appears only once it accepts."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        aside = path.with_name(path.name + ".starting")
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
        listener.bind(str(aside))
        listener.listen(64)
        os.replace(aside, path)
        return listener

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _server_fds(self) -> list[int]:
        """Every fd of this server that a child must not keep."""
        fds = [self.listener.fileno(), self.wakeup_read, self.wakeup_write]
        return fds + [run.conn.fileno() for run in self.runs.values() if run.conn is not None]

    def serve(self) -> None:
        """Serve until stopped and every child is reaped (or STOP_GRACE + 5 s after the stop)."""
        while True:
            for key, _events in self.selector.select(timeout=1.0):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj == self.wakeup_read:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wakeup_read, 4096)
                else:
                    self._from_client(key.data)
            self._reap()
            if not self.stopping and os.getppid() != self.parent:
                say("its parent (uncool worker) is gone: stopping")
                self.stopping = True
            if self.stopping and self._stop_step():
                return

    def _stop_step(self) -> bool:
        """One step of stopping; True when done."""
        now = time.monotonic()
        if self.stop_deadline is None:
            self.stop_deadline = now + STOP_GRACE
            self.selector.unregister(self.listener)
            self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            for pid in self.runs:
                _signal_child(pid, signal.SIGTERM, group=False)
        if not self.runs:
            return True
        if now > self.stop_deadline:
            for pid in self.runs:
                _signal_child(pid, signal.SIGKILL, group=True)
        if now > self.stop_deadline + 5:
            say(f"stopping with {len(self.runs)} flow-run process(es) not reaped: {sorted(self.runs)}")
            return True
        return False

    # -- a client's request ---------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            request, fds = _read_request(conn)
            refusal = self._refusal(conn, request, fds)
        except Exception as exc:  # noqa: BLE001 - one bad request must not end every run
            request, refusal = {}, f"unreadable request ({type(exc).__name__}: {exc})"
        if refusal is None:
            try:
                self._fork(conn, request, fds)
                return
            except OSError as exc:  # EAGAIN (a pids limit), ENOMEM: this run starts cold
                refusal = f"cannot fork ({exc})"
        self._refuse(conn, refusal, fds)

    @staticmethod
    def _refuse(conn: socket.socket, refusal: str, fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            conn.sendall(encode({"refused": refusal}))
        conn.close()

    def _refusal(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> str | None:
        """Why this request is not served warm (the client then starts cold), or None."""
        _pid, uid, _gid = _PEER_CREDENTIALS.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size))
        if uid != os.getuid():  # NOTE: a child runs anything as this user: only for this user
            return f"client of another user (uid {uid})"
        if self.stopping:
            return "the warm server is stopping"
        argv = request.get("argv")
        if not isinstance(argv, list) or argv[:2] != ENGINE_ARGS:
            return f"only `python {' '.join(ENGINE_ARGS)}` starts warm"
        if (request.get("prefix"), request.get("executable"), request.get("version")) != (
                sys.prefix, os.path.realpath(sys.executable), sys.version):
            return (f"the client runs another Python ({request.get('executable')}, "
                    f"{request.get('prefix')})")
        env = request.get("env")
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            return "no environment in the request"
        differs = sorted(set(self.environment.items()) ^ set(_import_time_environment(env).items()))
        if differs:
            # NOTE: a module imported here may have read these at import
            # (PYTHONHASHSEED, the locale, UNCOOL_S3_*...): only a new Python
            # sees the run's values. PREFECT_* are read again in the child.
            return f"the run's environment differs in {', '.join(sorted({k for k, _ in differs}))}"
        if len(fds) != 3:
            return f"expected the 3 standard streams, got {len(fds)} fds"
        return None

    def _fork(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        server_fds = [*self._server_fds(), conn.fileno()]
        sys.stdout.flush()
        sys.stderr.flush()
        server_pid = os.getpid()
        # NOTE: a stop the client passes on as soon as it has the pid must reach
        # the run, not this server's handlers copied into the child: the child
        # unblocks them once its handlers are a new interpreter's (warm_run).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            raise
        if pid == 0:
            # NOTE: run_forked ends the process itself; this is for a bug in it:
            # a child must never come back into this loop.
            try:
                warm_run.run_forked(request, fds, server_fds, server_pid=server_pid,
                                    server_path_head=self.path_head, server_pythonpath=self.pythonpath)
            except BaseException:  # noqa: BLE001 - printed, and the child ends here
                traceback.print_exc()
            finally:
                os._exit(70)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for fd in fds:
            os.close(fd)
        run = _Run(pid, conn)
        self.runs[pid] = run
        try:
            conn.settimeout(1.0)
            conn.sendall(encode({"pid": pid}))
        except OSError:
            self._client_gone(run)
            return
        self.selector.register(conn, selectors.EVENT_READ, run)

    # -- a client's messages, a child's end -----------------------------------

    def _from_client(self, run: _Run) -> None:
        assert run.conn is not None
        try:
            data = run.conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._client_gone(run)
            return
        run.received += data
        while b"\n" in run.received:
            line, _, rest = bytes(run.received).partition(b"\n")
            run.received[:] = rest
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                signum = int(json.loads(line).get("signal"))
                if signum in FORWARDED_SIGNALS and run.pid in self.runs:
                    # NOTE: to the run's process group, as Prefect's own start stops
                    # a run: the engine and what it started (a subprocess, a local
                    # Dask cluster) alike.
                    run.signalled = True
                    _signal_child(run.pid, signum, group=True)

    def _client_gone(self, run: _Run) -> None:
        """The client died (or hung up): its run has no one to report to; kill its group."""
        self._close(run)
        if run.pid in self.runs:
            say(f"the client of flow-run process {run.pid} is gone: killing its process group")
            _signal_child(run.pid, signal.SIGKILL, group=True)

    def _close(self, run: _Run) -> None:
        if run.conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(run.conn)
            run.conn.close()
            run.conn = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.runs.pop(pid, None)
            if run is not None and run.signalled:
                # What the stopped run started and left behind goes with it.
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            if run is None or run.conn is None:
                continue
            ended = ({"killed": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                     else {"exit": os.waitstatus_to_exitcode(status)})
            with contextlib.suppress(OSError):
                run.conn.sendall(encode(ended))
            self._close(run)


def _read_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The client's request and the fds it passed; fds are closed here if it is unreadable."""
    conn.settimeout(2.0)  # NOTE: a client sends it all at once; a stuck one must not stall the server
    header, fds, _flags, _address = socket.recv_fds(conn, HEADER.size, 3)
    try:
        while len(header) < HEADER.size:
            more = conn.recv(HEADER.size - len(header))
            if not more:
                raise ValueError("connection closed in the request header")
            header += more
        magic, length = HEADER.unpack(header)
        if magic != MAGIC or length > _MAX_REQUEST:
            raise ValueError(f"not a warm-start request (header {header!r})")
        payload = bytearray()
        while len(payload) < length:
            more = conn.recv(min(1 << 20, length - len(payload)))
            if not more:
                raise ValueError("connection closed in the request")
            payload += more
        request = json.loads(payload)
        if not isinstance(request, dict):
            raise ValueError("the request is not a JSON object")
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _import_time_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The variables a module imported here may have read at import: all but Prefect's own
    (the child builds Prefect's settings again) and this warm start's."""
    return {name: value for name, value in env.items()
            if not name.startswith("PREFECT_") and name not in (SOCKET_VAR, warm_run.PROC_SLOT_VAR)}


def _signal_child(pid: int, signum: int, *, group: bool) -> None:
    """``signum`` to a child not reaped yet (so its pid is still its own), or to its process group."""
    if group:
        with contextlib.suppress(OSError):  # ESRCH: no group yet (before its setsid) or left
            os.killpg(pid, signum)
    with contextlib.suppress(OSError):
        os.kill(pid, signum)


def preload() -> None:
    """Import PRELOAD, without running anything that the fork must not copy."""
    for name in PRELOAD:
        importlib.import_module(name)
    sys.modules.pop(warm_run.ENGINE_MODULE, None)


def main(argv: list[str] | None = None) -> int:
    """``python -m uncool_prefect.project.warm SOCKET``: serve until SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        say("usage: python -m uncool_prefect.project.warm SOCKET")
        return 2
    started = time.monotonic()
    path_head = sys.path[0]
    preload()
    server = WarmServer(Path(args[0]), path_head=path_head)
    # NOTE: what the imports allocated is never collected again: the children's
    # garbage collections then leave those pages shared with this process.
    gc.freeze()
    say(f"ready in {time.monotonic() - started:.1f} s (pid {os.getpid()}, "
        f"{len(sys.modules)} modules imported); socket {args[0]}")
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
