"""In a child forked by the warm server (:mod:`.warm`): become the flow run's process, run its engine.

A new ``python -m prefect.engine`` would start with the run's environment,
working folder, umask and standard streams, in a session of its own (the
client made one); it would read Prefect's settings from that environment and
folder, set up logging from them, run the engine module as ``__main__`` and,
at its end, run its exit handlers and flush its streams. :func:`run_forked`
does each of those, in that order, in a process that has Prefect imported
already. It never returns into the server's loop: it ends with ``os._exit``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import io
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from .warm_client import say

ENGINE_MODULE = "prefect.engine"
# The placeholder the server is started with, as long as PREFECT__FLOW_RUN_ID=<uuid>
# (see _name_run_in_proc_environ).
PROC_SLOT_VAR = "UNCOOL_WARM_RUN_SLOT"
_RUN_ID_ENTRY = b"PREFECT__FLOW_RUN_ID="
_UUID_LENGTH = 36
PROC_SLOT_VALUE = "0" * (len(_RUN_ID_ENTRY) + _UUID_LENGTH - len(PROC_SLOT_VAR) - 1)
_PR_SET_PDEATHSIG = 1


def run_forked(request: dict[str, Any], streams: list[int], server_fds: Iterable[int], *,
               server_pid: int, server_path_head: str, server_pythonpath: str | None) -> NoReturn:
    """Become the run ``request`` describes (as sent by the client) and run its engine.

    ``streams`` are the client's fds 0, 1, 2; ``server_fds`` the server's own
    (its socket, its connections, its wakeup pipe), closed here;
    ``server_path_head`` and ``server_pythonpath`` what the server's
    ``sys.path`` got from its start (its folder, its PYTHONPATH).
    """
    try:
        _reset_signals()
        _die_with(server_pid)
        os.setsid()
        _take_streams(streams, server_fds)
        env: dict[str, str] = request["env"]
        os.environ.clear()
        os.environ.update(env)
        time.tzset()
        os.umask(int(request["umask"]))
        os.chdir(request["cwd"])
        _name_run_in_proc_environ(env.get("PREFECT__FLOW_RUN_ID"))
        sys.argv = [sys.argv[0], *request["argv"][2:]]  # runpy puts the module's path first
        sys.path[:] = _run_sys_path(sys.path, os.getcwd(), server_path_head,
                                    server_pythonpath, env.get("PYTHONPATH"))
        _reconfigure_stdio(unbuffered=bool(env.get("PYTHONUNBUFFERED")))
        _rebuild_prefect_settings_and_logging()
    except BaseException as exc:  # noqa: BLE001 - reported on the run's stderr, then this process ends
        say(f"cannot start the flow run: {type(exc).__name__}: {exc}")
        os._exit(1)
    _exit_like_python(_run_engine())


def _reset_signals() -> None:
    """The signal state of a new interpreter, not the server's."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _die_with(server_pid: int) -> None:
    """SIGKILL when the server dies: no run outlives the process that reports its end."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:  # it died before the line above
        os._exit(1)


def _take_streams(streams: list[int], server_fds: Iterable[int]) -> None:
    """The client's fds as 0, 1, 2; none of the server's left open.

    NOTE: a server fd left open here would keep another run's connection (or
    the listening socket) alive past the server, and a client would wait on it.
    """
    for fd in server_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    for target, fd in enumerate(streams):
        os.dup2(fd, target)
    for fd in set(streams):
        if fd > 2:
            os.close(fd)


def _name_run_in_proc_environ(run_id: str | None) -> bool:
    """Make /proc/PID/environ of this process show PREFECT__FLOW_RUN_ID, as a new process's would.

    NOTE: the kernel shows a process's initial environment block (its memory
    from env_start to env_end), which a forked child shares with the server;
    os.environ never changes it. `uncool worker` (flow_run_processes), ps and
    psutil find a run's processes by that variable there. The server is started
    with a placeholder entry of exactly the length of PREFECT__FLOW_RUN_ID=<uuid>
    (PROC_SLOT_VAR): overwritten in place, the block names this run. Returns
    whether it did (Linux, a placeholder, a UUID-long run id).
    """
    slot = f"{PROC_SLOT_VAR}={PROC_SLOT_VALUE}".encode()
    entry = _RUN_ID_ENTRY + (run_id or "").encode()
    if len(entry) != len(slot):
        return False
    try:
        block = Path("/proc/self/environ").read_bytes()
        stat = Path("/proc/self/stat").read_text()
    except OSError:
        return False
    if block.startswith(slot):
        offset = 0
    elif (found := block.find(b"\0" + slot)) >= 0:
        offset = found + 1
    else:
        return False
    end = offset + len(slot)
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 of proc(5)
    if block[end:end + 1] not in (b"", b"\0") or len(fields) < 48:
        return False
    env_start = int(fields[47])  # field 50: env_start
    ctypes.memmove(env_start + offset, entry, len(entry))
    return Path("/proc/self/environ").read_bytes().find(entry) == offset


def _run_sys_path(path: list[str], cwd: str, server_head: str, server_pythonpath: str | None,
                  run_pythonpath: str | None) -> list[str]:
    """``sys.path`` as ``python -m`` started in ``cwd`` with the run's PYTHONPATH would have it.

    >>> _run_sys_path(["/srv", "/a", "/lib"], "/run", "/srv", "/a", "/b")
    ['/run', '/b', '/lib']
    """
    server_added = {server_head, *(server_pythonpath or "").split(os.pathsep)} - {""}
    run_added = [p for p in (run_pythonpath or "").split(os.pathsep) if p]
    rest = [p for p in path if p not in server_added and p != cwd and p not in run_added]
    return [cwd, *run_added, *rest]


def _reconfigure_stdio(*, unbuffered: bool) -> None:
    """Buffering as a new interpreter picks it for these fds (the server's were others)."""
    for stream, line_buffered in ((sys.stdout, os.isatty(1)), (sys.stderr, True)):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=line_buffered, write_through=unbuffered)


def _rebuild_prefect_settings_and_logging() -> None:
    """Prefect's settings and logging from this run's environment and folder.

    NOTE: importing Prefect built its root settings context from the server's
    environment (PREFECT_API_URL, PREFECT_HOME, profiles, a .env or
    prefect.toml in the working folder) and configured logging from it; a run's
    PREFECT_* variables take effect only once both are built again. Prefect
    reads the settings context on each use (get_current_settings), so
    replacing the root context is enough; logging is configured from scratch
    (not incrementally), as at import.
    """
    import prefect.context
    from prefect.logging import configuration

    prefect.context.refresh_global_settings_context()
    configuration.PROCESS_LOGGING_CONFIG.clear()
    configuration.setup_logging()


def _run_engine() -> int:
    """``prefect.engine`` as ``__main__``; the exit status Python would give it."""
    # NOTE: runpy warns when the module it runs as __main__ is imported already;
    # a new interpreter has it imported only as __main__, too.
    sys.modules.pop(ENGINE_MODULE, None)
    try:
        runpy.run_module(ENGINE_MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return _exit_status(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        return -signal.SIGINT
    except BaseException:  # noqa: BLE001 - printed as an uncaught exception is, exit status 1
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def _exit_status(code: object) -> int:
    """What Python exits with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _exit_like_python(status: int) -> NoReturn:
    """End as an interpreter does: threads' exit hooks and joins, atexit, flushed streams.

    NOTE: Prefect sends the last log lines to the API from exit hooks
    (threading's and atexit's); os._exit alone would lose them. A negative
    status is a signal (SIGINT for an uncaught KeyboardInterrupt).
    """
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status & 0xFF)
