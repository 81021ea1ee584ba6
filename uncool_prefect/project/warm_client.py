"""The work pool's flow-run command: Prefect's engine, started warm when `uncool worker` can.

Prefect's process worker starts each flow run as the pool's ``command``, which
``uncool deploy`` sets to

    uncool-flow-run -m prefect.engine

(the console script of :func:`main`, whose first line names the Python
uncool-prefect is installed in). This process imports the standard library only. Where ``UNCOOL_WARM_SOCKET``
names a warm server (:mod:`.warm`, started by `uncool worker`), it hands the
server its environment, working folder, arguments and standard streams; the
server forks a process that imported Prefect before the run was due, which
runs the engine as ``python -m prefect.engine`` would. This process stays as
the one Prefect's worker watches: it forwards the signals the worker sends
(SIGTERM on cancellation) and exits as the engine did. When it is killed, the
server kills the engine's process group.

Without a server (no variable, no socket, a refusal) it replaces itself with
``python -m prefect.engine`` (exec, same pid), so the pool also works under a
plain ``prefect worker`` or ``uncool worker --cold``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
from typing import Any, NoReturn

SOCKET_VAR = "UNCOOL_WARM_SOCKET"
ENGINE_ARGS = ["-m", "prefect.engine"]
# A request: this header (magic, payload length) carrying the three standard
# streams as SCM_RIGHTS, then the JSON payload.
HEADER = struct.Struct("!4sI")
MAGIC = b"UWS1"
# Signals Prefect's worker (or a person) sends the flow-run process; the engine gets them.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# NOTE: reaching the server and handing it the request takes milliseconds; one
# that cannot be reached in this time is wedged, and the run starts cold.
CONNECT_TIMEOUT = 10.0
# NOTE: once the request is handed over, the server may have forked the run:
# starting it cold now could start it twice. A server that answers neither a
# pid nor a refusal in this time fails the run (Crashed), loudly, instead.
REPLY_TIMEOUT = 60.0
SAY_PREFIX = "uncool warm start: "


def encode(message: dict[str, Any]) -> bytes:
    """One protocol message: a JSON object on one line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def read_message(sock: socket.socket, pending: bytearray) -> dict[str, Any] | None:
    """The next message from ``sock`` (``pending`` keeps what was read past it); None at EOF."""
    while b"\n" not in pending:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        pending += chunk
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"not a protocol message: {line[:200]!r}")
    return message


def request_payload(args: list[str]) -> bytes:
    """What the server needs to start the run as this process would have: JSON."""
    umask = os.umask(0)
    os.umask(umask)
    return json.dumps({"argv": args, "env": dict(os.environ), "cwd": os.getcwd(),
                       "umask": umask, "prefix": sys.prefix,
                       "executable": os.path.realpath(sys.executable),
                       "version": sys.version}).encode()


def _standard_fds() -> list[int]:
    """fds 0, 1, 2; a closed one is replaced by /dev/null (SCM_RIGHTS cannot pass a closed fd)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def say(text: str) -> None:
    """One line on stderr (fd 2, unbuffered), named as the warm start's."""
    with contextlib.suppress(OSError):
        os.write(2, f"{SAY_PREFIX}{text}\n".encode())


class _Forwarder:
    """Signal handlers that hand each signal to the server once a run was started (kept until then)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.held: list[int] = []
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.sock is None:
            self.held.append(signum)
            return
        with contextlib.suppress(OSError):  # the server is gone: the loop below sees EOF
            self.sock.sendall(encode({"signal": signum}))

    def start_forwarding(self, sock: socket.socket) -> None:
        self.sock = sock
        for signum in self.held:
            self._on_signal(signum, None)
        self.held.clear()

    def restore_defaults(self) -> None:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)


def _die_like(signum: int) -> NoReturn:
    """End this process by ``signum``, as the engine ended, so Prefect reads the same status."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # a signal that does not end a process (never one Prefect sends)


def start_cold(args: list[str], forwarder: _Forwarder) -> NoReturn:
    """Become ``python ARGS`` (exec): Prefect's own start, in this pid and session."""
    forwarder.restore_defaults()
    if forwarder.held:  # cancelled before it started: end as the engine would have
        _die_like(forwarder.held[0])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *args])


def connect(path: str, args: list[str]) -> tuple[socket.socket, bytearray, int] | str:
    """Ask the server at ``path`` to start the run: (connection, read buffer, pid), or why not.

    Why not (a string: start cold) only where the server cannot have started
    the run: it could not be reached, refused, or closed without an answer
    (its fork dies with it). A server that takes the request and then says
    nothing within REPLY_TIMEOUT ends this process with an error.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pending = bytearray()
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(path)
        payload = request_payload(args)
        fds = _standard_fds()
        socket.send_fds(sock, [HEADER.pack(MAGIC, len(payload))], fds)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        sock.sendall(payload)
    except OSError as exc:  # socket.timeout is an OSError
        sock.close()
        return f"{type(exc).__name__}: {exc}"
    try:
        sock.settimeout(REPLY_TIMEOUT)
        reply = read_message(sock, pending)
    except TimeoutError:
        say(f"the warm server took the run and did not answer in {REPLY_TIMEOUT:g} s; not "
             "starting it cold as well (it may have started): failing. Restart `uncool worker`, "
             "or run it with --cold")
        raise SystemExit(1) from None
    except (OSError, ValueError) as exc:
        sock.close()
        return f"{type(exc).__name__}: {exc}"
    if reply is None or "pid" not in reply:
        sock.close()
        return str((reply or {}).get("refused", "the server closed the connection"))
    sock.settimeout(None)
    return sock, pending, int(reply["pid"])


def wait_for_run(sock: socket.socket, pending: bytearray, pid: int) -> NoReturn:
    """Wait for the engine's end and exit as it did; if the server dies, end the engine."""
    try:
        while True:
            message = read_message(sock, pending)
            if message is None:
                break
            if "exit" in message:
                raise SystemExit(int(message["exit"]))
            if "killed" in message:
                _die_like(int(message["killed"]))
    except (OSError, ValueError) as exc:
        say(f"lost the warm server ({type(exc).__name__}: {exc})")
    # NOTE: the engine was forked with the server as its parent and a death
    # signal tied to it, so it is gone already; this is for the rare case
    # where the server lost only this connection.
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    say(f"the warm server went away; flow-run process {pid} killed")
    raise SystemExit(1)


def main(args: list[str] | None = None) -> NoReturn:
    """``uncool-flow-run -m prefect.engine [ARGS]``, or ``python -m <this module> ...``."""
    args = sys.argv[1:] if args is None else args
    # NOTE: a session of its own, as Prefect's default process start gives each
    # run: group signals to the worker (a terminal's Ctrl-C, a group kill) do
    # not reach the run, and killing this run's group kills nothing else.
    with contextlib.suppress(OSError):  # already a group leader
        os.setsid()
    forwarder = _Forwarder()
    path = os.environ.get(SOCKET_VAR)
    if not path or args[:2] != ENGINE_ARGS or not sys.platform.startswith("linux"):
        start_cold(args, forwarder)
    started = connect(path, args)
    if isinstance(started, str):
        say(f"no warm start ({started}); starting `python {' '.join(args)}` cold")
        start_cold(args, forwarder)
    sock, pending, pid = started
    forwarder.start_forwarding(sock)
    wait_for_run(sock, pending, pid)


if __name__ == "__main__":
    main()
